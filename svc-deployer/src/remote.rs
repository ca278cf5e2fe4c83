//! One node over SSH: the command lines the deployer sends (exactly the runbook's forms),
//! reaching the node on the fresh or the hardened port with bounded, jittered back-off,
//! TOFU pinning, and steps retried over ONE reused session (reconnecting only when the link
//! drops). Every text that leaves this module is scrubbed of the operation's secrets.
//!
//! Never: a secret in a command line (secrets go on stdin), or `docker compose down`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use kit::ssh::{self, Output, Session, SshError, Target};
use russh::keys::PrivateKey;

use crate::scrub::Scrubber;
use crate::settings::SshSettings;

/// The node commands, built from the privilege prefix and the deploy dir.
#[derive(Debug, Clone)]
pub struct Commands {
    sudo: String,
    dir: String,
}

/// A path as one shell word: bare when it needs no quoting (the form the runbook shows).
pub fn shell_word(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'_' | b'-' | b'+' | b':' | b'@')) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

impl Commands {
    pub fn new(sudo: &str, deploy_dir: &str) -> Commands {
        Commands { sudo: sudo.trim().to_string(), dir: deploy_dir.trim_end_matches('/').to_string() }
    }

    fn privileged(&self, cmd: &str) -> String {
        if self.sudo.is_empty() { cmd.to_string() } else { format!("{} {cmd}", self.sudo) }
    }

    fn path(&self, file: &str) -> String {
        shell_word(&format!("{}/{file}", self.dir))
    }

    /// The reachability probe.
    pub fn probe(&self) -> String {
        "true".into()
    }

    /// Seed 001 §3.c's check, without `--wait` (a wait would hold the session): whether
    /// cloud-init finished, and how.
    pub fn cloud_init_status(&self) -> String {
        "cloud-init status".into()
    }

    /// Runs the script that arrives on stdin as root (runbook step 4's script-pipe form).
    pub fn prep(&self) -> String {
        self.privileged("bash -s")
    }

    pub fn mkdir(&self) -> String {
        self.privileged(&format!("mkdir -p {}", shell_word(&self.dir)))
    }

    /// Writes stdin to `<dir>/<file>` (runbook step 5/6: content never on the command line).
    pub fn write(&self, file: &str) -> String {
        self.privileged(&format!("tee {} > /dev/null", self.path(file)))
    }

    pub fn chmod_600(&self, file: &str) -> String {
        self.privileged(&format!("chmod 600 {}", self.path(file)))
    }

    pub fn compose_pull(&self) -> String {
        self.compose("pull")
    }

    /// `up -d` — updates use pull + up -d, never `down` (runbook guardrail).
    pub fn compose_up(&self) -> String {
        self.compose("up -d")
    }

    fn compose(&self, action: &str) -> String {
        format!("cd {} && {}", shell_word(&self.dir), self.privileged(&format!("docker compose -f docker-compose.yml {action}")))
    }
}

/// Why a node could not be worked on.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RemoteError {
    /// The node offered another host key than the pinned one. Never retried.
    #[error("{0}")]
    HostKeyChanged(String),
    /// The admin key was refused for the whole patience.
    #[error("{0}")]
    AuthRefused(String),
    /// Not reachable within the patience, or the link kept dropping.
    #[error("{0}")]
    Transient(String),
    /// The node sent more output than `kit::ssh::OUTPUT_CAP`: the step fails, never retried.
    #[error("{0}")]
    OutputTooLarge(String),
    /// The command ran and kept failing.
    #[error("step `{step}` exited {status} after {tries} tries{}", if .tail.is_empty() { String::new() } else { format!(": {}", .tail) })]
    Failed { step: String, status: u32, tries: u32, tail: String },
}

impl RemoteError {
    fn from_ssh(e: &SshError, scrub: &Scrubber) -> RemoteError {
        let text = scrub.clean(&e.to_string());
        match e {
            SshError::HostKeyChanged { .. } => RemoteError::HostKeyChanged(text),
            SshError::AuthRefused { .. } => RemoteError::AuthRefused(text),
            SshError::OutputTooLarge { .. } => RemoteError::OutputTooLarge(text),
            _ => RemoteError::Transient(text),
        }
    }
}

struct Live {
    session: Session,
    port: u16,
    user: String,
}

/// A node reached as `user@host` with one account's admin key: before the prep as the image's
/// login user, after it as the node's admin (`kit::cloud::admin_user`: the same user, or for
/// a root login the admin user the prep made — root may not log in any more).
pub struct Remote {
    host: String,
    user: String,
    admin: String,
    key: Arc<PrivateKey>,
    cfg: SshSettings,
    pinned: Option<String>,
    prepared: bool,
    live: Option<Live>,
    scrub: Scrubber,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Remote({}@{})", self.user, self.host)
    }
}

