//! The processes of a stack: is a pid alive and ours, signals, waiting for an exit, log tails.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::*;

// ---------------------------------------------------------------------------------------------
// processes

/// Alive and not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    if pid == 0 || kill(Pid::from_raw(pid as i32), None).is_err() {
        return false;
    }
    // A zombie still answers kill(0); its state letter in /proc/<pid>/stat is Z.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with('Z')).unwrap_or(true),
        Err(_) => true,
    }
}

/// The file name of a process's argv[0].
pub(super) fn proc_name(pid: u32) -> Option<String> {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let argv0 = cmdline.split(|b| *b == 0).next()?;
    let argv0 = String::from_utf8_lossy(argv0);
    Path::new(argv0.as_ref()).file_name().map(|n| n.to_string_lossy().into_owned())
}

/// A live pnctl process (guards against a recycled pid).
pub(super) fn is_supervisor(pid: u32) -> bool {
    pid_alive(pid) && proc_name(pid).is_some_and(|n| n.starts_with("pnctl"))
}

/// A live process that is the named child (guards against a recycled pid).
pub(super) fn is_child(pid: u32, name: &str) -> bool {
    pid_alive(pid) && proc_name(pid).is_some_and(|n| n == name)
}

pub(super) fn signal(pid: u32, sig: Signal) {
    let _ = kill(Pid::from_raw(pid as i32), sig);
}

/// Waits until `pid` is gone; false on timeout.
pub(super) async fn wait_gone(pid: u32, patience: Duration) -> bool {
    let deadline = Instant::now() + patience;
    while Instant::now() < deadline {
        if !pid_alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    !pid_alive(pid)
}

/// Stops children a dead supervisor left behind (SIGKILLed, crashed). Only pids listed in
/// stack.json whose process still carries the child's name are touched.
pub(super) async fn stop_leftovers(stack: &StackFile) -> Vec<String> {
    let mut stopped = Vec::new();
    for (name, pid) in stack.child_pids() {
        if is_child(pid, &name) {
            signal(pid, Signal::SIGTERM);
            if !wait_gone(pid, CHILD_GRACE).await {
                signal(pid, Signal::SIGKILL);
                wait_gone(pid, Duration::from_secs(2)).await;
            }
            stopped.push(format!("{name} (pid {pid})"));
        }
    }
    stopped
}

/// The last `lines` lines of a log file, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(_) => return format!("({} is missing)", path.display()),
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].iter().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_process_is_recognised_and_dead_pids_are_not() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(0));
        assert!(!is_child(std::process::id(), "nats-server"));
    }
}
