//! The emulated host behind each instance: its SSH host key and sshd port, the deploy dir's
//! files (mirrored to `<data-dir>/<instance-name>/`, mode 600), the emulated containers and
//! their logs, and the NIC counters the sidecar reports.
//!
//! Never: write outside `/apps/kaitu-slave/` (the sim refuses and records it), or log a file's
//! content (the `.env` holds the node's secrets).

pub mod compose;
pub mod host;
pub mod shell;
pub mod sidecar;
pub mod ssh;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::Write;
use std::path::Path;

use russh::keys::PrivateKey;
use tokio_util::sync::CancellationToken;

use crate::sim::{State, Violation};

pub const DEPLOY_DIR: &str = "/apps/kaitu-slave";
pub const ENV_PATH: &str = "/apps/kaitu-slave/.env";
/// Entries of a container's log kept from its end (`docker logs --tail` reads these).
const LOG_LINES: usize = 2000;
/// Entries kept from a container's start (its start-up lines stay findable, as in docker's
/// json-file log, however long the container runs).
const LOG_HEAD: usize = 64;

/// The sshd's current listener.
pub struct Listener {
    pub port: u16,
    pub stop: CancellationToken,
}

/// Emulated host NIC counters (cumulative since boot).
#[derive(Debug, Clone, Default)]
pub struct Nic {
    pub rx: u64,
    pub tx: u64,
    pub boot_id: String,
}

/// How much of a node's reported usage was counted, to turn cumulative counters into
/// `trafficUsedBytes` across reboots.
#[derive(Debug, Clone, Default)]
pub struct UsageTrack {
    boot_id: String,
    last_total: u64,
    base: u64,
}

impl UsageTrack {
    /// Folds in a report; returns the total used across boots.
    pub fn observe(&mut self, boot_id: &str, total: u64) -> u64 {
        if boot_id != self.boot_id || total < self.last_total {
            self.base += self.last_total;
            self.boot_id = boot_id.to_string();
        }
        self.last_total = total;
        self.base + total
    }
}

/// What `cloud-init status` says on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CloudInit {
    #[default]
    Done,
    /// The `cloudInitErrorRate` fault: `status: error`, exit 1.
    Error,
}

impl CloudInit {
    pub fn as_str(self) -> &'static str {
        match self {
            CloudInit::Done => "done",
            CloudInit::Error => "error",
        }
    }
}

pub struct Host {
    pub host_key: PrivateKey,
    /// Cancelled when the instance is deleted: sshd, sessions and sidecar stop.
    pub life: CancellationToken,
    /// sshd's main listener: the fresh port, then (after the prep) the hardened one.
    pub listener: Option<Listener>,
    /// After a Pnp prep (`keep-22`), sshd still listens on the fresh port too until the
    /// deployer's close-22 script; `None` otherwise.
    pub fresh_listener: Option<Listener>,
    pub cloud_init: CloudInit,
    /// The first login on the hardened port (ms since the epoch).
    pub hardened_login_ms: Option<i64>,
    /// When the close-22 script closed the fresh port.
    pub port22_closed_ms: Option<i64>,
    /// The containers' names from the compose file at the last `up -d` (`container_name`,
    /// else `<project>-<service>-1`): `docker logs` finds them by these.
    pub container_names: Option<(String, String)>,
    pub hardened: bool,
    /// The user the prep left as the node's admin (the prep's session user, or for a root
    /// session the one `provision-node.sh` makes); root may not log in once it is set.
    pub admin_user: Option<String>,
    /// Root logins sshd refused after the prep (`PermitRootLogin no`).
    pub root_logins_refused: u32,
    pub prep_runs: u32,
    /// The OS prep started detached (`# pnp:prep-start`), running on without a session.
    pub prep_job: Option<PrepJob>,
    pub up_runs: u32,
    pub containers_up: bool,
    /// Whether the containers were ever created (for `docker logs`).
    pub containers_created: bool,
    pub files: BTreeMap<String, Vec<u8>>,
    pub dirs: BTreeSet<String>,
    pub k2s_log: ContainerLog,
    pub sidecar_log: ContainerLog,
    pub nic: Nic,
    pub sidecar: Option<sidecar::SidecarRun>,
    pub usage: UsageTrack,
}

/// A detached OS prep: started at, and once finished its exit status, duration and output tail.
#[derive(Debug, Clone)]
pub struct PrepJob {
    pub started: std::time::Instant,
    pub result: Option<PrepResult>,
}

#[derive(Debug, Clone)]
pub struct PrepResult {
    pub rc: u32,
    pub ms: u64,
    pub tail: String,
}

pub fn new_host_key() -> PrivateKey {
    let seed: [u8; 32] = rand::random();
    PrivateKey::from(russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed))
}