impl Remote {
    /// `user`: the login user (the image's, or `PN_SSH__USER`); `pinned`: the host key
    /// recorded for this instance; `prepared`: the OS prep is done, so the hardened port is
    /// tried first.
    #[allow(clippy::too_many_arguments)]
    pub fn new(host: &str, user: &str, key: Arc<PrivateKey>, cfg: &SshSettings, pinned: Option<String>, prepared: bool, scrub: Scrubber) -> Remote {
        let admin = kit::cloud::admin_user(user).to_string();
        Remote { host: host.to_string(), user: user.to_string(), admin, key, cfg: cfg.clone(), pinned, prepared, live: None, scrub }
    }

    /// The user of the open session, else the one the node is reached as now (its admin once
    /// the prep is done).
    pub fn user(&self) -> &str {
        match &self.live {
            Some(l) => &l.user,
            None if self.prepared => &self.admin,
            None => &self.user,
        }
    }

    /// The users to try, the likely one first: a run may have died between the prep and
    /// recording it (root is refused then), or before the prep (the admin may not exist).
    fn users(&self) -> Vec<String> {
        let mut v = if self.prepared { vec![self.admin.clone(), self.user.clone()] } else { vec![self.user.clone(), self.admin.clone()] };
        v.dedup();
        v
    }

    /// The port of the open session, if one is open.
    pub fn live_port(&self) -> Option<u16> {
        self.live.as_ref().map(|l| l.port)
    }

    /// `text` with the operation's secrets masked.
    pub fn scrub(&self, text: &str) -> String {
        self.scrub.clean(text)
    }

    /// The pinned host key (learned on the first connect when none was given).
    pub fn host_key(&self) -> Option<&str> {
        self.pinned.as_deref()
    }

    /// The order to try: where the node should be first, then the other port (a run may
    /// have died between the prep hardening SSH and recording it).
    fn ports(&self) -> Vec<u16> {
        let (f, h) = (self.cfg.fresh_port, self.cfg.hardened_port);
        let mut v = if self.prepared { vec![h, f] } else { vec![f, h] };
        v.dedup();
        v
    }

    async fn try_ports(&self, ports: &[u16]) -> Result<Live, SshError> {
        let mut refused = None;
        let mut others = Vec::new();
        let users = self.users();
        for &port in ports {
            for user in &users {
                let target = Target {
                    host: self.host.clone(),
                    port,
                    user: user.clone(),
                    key: self.key.clone(),
                    pinned: self.pinned.clone(),
                    connect_timeout: self.cfg.connect_timeout(),
                };
                match ssh::connect(&target).await {
                    Ok(session) => return Ok(Live { session, port, user: user.clone() }),
                    Err(e @ SshError::HostKeyChanged { .. }) => return Err(e),
                    // An auth refusal says more than a closed port: it is the answer.
                    Err(e @ SshError::AuthRefused { .. }) => refused = Some(e),
                    // A closed port refuses every user alike.
                    Err(e) => {
                        others.push(e.to_string());
                        break;
                    }
                }
            }
        }
        Err(refused.unwrap_or_else(|| SshError::Unreachable { addr: self.host.clone(), msg: others.join("; ") }))
    }

