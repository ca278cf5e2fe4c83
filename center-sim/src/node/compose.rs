//! What `docker compose pull` and `up -d` check on an emulated node before anything runs, as
//! compose v2 and a registry would: the compose file must parse, every `${VAR}` it uses must
//! interpolate from the project's `.env` (a `${VAR:?msg}` without a value is compose's error),
//! every service needs an image, and every image must exist in the simulated registry
//! ([`REGISTRY`]: pinned tags only — no `latest`, no unknown tag). Beyond compose, the
//! runbook's stack must be there: services `k2s` and `k2-sidecar` (runbook step 6), whose
//! containers `docker logs` then finds by their `container_name`.
//!
//! Never: read a secret into an error text (values are never quoted, only variable names).

use std::collections::BTreeMap;

use serde_yaml::Value;

/// The simulated registry: repository → the tags it holds, each with its manifest's digest
/// (made up: the sha256 of `center-sim registry <repo>:<tag>`; the pins in
/// `deploy/node/docker-compose.yml` are these). Raise it with the deployer's
/// `DEFAULT_K2_VERSION` and the compose file's pins (the pipeline tests fail on a tag or a
/// digest missing here, as a real pull would).
pub const REGISTRY: &[(&str, &[(&str, &str)])] = &[
    (
        "kaitu/k2s",
        &[
            ("1.0.0", "sha256:799966d22aafcd70e78e3f6e1fdbc3770b7fe2a305e766a0a8ffce5e51854e53"),
            ("1.4.2", "sha256:57b8d49e77c8e89b273b35ffbfe42e2bc12fc83de434aff2a20db4f761c07835"),
            ("1.5.0", "sha256:ed3d101906f6979a96414ef5034d3faa951dd12a4ccb34fe9a0dff1d917ac1a2"),
            ("1.6.0", "sha256:77a28959c2a21a335958f8ba7bf2042bab9777b0ba57b29ffbcb287775b0c101"),
            ("1.6.1", "sha256:86228fb18ca35bc87575e20feccc3c3f592995809b48982ec326b77bd3d665a6"),
            ("1.6.2", "sha256:353071ae68e35bdbb0f56bf5482cde4aabd67d701a3452910ea76a7a0f454fd3"),
            ("1.6.3", "sha256:618ff6ce9b464ba02db80d708d1914c39631c6986dbb1745b452c156d84b27b7"),
        ],
    ),
    (
        "kaitu/k2-sidecar",
        &[
            ("1.0.0", "sha256:f5ffbd9fffcb5a5efba5290fa6fcbe9d58a4d235a4c89f2b3093b4d27c95b299"),
            ("1.4.2", "sha256:f3e2bfe8c27a6ea6745e27b324832ac562b47902300abc14af05d60aadbe5546"),
            ("1.5.0", "sha256:0ee11117b1d0ee050df5ae07377ae5b9eb5f8a2533ff0c8d7701fe9ca20cd7fa"),
            ("1.6.0", "sha256:6e19817cc58d4cc5077990e46478a5a98724b91d28b5a25dd730e80db31f89d6"),
            ("1.6.1", "sha256:488cf036d4d9bdf2caaef9da5cd22b920d73dadba3df9ed1cb6a0a22b501556c"),
            ("1.6.2", "sha256:e8057233d3267b2a10426fe6085f9c6454468d36cc562367b332aa1e32eef98c"),
            ("1.6.3", "sha256:bf36d38cbfb8cf989fce6548572d7df90dff4a2326ca06346a718cf85d7f1944"),
        ],
    ),
];

/// The services runbook step 6 deploys (its checks read their containers' logs by name).
pub const RUNBOOK_SERVICES: [&str; 2] = ["k2s", "k2-sidecar"];

/// A service of a loaded project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    /// The image reference after interpolation, normalized (`kaitu/k2s:1.6.3`).
    pub image: String,
    pub container: String,
}

/// Why compose refused: the exit status and what it printed on stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u32,
    pub message: String,
}

fn refuse(message: impl Into<String>) -> Refusal {
    Refusal { status: 1, message: message.into() }
}