impl Host {
    pub fn new(life: CancellationToken) -> Host {
        let mut dirs = BTreeSet::new();
        for d in ["/", "/etc", "/home", "/home/ubuntu", "/home/admin", "/home/debian", "/root", "/tmp", "/var"] {
            dirs.insert(d.to_string());
        }
        Host {
            host_key: new_host_key(),
            life,
            listener: None,
            fresh_listener: None,
            cloud_init: CloudInit::Done,
            hardened_login_ms: None,
            port22_closed_ms: None,
            container_names: None,
            hardened: false,
            admin_user: None,
            root_logins_refused: 0,
            prep_runs: 0,
            prep_job: None,
            up_runs: 0,
            containers_up: false,
            containers_created: false,
            files: BTreeMap::new(),
            dirs,
            k2s_log: ContainerLog::default(),
            sidecar_log: ContainerLog::default(),
            nic: Nic::default(),
            sidecar: None,
            usage: UsageTrack::default(),
        }
    }

    /// Power on (first boot or reboot): counters from zero, a new boot id.
    pub fn boot(&mut self) {
        self.nic = Nic { rx: 0, tx: 0, boot_id: crate::new_id("boot") };
    }

    pub fn host_public_key(&self) -> String {
        self.host_key.public_key().to_openssh().unwrap_or_default()
    }

    pub fn shut_down(&mut self) {
        self.life.cancel();
        self.listener = None;
        self.fresh_listener = None;
        self.stop_containers();
    }

    pub fn stop_containers(&mut self) {
        if let Some(s) = self.sidecar.take() {
            s.stop.cancel();
        }
        if self.containers_up {
            self.containers_up = false;
            self.log_k2s("received terminated, shutting down");
            self.log_sidecar("k2-sidecar stopping");
        }
    }

    pub fn log_k2s(&mut self, line: &str) {
        self.k2s_log.push(line);
    }

    pub fn log_sidecar(&mut self, line: &str) {
        self.sidecar_log.push(line);
    }
}

/// One entry of a container's log: a line, or a run of `count` filler lines (the
/// `logNoiseLines` fault) kept as one entry and printed line by line.
#[derive(Debug, Clone)]
enum LogEntry {
    Line(String),
    Noise { ts: String, count: u64 },
}

impl LogEntry {
    fn lines(&self) -> u64 {
        match self {
            LogEntry::Line(_) => 1,
            LogEntry::Noise { count, .. } => *count,
        }
    }
}

/// What `docker logs <container>` shows: every line since the container was first created,
/// timestamped. Bounded: the first `LOG_HEAD` entries and the last `LOG_LINES` are kept (a
/// noise run is one entry), so a long-running node's start-up lines stay in its log.
#[derive(Debug, Clone, Default)]
pub struct ContainerLog {
    head: Vec<LogEntry>,
    tail: VecDeque<LogEntry>,
}

impl ContainerLog {
    pub fn push(&mut self, line: &str) {
        let ts = crate::rfc3339(kit::now_ms());
        self.add(LogEntry::Line(format!("{ts} {line}")));
    }

    /// `count` filler lines (no-op for 0).
    pub fn noise(&mut self, count: u64) {
        if count > 0 {
            self.add(LogEntry::Noise { ts: crate::rfc3339(kit::now_ms()), count });
        }
    }

    fn add(&mut self, e: LogEntry) {
        if self.head.len() < LOG_HEAD {
            self.head.push(e);
            return;
        }
        self.tail.push_back(e);
        while self.tail.len() > LOG_LINES {
            self.tail.pop_front();
        }
    }

    /// How many lines `docker logs` would print.
    pub fn len(&self) -> u64 {
        self.head.iter().chain(self.tail.iter()).map(LogEntry::lines).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.head.is_empty() && self.tail.is_empty()
    }

    /// Calls `f` with each line from the `skip`-th on, oldest first, until it returns false.
    /// A noise run is expanded only as far as it is read.
    pub fn visit(&self, mut skip: u64, mut f: impl FnMut(&str) -> bool) {
        for e in self.head.iter().chain(self.tail.iter()) {
            let n = e.lines();
            if skip >= n {
                skip -= n;
                continue;
            }
            match e {
                LogEntry::Line(l) => {
                    if !f(l) {
                        return;
                    }
                }
                LogEntry::Noise { ts, count } => {
                    for i in skip..*count {
                        if !f(&format!("{ts} DEBUG conn keepalive ok (filler {}/{count})", i + 1)) {
                            return;
                        }
                    }
                }
            }
            skip = 0;
        }
    }

    /// The last `n` lines (all of them for `None`), each ending in a newline.
    pub fn tail_text(&self, n: Option<u64>) -> String {
        let skip = n.map(|n| self.len().saturating_sub(n)).unwrap_or(0);
        let mut out = String::new();
        self.visit(skip, |l| {
            out.push_str(l);
            out.push('\n');
            true
        });
        out
    }
}

