//! The supervisor's child: how one is started, health-checked, restarted with back-off and
//! stopped, and the stack file it keeps current.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::Signal;
use secrecy::{ExposeSecret, SecretString};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use super::*;

// ---------------------------------------------------------------------------------------------
// children

#[derive(Debug, Clone)]
pub(super) enum Health {
    Tcp(u16),
    Http(Vec<String>),
}

pub(super) struct ChildSpec {
    pub(super) name: String,
    pub(super) program: PathBuf,
    pub(super) args: Vec<String>,
    pub(super) env: Vec<(String, String)>,
    pub(super) secret_env: Vec<(String, SecretString)>,
    pub(super) log: PathBuf,
    /// Ports this child listens on, checked before every start.
    pub(super) ports: Vec<(u16, String)>,
    pub(super) health: Health,
}

impl ChildSpec {
    pub(super) fn spawn(&self) -> anyhow::Result<Child> {
        for (port, what) in &self.ports {
            ensure_free(*port, what)?;
        }
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("open {}", self.log.display()))?;
        let _ = writeln!(log, "--- pnctl: starting {} at {} ---", self.name, crate::events::rfc3339_ms(kit::now_ms()));
        let err = log.try_clone()?;
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            // Its own process group: a terminal's Ctrl-C reaches only pnctl, which stops the
            // children in order (services before center-sim before NATS).
            .process_group(0)
            // A safety net for a supervisor that unwinds without stopping its children.
            .kill_on_drop(true);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        for (k, v) in &self.secret_env {
            cmd.env(k, v.expose_secret());
        }
        cmd.spawn().with_context(|| format!("start {} ({})", self.name, self.program.display()))
    }

    pub(super) async fn healthy(&self, http: &reqwest::Client) -> bool {
        match &self.health {
            Health::Tcp(port) => {
                TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], *port)), Duration::from_millis(300)).is_ok()
            }
            Health::Http(urls) => {
                for u in urls {
                    if !crate::http::answers(http, u).await {
                        return false;
                    }
                }
                true
            }
        }
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL.
pub(super) async fn terminate(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        signal(pid, Signal::SIGTERM);
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

/// The supervisor's shared view, mirrored to stack.json on every change.
pub(super) struct Shared {
    pub(super) dir: PathBuf,
    pub(super) file: Mutex<StackFile>,
    pub(super) exits: Mutex<BTreeMap<String, u32>>,
}

impl Shared {
    pub(super) fn update(&self, f: impl FnOnce(&mut StackFile)) {
        let mut g = match self.file.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut g);
        if let Err(e) = g.write(&self.dir) {
            say(&format!("cannot write stack.json: {e:#}"));
        }
    }

    pub(super) fn snapshot(&self) -> StackFile {
        match self.file.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub(super) fn set_pid(&self, name: &str, pid: Option<u32>) {
        self.update(|s| {
            if name == NATS {
                s.nats_pid = pid;
            } else if let Some(e) = s.services.get_mut(name) {
                e.pid = pid;
            }
        });
    }

    pub(super) fn exited(&self, name: &str) -> u32 {
        let mut g = match self.exits.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let n = g.entry(name.to_string()).or_default();
        *n += 1;
        *n
    }

    pub(super) fn exits(&self, name: &str) -> u32 {
        match self.exits.lock() {
            Ok(g) => g.get(name).copied().unwrap_or(0),
            Err(p) => p.into_inner().get(name).copied().unwrap_or(0),
        }
    }
}

/// One timestamped line of the supervisor's live view (stderr; the log file when detached).
pub(super) fn say(msg: &str) {
    let ts = crate::events::rfc3339_ms(kit::now_ms());
    let hms = ts.get(11..19).unwrap_or(&ts);
    // Never panics on a closed stderr (`pnctl up | head`): the supervisor must outlive its view.
    let _ = writeln!(std::io::stderr(), "{hms} pnctl: {msg}");
}

pub(super) fn human(d: Duration) -> String {
    crate::events::human_ms(d.as_millis() as i64)
}

/// Keeps one child alive until `stop`: restarts it with back-off when it dies.
pub(super) async fn supervise(spec: Arc<ChildSpec>, mut child: Child, shared: Arc<Shared>, stop: CancellationToken) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let started = Instant::now();
        let status = tokio::select! {
            st = child.wait() => st,
            _ = stop.cancelled() => {
                terminate(&mut child, CHILD_GRACE).await;
                shared.set_pid(&spec.name, None);
                return;
            }
        };
        let ran = started.elapsed();
        if ran >= STABLE_AFTER {
            backoff = MIN_BACKOFF;
        }
        shared.exited(&spec.name);
        shared.set_pid(&spec.name, None);
        let how = status.map(|s| s.to_string()).unwrap_or_else(|e| format!("wait failed: {e}"));
        say(&format!("{} exited ({how}) after {}; restarting in {}", spec.name, human(ran), human(backoff)));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            match spec.spawn() {
                Ok(c) => {
                    child = c;
                    let pid = child.id();
                    let mut n = 0;
                    shared.update(|s| {
                        let r = s.restarts.entry(spec.name.clone()).or_default();
                        *r += 1;
                        n = *r;
                        if spec.name == NATS {
                            s.nats_pid = pid;
                        } else if let Some(e) = s.services.get_mut(&spec.name) {
                            e.pid = pid;
                        }
                    });
                    say(&format!("{} restarted (pid {}, restart #{n})", spec.name, pid.unwrap_or(0)));
                    break;
                }
                Err(e) => say(&format!("{}: restart failed: {e:#}; next try in {}", spec.name, human(backoff))),
            }
        }
    }
}
