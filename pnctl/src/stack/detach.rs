//! The stack in the background: `pnctl up --detach` (re-executes pnctl as a daemon supervisor)
//! and `pnctl down` (signals the supervisor recorded in stack.json, nothing else).

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::Signal;

use super::*;

/// Called first thing by the background supervisor of `--detach`: a new session, so that the
/// terminal closing (SIGHUP) or its Ctrl-C do not reach it.
pub fn become_daemon() {
    let _ = nix::unistd::setsid();
}

/// A stack started in the background by this process.
pub struct Detached {
    pub stack: StackFile,
    /// The background supervisor (reap it after `down` when this process lives on).
    pub child: std::process::Child,
}

/// `pnctl up --detach`: re-executes pnctl as a background supervisor (its own session,
/// output to `<data_dir>/logs/pnctl.log`) and returns once the stack is healthy.
pub async fn up_detached(opts: &UpOptions) -> anyhow::Result<Detached> {
    let layout = Layout::create(&opts.data_dir)?;
    check_not_running(&layout.root)?;
    // Fail here, with the clear message, rather than in a log file nobody reads.
    find_nats_server()?;
    for b in [CENTER_SIM, INGRESS].into_iter().chain(SERVICES) {
        find_bin(b)?;
    }
    let log_path = layout.log("pnctl");
    let log = OpenOptions::new().create(true).append(true).open(&log_path).with_context(|| format!("open {}", log_path.display()))?;
    let exe = std::env::current_exe().context("locate the pnctl executable")?;
    // argv[0] "pnctl": the multi-call `pnp` (whose current_exe this may be) dispatches on it,
    // and `down` recognises the supervisor by it (`is_supervisor`).
    let mut child = std::process::Command::new(exe)
        .arg0("pnctl")
        .arg("up")
        .arg("--daemon")
        .arg("--data-dir")
        .arg(&layout.root)
        .arg("--ready-timeout")
        .arg(format!("{}s", opts.ready_timeout.as_secs()))
        .args(opts.port_args())
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()
        .context("start the background supervisor")?;
    let pid = child.id();
    let deadline = Instant::now() + opts.ready_timeout + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "the stack did not start (background supervisor exited: {status}); the end of {}:\n{}",
                log_path.display(),
                log_tail(&log_path, 25)
            );
        }
        if let Ok(s) = StackFile::read(&layout.root)
            && s.supervisor_pid == pid
            && s.state == StackState::Ready
        {
            return Ok(Detached { stack: s, child });
        }
        if Instant::now() >= deadline {
            signal(pid, Signal::SIGTERM);
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
            bail!("the stack was not ready in time; see {}:\n{}", log_path.display(), log_tail(&log_path, 25));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `pnctl down`: SIGTERM to the supervisor recorded in stack.json, then wait until it and
/// every child it recorded are gone. Returns what it did, for the operator.
pub async fn down(data_dir: &Path) -> anyhow::Result<String> {
    let Ok(stack) = StackFile::read(data_dir) else {
        return Ok(format!("no stack in {} (no stack.json)", data_dir.display()));
    };
    let sup = stack.supervisor_pid;
    let mut did = Vec::new();
    if is_supervisor(sup) {
        signal(sup, Signal::SIGTERM);
        // The supervisor gives each child CHILD_GRACE; allow for all three tiers.
        if !wait_gone(sup, CHILD_GRACE * 3 + Duration::from_secs(5)).await {
            signal(sup, Signal::SIGKILL);
            wait_gone(sup, Duration::from_secs(2)).await;
            did.push(format!("supervisor pid {sup} did not stop in time and was killed"));
        } else {
            did.push(format!("stopped the stack (supervisor pid {sup})"));
        }
    }
    // Re-read: the supervisor may have restarted a child since the first read.
    let last = StackFile::read(data_dir).unwrap_or(stack);
    let leftovers = stop_leftovers(&last).await;
    if !leftovers.is_empty() {
        did.push(format!("stopped leftovers: {}", leftovers.join(", ")));
    }
    if did.is_empty() {
        return Ok(format!("no stack is running in {}", data_dir.display()));
    }
    Ok(did.join("; "))
}