/// Resolves `path` (absolute, or relative to `cwd`) to a normal absolute path; `None` if it
/// climbs above `/`.
pub fn normalize(path: &str, cwd: &str) -> Option<String> {
    let joined = if path.starts_with('/') { path.to_string() } else { format!("{cwd}/{path}") };
    let mut parts: Vec<&str> = Vec::new();
    for p in joined.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(format!("/{}", parts.join("/")))
}

/// Is `path` (normalized) a file location inside the deploy dir?
pub fn in_deploy_dir(path: &str) -> bool {
    path.strip_prefix(DEPLOY_DIR).is_some_and(|rest| rest.starts_with('/') && rest.len() > 1)
}

/// A directory name for an instance's disk that cannot escape the data dir and never starts
/// with `.` (the simulator's own files there do).
pub fn safe_dir_name(name: &str) -> String {
    let s: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
    if s.is_empty() || s.starts_with('.') { format!("_{s}") } else { s }
}

/// Writes `data` to `<disk>/<rel>` with mode 600 (directories 700).
pub fn write_disk(disk: &Path, rel: &str, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let target = disk.join(rel.trim_start_matches('/'));
    if let Some(parent) = target.parent() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(parent)?;
    }
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&target)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(data)?;
    f.sync_all()
}

/// Parses a `.env` file: `KEY=VALUE` lines, `export ` allowed, quotes stripped, `#` comments.
pub fn parse_env(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((k, v)) = line.split_once('=') else { continue };
        let k = k.trim();
        if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|s| s.strip_suffix('"'))
            .or_else(|| v.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')))
            .unwrap_or(v);
        out.insert(k.to_string(), v.to_string());
    }
    out
}

/// A `.env` was written on `instance`: learn its node secret, and check that its claim belongs
/// to this instance's subscription.
pub fn inspect_env(st: &mut State, instance_id: &str, instance_name: &str, content: &[u8]) {
    let env = parse_env(&String::from_utf8_lossy(content));
    if let Some(s) = env.get("K2_NODE_SECRET") {
        st.learn_node_secret(s);
    }
    let Some(claim) = env.get("K2_PRIVATE_CLAIM").filter(|c| !c.is_empty()) else { return };
    let Some(op) = st.ops.op_of_token(claim) else { return };
    let owner = format!("pn-{}", op.sub_id);
    if owner != instance_name {
        let v = Violation::new(
            "foreign_claim",
            format!("the .env carries the claim of operation {} (node {owner}), not this instance's", op.id),
        )
        .on(instance_id, instance_name)
        .op(&op.id);
        st.violate(v);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(normalize(".env", "/apps/kaitu-slave").unwrap(), "/apps/kaitu-slave/.env");
        assert_eq!(normalize("/apps/kaitu-slave/../x", "/").unwrap(), "/apps/x");
        assert_eq!(normalize("../../..", "/a"), None);
        assert!(in_deploy_dir("/apps/kaitu-slave/.env"));
        assert!(!in_deploy_dir("/apps/kaitu-slave"));
        assert!(!in_deploy_dir("/apps/kaitu-slave2/x"));
        assert!(!in_deploy_dir("/etc/passwd"));
        assert_eq!(safe_dir_name("pn-abc"), "pn-abc");
        assert_eq!(safe_dir_name("../x"), "_.._x");
        assert_eq!(safe_dir_name(".admin"), "_.admin");
        assert_eq!(safe_dir_name(""), "_");
        assert_eq!(safe_dir_name(".."), "_..");
    }

    #[test]
    fn env_parsing() {
        let e = parse_env("# c\nK2_NODE_SECRET=abc\nexport K2_DOMAIN=\"\"\nK2_NODE_NAME='pn-1'\nbad line\n=x\n");
        assert_eq!(e.get("K2_NODE_SECRET").map(String::as_str), Some("abc"));
        assert_eq!(e.get("K2_DOMAIN").map(String::as_str), Some(""));
        assert_eq!(e.get("K2_NODE_NAME").map(String::as_str), Some("pn-1"));
        assert_eq!(e.len(), 3);
    }

    #[test]
    fn usage_track_survives_reboots() {
        let mut u = UsageTrack::default();
        assert_eq!(u.observe("b1", 100), 100);
        assert_eq!(u.observe("b1", 150), 150);
        assert_eq!(u.observe("b2", 10), 160);
        assert_eq!(u.observe("b2", 5), 165, "a counter going down is a reset");
    }

    #[test]
    fn disk_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        write_disk(d.path(), "/.env", b"A=1").unwrap();
        write_disk(d.path(), "sub/x", b"y").unwrap();
        let m = std::fs::metadata(d.path().join(".env")).unwrap().permissions().mode();
        assert_eq!(m & 0o777, 0o600);
        assert_eq!(std::fs::read(d.path().join("sub/x")).unwrap(), b"y");
    }
}