/// Loads the project: `compose` (the file's bytes), `env` (the `.env` next to it) and
/// `dir_name` (the project directory's last component, the default project name). Checks
/// everything `pull` checks; the services in file order.
pub fn load(compose: &[u8], env: &BTreeMap<String, String>, dir_name: &str) -> Result<Vec<Service>, Refusal> {
    let text = std::str::from_utf8(compose).map_err(|_| refuse("yaml: invalid UTF-8 in docker-compose.yml"))?;
    let doc: Value = serde_yaml::from_str(text).map_err(|e| refuse(format!("yaml: {}", yaml_error(&e))))?;
    let Value::Mapping(top) = doc else {
        return Err(refuse("Top-level object must be a mapping"));
    };
    let doc = interpolate(&Value::Mapping(top), env, "")?;
    let project = doc.get("name").and_then(Value::as_str).map(str::to_string).unwrap_or_else(|| dir_name.to_string());
    let Some(Value::Mapping(services)) = doc.get("services") else {
        return Err(refuse("no service selected: the compose file has no services"));
    };
    let mut out = Vec::new();
    for (k, v) in services {
        let name = k.as_str().ok_or_else(|| refuse("services: a service name must be a string"))?.to_string();
        let image = v.get("image").and_then(Value::as_str).map(str::trim).filter(|i| !i.is_empty());
        let Some(image) = image else {
            return Err(refuse(format!("service {name:?} has neither an image nor a build context specified: invalid compose project")));
        };
        let image = check_image(image)?;
        let container = v.get("container_name").and_then(Value::as_str).map(str::to_string).unwrap_or_else(|| format!("{project}-{name}-1"));
        out.push(Service { name, image, container });
    }
    for want in RUNBOOK_SERVICES {
        if !out.iter().any(|s| s.name == want) {
            return Err(refuse(format!("no such service: {want} (center-sim: runbook step 6 deploys k2s and k2-sidecar)")));
        }
    }
    Ok(out)
}

/// serde_yaml's message without anything it quotes from the document.
fn yaml_error(e: &serde_yaml::Error) -> String {
    match e.location() {
        Some(l) => format!("line {}: the document does not parse", l.line()),
        None => "the document does not parse".into(),
    }
}

/// Normalizes `image` (`docker.io/` and `library/` dropped, `:latest` implied without a
/// digest) and checks that the registry holds it. A digest pin (`repo@sha256:…` or
/// `repo:tag@sha256:…`) must be one the registry holds; with a tag too, it must be that tag's
/// (docker would pull by the digest and ignore the tag: a pin that says one release and runs
/// another is refused here, stricter than docker).
fn check_image(image: &str) -> Result<String, Refusal> {
    let bare = image.strip_prefix("docker.io/").or_else(|| image.strip_prefix("index.docker.io/")).unwrap_or(image);
    let invalid = |r: &str| refuse(format!("invalid reference format: {:?}", r.chars().take(120).collect::<String>()));
    let (name, digest) = match bare.split_once('@') {
        Some((n, d)) => {
            let hex = d.strip_prefix("sha256:").ok_or_else(|| invalid(bare))?;
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                return Err(invalid(bare));
            }
            (n, Some(d))
        }
        None => (bare, None),
    };
    // A colon after the last slash separates the tag (a colon before it is a registry port).
    let (repo, tag) = match name.rfind(':').filter(|i| !name[*i..].contains('/')) {
        Some(i) => (&name[..i], Some(&name[i + 1..])),
        None => (name, if digest.is_some() { None } else { Some("latest") }),
    };
    if repo.is_empty() || tag == Some("") || bare.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(bare));
    }
    let Some((_, tags)) = REGISTRY.iter().find(|(r, _)| *r == repo) else {
        return Err(refuse(format!(
            "Error response from daemon: pull access denied for {repo}, repository does not exist or may require 'docker login': denied: requested access to the resource is denied"
        )));
    };
    let unknown = |what: String| refuse(format!("Error response from daemon: manifest for {what} not found: manifest unknown: manifest unknown"));
    match (tag, digest) {
        (Some(t), None) => tags.iter().any(|(k, _)| *k == t).then(|| format!("{repo}:{t}")).ok_or_else(|| unknown(format!("{repo}:{t}"))),
        (Some(t), Some(d)) => match tags.iter().find(|(k, _)| *k == t) {
            None => Err(unknown(format!("{repo}:{t}"))),
            Some((_, known)) if *known == d => Ok(format!("{repo}:{t}@{d}")),
            Some(_) => Err(unknown(format!("{repo}@{d} (center-sim: not the digest of {repo}:{t})"))),
        },
        (None, Some(d)) => tags.iter().any(|(_, k)| *k == d).then(|| format!("{repo}@{d}")).ok_or_else(|| unknown(format!("{repo}@{d}"))),
        (None, None) => Err(invalid(bare)),
    }
}

