//! The supervisor's exclusive lock on a data dir: one stack per data dir.

use std::fs::{File, OpenOptions};
use std::path::Path;

use anyhow::{Context, bail};

use super::*;

/// The supervisor's exclusive lock on a data dir; a second `up` finds it taken.
pub(super) struct StackLock(#[allow(dead_code)] nix::fcntl::Flock<File>);

/// Takes the lock on `root`; refuses when a supervisor already runs there (recorded in
/// stack.json and alive, or holding the lock).
pub(super) fn lock(root: &Path) -> anyhow::Result<StackLock> {
    if let Ok(s) = StackFile::read(root)
        && s.state != StackState::Stopped
        && is_supervisor(s.supervisor_pid)
        && s.supervisor_pid != std::process::id()
    {
        return Err(already_running(root));
    }
    let path = root.join("supervisor.lock");
    let f = OpenOptions::new().create(true).truncate(false).write(true).open(&path).with_context(|| format!("open {}", path.display()))?;
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(StackLock(l)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(already_running(root)),
        Err((_, e)) => bail!("lock {}: {e}", path.display()),
    }
}

fn already_running(root: &Path) -> anyhow::Error {
    let pid = StackFile::read(root).map(|s| s.supervisor_pid).unwrap_or(0);
    anyhow::anyhow!(
        "a stack is already running in {} (supervisor pid {pid}); use it, or stop it with `pnctl down`",
        root.display()
    )
}

/// Refuses when a supervisor already runs on `root`.
pub(super) fn check_not_running(root: &Path) -> anyhow::Result<()> {
    drop(lock(root)?);
    Ok(())
}
