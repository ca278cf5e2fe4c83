//! The files the deployer ships to a node, from the project's `deploy/node/`: embedded at
//! build time so the binary is self-contained and a node always gets the stack this build
//! was tested with. Only the OS prep script can be swapped (`PN_PREP_SCRIPT`), for tests
//! against a real sshd where the real `provision-node.sh` must never run.

use std::path::Path;

pub const PROVISION_NODE_SH: &str = include_str!("../../deploy/node/provision-node.sh");
pub const DOCKER_COMPOSE_YML: &str = include_str!("../../deploy/node/docker-compose.yml");
pub const AUTO_UPDATE_SH: &str = include_str!("../../deploy/node/auto-update.sh");
pub const CRASH_MONITOR_SH: &str = include_str!("../../deploy/node/k2s-crash-monitor.sh");

/// The stack as the deployer sends it.
#[derive(Debug, Clone)]
pub struct Stack {
    pub prep_script: Vec<u8>,
    /// `(file name in the deploy dir, content)`, in upload order; `.env` is not among them.
    pub files: Vec<(&'static str, Vec<u8>)>,
}

impl Stack {
    /// The embedded stack, with the prep script read from `prep_override` when given and the
    /// compose file's digest pins replaced by `images` (`PN_K2_IMAGES`, [`parse_images`]).
    pub fn load(prep_override: Option<&Path>, images: &[(String, String)]) -> std::io::Result<Stack> {
        let prep_script = match prep_override {
            Some(p) => std::fs::read(p).map_err(|e| std::io::Error::new(e.kind(), format!("prep_script {}: {e}", p.display())))?,
            None => PROVISION_NODE_SH.as_bytes().to_vec(),
        };
        let compose = repin(DOCKER_COMPOSE_YML, images).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        Ok(Stack {
            prep_script,
            files: vec![
                ("docker-compose.yml", compose.into_bytes()),
                // Empty: the node authenticates users remotely through Center (runbook step 6).
                ("users", Vec::new()),
                ("auto-update.sh", AUTO_UPDATE_SH.as_bytes().to_vec()),
                ("k2s-crash-monitor.sh", CRASH_MONITOR_SH.as_bytes().to_vec()),
            ],
        })
    }
}

/// The repository and digest of an `image:` line pinned by digest (`repo:<tag>@sha256:<hex>`,
/// the tag usually `${K2_VERSION…}`); `None` for any other line.
fn pinned_line(line: &str) -> Option<(&str, &str)> {
    let value = line.trim_start().strip_prefix("image:")?.trim();
    let (name, digest) = value.rsplit_once('@')?;
    let repo = name.split(':').next().unwrap_or("");
    (is_digest(digest) && !repo.is_empty()).then_some((repo, digest))
}

fn is_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// `(repository, digest)` of every digest-pinned `image:` line of `compose`, in file order.
pub fn pins(compose: &str) -> Vec<(String, String)> {
    compose.lines().filter_map(pinned_line).map(|(r, d)| (r.to_string(), d.to_string())).collect()
}

/// `PN_K2_IMAGES`: comma-separated `repo@sha256:<64 hex>` pins (another release's digests, or
/// a test's stand-ins), each for a repository the shipped compose file pins.
pub fn parse_images(s: &str) -> Result<Vec<(String, String)>, String> {
    let shipped = pins(DOCKER_COMPOSE_YML);
    let mut out: Vec<(String, String)> = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (repo, digest) = item.split_once('@').ok_or_else(|| format!("k2_images: {:?} is not repo@sha256:<digest>", clip(item)))?;
        if !is_digest(digest) {
            return Err(format!("k2_images: {:?} has no sha256 digest (64 lower-case hex)", clip(item)));
        }
        if !shipped.iter().any(|(r, _)| r == repo) {
            return Err(format!("k2_images: {:?} is not an image the stack pins", clip(repo)));
        }
        if out.iter().any(|(r, _)| r == repo) {
            return Err(format!("k2_images: {:?} given twice", clip(repo)));
        }
        out.push((repo.to_string(), digest.to_string()));
    }
    Ok(out)
}

fn clip(s: &str) -> String {
    s.chars().take(80).collect()
}

/// `compose` with the digests of `images` in place of its own pins for those repositories;
/// every other byte unchanged.
pub fn repin(compose: &str, images: &[(String, String)]) -> Result<String, String> {
    let mut out = String::with_capacity(compose.len());
    let mut used = 0;
    for line in compose.split_inclusive('\n') {
        match pinned_line(line).and_then(|(repo, old)| images.iter().find(|(r, _)| r == repo).map(|(_, new)| (old, new))) {
            Some((old, new)) => {
                out.push_str(&line.replacen(old, new, 1));
                used += 1;
            }
            None => out.push_str(line),
        }
    }
    if used < images.len() {
        return Err("k2_images names an image the compose file does not pin".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    #[test]
    fn repin_replaces_only_the_named_digest() {
        let c = "services:\n  a:\n    image: kaitu/k2s:${K2_VERSION:?x}@sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n  b:\n    image: kaitu/k2-sidecar:${K2_VERSION:?x}@sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\n";
        assert_eq!(pins(c).len(), 2);
        let r = repin(c, &[("kaitu/k2s".into(), D1.into())]).unwrap();
        assert_eq!(pins(&r), vec![("kaitu/k2s".to_string(), D1.to_string()), ("kaitu/k2-sidecar".to_string(), format!("sha256:{}", "b".repeat(64)))]);
        assert_eq!(r.len(), c.len());
        assert!(repin(c, &[("other/x".into(), D1.into())]).is_err());
        assert_eq!(repin(c, &[]).unwrap(), c);
    }

    #[test]
    fn k2_images_are_checked() {
        let shipped = pins(DOCKER_COMPOSE_YML);
        if let Some((repo, _)) = shipped.first() {
            assert_eq!(parse_images(&format!(" {repo}@{D1} ")).unwrap(), vec![(repo.clone(), D1.to_string())]);
            assert!(parse_images(&format!("{repo}@{D1},{repo}@{D1}")).is_err());
            assert!(parse_images(&format!("{repo}:1.0")).is_err());
            assert!(parse_images(&format!("{repo}@sha256:abc")).is_err());
        }
        assert!(parse_images(&format!("evil/x@{D1}")).is_err());
        assert!(parse_images("").unwrap().is_empty());
    }
}