/// Interpolates every string in `v` from `env`, as compose does (`$VAR`, `${VAR}`,
/// `${VAR:-default}`, `${VAR-default}`, `${VAR:?message}`, `${VAR?message}`, `$$`).
fn interpolate(v: &Value, env: &BTreeMap<String, String>, path: &str) -> Result<Value, Refusal> {
    Ok(match v {
        Value::String(s) => Value::String(expand(s, env).map_err(|m| refuse(format!("error while interpolating {path}: {m}")))?),
        Value::Sequence(items) => {
            let p = format!("{path}.[]");
            Value::Sequence(items.iter().map(|i| interpolate(i, env, &p)).collect::<Result<_, _>>()?)
        }
        Value::Mapping(m) => {
            let mut out = serde_yaml::Mapping::new();
            for (k, val) in m {
                let key = k.as_str().unwrap_or("?");
                let p = if path.is_empty() { key.to_string() } else { format!("{path}.{key}") };
                out.insert(k.clone(), interpolate(val, env, &p)?);
            }
            Value::Mapping(out)
        }
        Value::Tagged(t) => interpolate(&t.value, env, path)?,
        other => other.clone(),
    })
}

/// One string's interpolation; the error names the variable, never a value.
pub fn expand(s: &str, env: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('{') {
            let end = r.find('}').ok_or_else(|| format!("invalid interpolation format for {s:?}"))?;
            out.push_str(&braced(&r[..end], env)?);
            rest = &r[end + 1..];
        } else {
            let n = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
            if n == 0 {
                return Err(format!("invalid interpolation format for {s:?}"));
            }
            out.push_str(env.get(&after[..n]).map(String::as_str).unwrap_or(""));
            rest = &after[n..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn braced(expr: &str, env: &BTreeMap<String, String>) -> Result<String, String> {
    let n = expr.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(expr.len());
    let (name, op) = expr.split_at(n);
    if name.is_empty() {
        return Err("invalid interpolation format".into());
    }
    let value = env.get(name);
    let set_nonempty = value.is_some_and(|v| !v.is_empty());
    let (kind, arg) = if let Some(a) = op.strip_prefix(":-") {
        (":-", a)
    } else if let Some(a) = op.strip_prefix(":?") {
        (":?", a)
    } else if let Some(a) = op.strip_prefix('-') {
        ("-", a)
    } else if let Some(a) = op.strip_prefix('?') {
        ("?", a)
    } else if op.is_empty() {
        ("", "")
    } else {
        return Err(format!("invalid interpolation format for ${{{name}…}}"));
    };
    Ok(match kind {
        ":-" if !set_nonempty => expand(arg, env)?,
        "-" if value.is_none() => expand(arg, env)?,
        ":?" if !set_nonempty => return Err(format!("required variable {name} is missing a value: {arg}")),
        "?" if value.is_none() => return Err(format!("required variable {name} is missing a value: {arg}")),
        _ => value.cloned().unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const DEPLOYED: &str = include_str!("../../../deploy/node/docker-compose.yml");

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn full(version: &str) -> BTreeMap<String, String> {
        env(&[("K2_VERSION", version), ("K2_CENTER_URL", "http://c"), ("K2_NODE_SECRET", "s")])
    }

    #[test]
    fn the_deployers_stack_loads_with_a_pinned_version() {
        let s = load(DEPLOYED.as_bytes(), &full("1.6.3"), "kaitu-slave").unwrap();
        let v: Vec<(&str, &str, &str)> = s.iter().map(|s| (s.name.as_str(), s.image.as_str(), s.container.as_str())).collect();
        let pin = |repo: &str| {
            let d = REGISTRY.iter().find(|r| r.0 == repo).and_then(|r| r.1.iter().find(|t| t.0 == "1.6.3")).unwrap().1;
            format!("{repo}:1.6.3@{d}")
        };
        let (k2s, sidecar) = (pin("kaitu/k2s"), pin("kaitu/k2-sidecar"));
        assert_eq!(v, [("k2s", k2s.as_str(), "k2s"), ("k2-sidecar", sidecar.as_str(), "k2-sidecar")]);
        // Another release's tag on these pins: docker would run 1.6.3's image and call it
        // 1.6.2; refused.
        let e = load(DEPLOYED.as_bytes(), &full("1.6.2"), "kaitu-slave").unwrap_err().message;
        assert!(e.contains("not the digest of kaitu/k2s:1.6.2"), "{e}");
    }

    #[test]
    fn digest_pins() {
        let r = |image: &str| check_image(image).map_err(|e| e.message);
        let d163 = REGISTRY[0].1.iter().find(|t| t.0 == "1.6.3").unwrap().1;
        assert_eq!(r(&format!("kaitu/k2s@{d163}")).unwrap(), format!("kaitu/k2s@{d163}"));
        assert_eq!(r(&format!("docker.io/kaitu/k2s:1.6.3@{d163}")).unwrap(), format!("kaitu/k2s:1.6.3@{d163}"));
        let other = format!("sha256:{}", "0".repeat(64));
        assert!(r(&format!("kaitu/k2s@{other}")).unwrap_err().contains("manifest unknown"));
        assert!(r(&format!("kaitu/k2s:1.6.3@{other}")).unwrap_err().contains("not the digest of kaitu/k2s:1.6.3"));
        for bad in ["kaitu/k2s@sha256:abc", "kaitu/k2s@md5:00", &format!("kaitu/k2s@sha256:{}", "A".repeat(64))] {
            assert!(r(bad).unwrap_err().contains("invalid reference format"), "{bad}");
        }
    }

    #[test]
    fn refusals() {
        let r = |text: &str, e: &BTreeMap<String, String>| load(text.as_bytes(), e, "kaitu-slave").unwrap_err().message;
        // An unknown or unpinned tag, an unknown repository.
        assert!(r(DEPLOYED, &full("9.9.9")).contains("manifest for kaitu/k2s:9.9.9 not found"));
        assert!(r(DEPLOYED, &full("latest")).contains("manifest unknown"));
        let unpinned = "services:\n  k2s:\n    image: kaitu/k2s\n  k2-sidecar:\n    image: kaitu/k2-sidecar:1.6.3\n";
        assert!(r(unpinned, &env(&[])).contains("kaitu/k2s:latest not found"));
        let other = "services:\n  k2s:\n    image: evil/k2s:1.6.3\n  k2-sidecar:\n    image: kaitu/k2-sidecar:1.6.3\n";
        assert!(r(other, &env(&[])).contains("pull access denied for evil/k2s"));
        // A required variable without a value (the secret's value is never quoted).
        let e = r(DEPLOYED, &env(&[("K2_VERSION", "1.6.3"), ("K2_NODE_SECRET", "s3cr3t")]));
        assert!(e.contains("required variable K2_CENTER_URL is missing a value") && !e.contains("s3cr3t"), "{e}");
        assert!(r(DEPLOYED, &env(&[])).contains("K2_VERSION"));
        // Does not parse; not a mapping; no services; a runbook service missing; no image.
        assert!(r("services: [\n", &env(&[])).starts_with("yaml: "));
        assert!(r("- a\n", &env(&[])).contains("mapping"));
        assert!(r("services: {}\n", &env(&[])).contains("no such service: k2s"));
        assert!(r("x: 1\n", &env(&[])).contains("no service"));
        let no_sidecar = "services:\n  k2s:\n    image: kaitu/k2s:1.6.3\n";
        assert!(r(no_sidecar, &env(&[])).contains("no such service: k2-sidecar"));
        let no_image = "services:\n  k2s: {}\n  k2-sidecar:\n    image: kaitu/k2-sidecar:1.6.3\n";
        assert!(r(no_image, &env(&[])).contains("neither an image"));
    }

    #[test]
    fn container_names_default_to_compose_s() {
        let text = "name: p\nservices:\n  k2s:\n    image: docker.io/kaitu/k2s:1.6.3\n  k2-sidecar:\n    image: kaitu/k2-sidecar:${V:-1.6.2}\n";
        let s = load(text.as_bytes(), &env(&[]), "d").unwrap();
        assert_eq!((s[0].image.as_str(), s[0].container.as_str()), ("kaitu/k2s:1.6.3", "p-k2s-1"));
        assert_eq!((s[1].image.as_str(), s[1].container.as_str()), ("kaitu/k2-sidecar:1.6.2", "p-k2-sidecar-1"));
    }

    #[test]
    fn interpolation_follows_compose() {
        let e = env(&[("A", "x"), ("E", "")]);
        assert_eq!(expand("$A-${A}-$$A", &e).unwrap(), "x-x-$A");
        assert_eq!(expand("${E:-d}|${E-d}|${U-d}|${U:-d}", &e).unwrap(), "d||d|d");
        assert!(expand("${E:?need E}", &e).unwrap_err().contains("required variable E"));
        assert_eq!(expand("${E?need E}", &e).unwrap(), "");
        assert!(expand("${U?need}", &e).is_err());
        assert!(expand("${A", &e).is_err());
        assert!(expand("$-", &e).is_err());
    }
}