    /// Makes sure a session is open, waiting up to `reach_patience` for the node to answer.
    /// Returns the host key when it was learned now (the caller pins it before any command).
    pub async fn connect(&mut self) -> Result<Option<String>, RemoteError> {
        if self.live.is_some() {
            return Ok(None);
        }
        let deadline = Instant::now() + self.cfg.reach_patience();
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(500))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .without_max_times();
        let host = self.host.clone();
        let ports = self.ports();
        let res = (|| self.try_ports(&ports))
            .retry(backoff)
            // The admin key may not be installed yet while cloud-init runs: refusals are
            // retried too, until the patience is spent. A changed host key never is.
            .when(|e: &SshError| !matches!(e, SshError::HostKeyChanged { .. }) && Instant::now() < deadline)
            .notify(|e: &SshError, d: Duration| tracing::debug!(%host, error = %e, retry_in_ms = d.as_millis() as u64, "node not reachable yet"))
            .await;
        let live = res.map_err(|e| RemoteError::from_ssh(&e, &self.scrub))?;
        tracing::info!(host = %self.host, port = live.port, user = %live.user, "ssh session open");
        let learned = if self.pinned.is_none() {
            self.pinned = Some(live.session.host_key.clone());
            self.pinned.clone()
        } else {
            None
        };
        self.live = Some(live);
        Ok(learned)
    }

    /// A session on exactly `port`, reached from here (outside the node) within `patience`:
    /// the open one if it is on that port, else a new one (the same pin). Seed 001's "SSH
    /// never responded" check for the hardened port: nothing falls back to another port.
    pub async fn connect_on(&mut self, port: u16, patience: Duration) -> Result<(), RemoteError> {
        if self.live.as_ref().is_some_and(|l| l.port == port) {
            return Ok(());
        }
        self.disconnect().await;
        let deadline = Instant::now() + patience;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(300))
            .with_max_delay(Duration::from_secs(3))
            .with_jitter()
            .without_max_times();
        let only = [port];
        let res = (|| self.try_ports(&only))
            .retry(backoff)
            .when(|e: &SshError| !matches!(e, SshError::HostKeyChanged { .. }) && Instant::now() < deadline)
            .await;
        let live = res.map_err(|e| RemoteError::from_ssh(&e, &self.scrub))?;
        tracing::info!(host = %self.host, port, "ssh session open (reached from outside)");
        if self.pinned.is_none() {
            self.pinned = Some(live.session.host_key.clone());
        }
        self.live = Some(live);
        Ok(())
    }

    /// Runs a read-only command once (a dropped link is retried up to `step_attempts` times)
    /// and returns what it printed and its exit status, whatever that is.
    pub async fn query(&mut self, step: &str, command: &str, timeout: Duration) -> Result<Output, RemoteError> {
        let attempts = self.cfg.step_attempts.max(1);
        let mut tries = 0u32;
        loop {
            tries += 1;
            self.connect().await?;
            let res = match &self.live {
                Some(live) => live.session.exec(command, None, timeout).await,
                None => Err(SshError::Protocol("no session".into())),
            };
            match res {
                Ok(out) => return Ok(out),
                Err(e) => {
                    self.disconnect().await;
                    let err = RemoteError::from_ssh(&e, &self.scrub);
                    if matches!(err, RemoteError::HostKeyChanged(_) | RemoteError::OutputTooLarge(_)) || tries >= attempts {
                        return Err(err);
                    }
                    tracing::warn!(host = %self.host, step, tries, error = %err, "query failed; retrying");
                    tokio::time::sleep(self.cfg.retry_delay()).await;
                }
            }
        }
    }

    /// The OS prep is done: from now on the node is on the hardened port. The open session
    /// (on the fresh port) is closed so the next step proves the hardened port works.
    pub async fn prepared(&mut self) {
        self.prepared = true;
        if self.live.as_ref().is_some_and(|l| l.port != self.cfg.hardened_port || l.user != self.admin) {
            self.disconnect().await;
        }
    }

    pub async fn disconnect(&mut self) {
        if let Some(live) = self.live.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), live.session.close()).await;
        }
    }

    /// Runs one idempotent step, retrying a dropped link or a non-zero exit up to
    /// `step_attempts` times with back-off. Reconnects (same pin) when the link dropped.
    pub async fn run(&mut self, step: &str, command: &str, stdin: Option<&[u8]>, timeout: Duration) -> Result<Output, RemoteError> {
        let attempts = self.cfg.step_attempts.max(1);
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(self.cfg.retry_delay())
            .with_max_delay(Duration::from_secs(10))
            .with_jitter()
            .with_max_times(attempts as usize - 1)
            .build();
        let mut tries = 0u32;
        loop {
            tries += 1;
            self.connect().await?;
            let started = Instant::now();
            let res = match &self.live {
                Some(live) => live.session.exec(command, stdin, timeout).await,
                None => Err(SshError::Protocol("no session".into())),
            };
            let err = match res {
                Ok(out) if out.status == 0 => {
                    tracing::info!(host = %self.host, step, elapsed_ms = started.elapsed().as_millis() as u64, "step done");
                    return Ok(out);
                }
                Ok(out) => RemoteError::Failed { step: step.to_string(), status: out.status, tries, tail: self.scrub.clean(&out.stderr_tail()) },
                Err(e) => {
                    // The session is suspect after any transport error: start a fresh one.
                    self.disconnect().await;
                    RemoteError::from_ssh(&e, &self.scrub)
                }
            };
            // A changed host key, or a node that floods us with output, is not retried.
            if matches!(err, RemoteError::HostKeyChanged(_) | RemoteError::OutputTooLarge(_)) {
                return Err(err);
            }
            match delays.next() {
                Some(d) => {
                    tracing::warn!(host = %self.host, step, tries, error = %err, retry_in_ms = d.as_millis() as u64, "step failed; retrying");
                    tokio::time::sleep(d).await;
                }
                None => return Err(err),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_have_the_runbook_shape() {
        let c = Commands::new("sudo", "/apps/kaitu-slave/");
        assert_eq!(c.prep(), "sudo bash -s");
        assert_eq!(c.mkdir(), "sudo mkdir -p /apps/kaitu-slave");
        assert_eq!(c.write(".env"), "sudo tee /apps/kaitu-slave/.env > /dev/null");
        assert_eq!(c.chmod_600(".env"), "sudo chmod 600 /apps/kaitu-slave/.env");
        assert_eq!(c.compose_pull(), "cd /apps/kaitu-slave && sudo docker compose -f docker-compose.yml pull");
        assert_eq!(c.compose_up(), "cd /apps/kaitu-slave && sudo docker compose -f docker-compose.yml up -d");
        assert_eq!(c.cloud_init_status(), "cloud-init status");
        let c = Commands::new("", "/tmp/a b/it's");
        assert_eq!(c.mkdir(), r"mkdir -p '/tmp/a b/it'\''s'");
        assert_eq!(c.write("users"), r"tee '/tmp/a b/it'\''s/users' > /dev/null");
    }
}
