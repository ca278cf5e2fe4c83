//! Test support (never a production dependency): real child processes for the parts a test
//! needs — `nats-server` with JetStream on a free port and a temporary store, the workspace's
//! own binaries — each killed when its guard drops. No mocks of NATS or of our services.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub mod stack;

/// A free TCP port on 127.0.0.1, chosen at random below the kernel's ephemeral range
/// (32768+) so that outgoing connections cannot take it between the check and its use.
pub fn free_port() -> u16 {
    for _ in 0..200 {
        let p = 20_000 + rand::random::<u16>() % 12_000;
        if TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

/// The workspace root (two levels above this crate's manifest).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// The directory holding the workspace's built binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("PN_BIN_DIR") {
        return PathBuf::from(d);
    }
    // Test executables live in target/<profile>/deps.
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// The path of one of the workspace's binaries; fails clearly when it was not built.
pub fn bin(name: &str) -> Result<PathBuf> {
    let p = bin_dir().join(name);
    if !p.exists() {
        bail!("{} is not built: run `cargo build --workspace --bins` first (scripts/test does)", p.display());
    }
    Ok(p)
}

/// Finds `nats-server`: `PN_NATS_SERVER`, then the project's `.tools/`, then PATH.
pub fn nats_server_path() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("PN_NATS_SERVER") {
        return Ok(PathBuf::from(p));
    }
    let local = workspace_root().join(".tools/venv/bin/nats-server");
    if local.exists() {
        return Ok(local);
    }
    which("nats-server").context("nats-server not found: run scripts/bootstrap")
}

pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(name)).find(|p| p.is_file()))
}

/// A child process killed (SIGKILL) on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait up to `grace` for exit (SIGKILL after).
    pub fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        None
    }
}

impl Proc {
    /// Starts `cmd` as `name` with stdin closed and stdout and stderr appended to `log` (created,
    /// with its folder, if missing): how a test runs a server whose output it reads afterwards.
    pub fn spawn_logged(name: &str, cmd: &mut Command, log: &Path) -> Result<Proc> {
        let out = append_to(log)?;
        let child = cmd.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out).spawn().with_context(|| format!("spawn {name}"))?;
        Ok(Proc { child, name: name.to_string() })
    }

    /// Starts `cmd` as `name` with stdin closed and stderr appended to `log`, and waits up to
    /// `patience` for the first line it prints on stdout (a server announcing its address);
    /// the rest of stdout is drained so the child never blocks on a full pipe.
    pub fn spawn_announced(name: &str, cmd: &mut Command, log: &Path, patience: Duration) -> Result<(Proc, String)> {
        let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(append_to(log)?).spawn().with_context(|| format!("spawn {name}"))?;
        let stdout = child.stdout.take().with_context(|| format!("{name} stdout"))?;
        let proc = Proc { child, name: name.to_string() };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
            if let Some(Ok(first)) = lines.next() {
                let _ = tx.send(first);
            }
            for _ in lines {}
        });
        let first = rx.recv_timeout(patience).with_context(|| format!("{name} printed no first line"))?;
        Ok((proc, first))
    }
}

/// `path` opened for appending (created, with its folder, if missing).
fn append_to(path: &Path) -> Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("open {}", path.display()))
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The test harness's own NATS identity: allowed everything (it forges events on purpose).
/// Never a service's: a stack's services connect as themselves (`kit::nats_auth`).
pub const TEST_USER: &str = "pn-test";

/// A real `nats-server -js` on a free loopback port with its own store, killed on drop. It
/// runs with the same authorization as the dev stack (`kit::nats_auth::server_config`: one
/// identity per service, the operator, no anonymous client) plus [`TEST_USER`]; the passwords
/// are random per server and reach nats-server through its environment only.
pub struct Nats {
    pub proc: Proc,
    pub port: u16,
    pub store: PathBuf,
    passwords: BTreeMap<String, String>,
    _dir: Option<tempfile::TempDir>,
}

impl Nats {
    /// The harness's URL, credentials included (`nats://pn-test:…@127.0.0.1:<port>`): what tests
    /// pass to `kit::bus::Bus::connect` to read streams and forge events.
    pub fn url(&self) -> String {
        format!("nats://{TEST_USER}:{}@127.0.0.1:{}", self.passwords.get(TEST_USER).map(String::as_str).unwrap_or(""), self.port)
    }

    /// The URL without credentials (a service's `PN_NATS_URL`, beside its `PN_NATS_USER` and
    /// `PN_NATS_PASSWORD`).
    pub fn plain_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The password of `user` (a service name, `pn-operator`, `pn-test`).
    pub fn password(&self, user: &str) -> Option<String> {
        self.passwords.get(user).cloned()
    }

    /// How `user` connects (`Bus::connect_as(&nats.plain_url(), …, &nats.auth(user))`).
    pub fn auth(&self, user: &str) -> kit::bus::NatsAuth {
        kit::bus::NatsAuth::user(user, secrecy::SecretString::from(self.password(user).unwrap_or_default()))
    }

    pub fn start() -> Result<Nats> {
        let dir = tempfile::tempdir()?;
        let store = dir.path().join("js");
        let mut n = Nats::start_at(&store, free_port())?;
        n._dir = Some(dir);
        Ok(n)
    }

    /// Starts on a given store and port (a restart on the same store keeps the streams), with
    /// fresh passwords.
    pub fn start_at(store: &Path, port: u16) -> Result<Nats> {
        let mut ids = kit::nats_auth::all();
        ids.push(kit::nats_auth::Identity::unrestricted(TEST_USER));
        let passwords = ids.iter().map(|i| (i.user.clone(), rand_hex(24))).collect();
        Nats::start_with(store, port, passwords)
    }

    fn start_with(store: &Path, port: u16, passwords: BTreeMap<String, String>) -> Result<Nats> {
        std::fs::create_dir_all(store)?;
        let conf = store.join("nats.conf");
        let mut ids = kit::nats_auth::all();
        ids.push(kit::nats_auth::Identity::unrestricted(TEST_USER));
        std::fs::write(&conf, kit::nats_auth::server_config(&format!("127.0.0.1:{port}"), store, &ids))?;
        let child = Command::new(nats_server_path()?)
            .arg("-c")
            .arg(&conf)
            .envs(passwords.iter().map(|(u, p)| (kit::nats_auth::password_var(u), p)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn nats-server")?;
        let proc = Proc { child, name: "nats-server".into() };
        wait_tcp(SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(15))?;
        Ok(Nats { proc, port, store: store.to_path_buf(), passwords, _dir: None })
    }

    /// Kills the server (SIGKILL) and starts it again on the same store, port and passwords.
    pub fn restart(&mut self) -> Result<()> {
        self.proc.kill();
        let dir = self._dir.take();
        let mut n = Nats::start_with(&self.store, self.port, self.passwords.clone())?;
        n._dir = dir;
        *self = n;
        Ok(())
    }
}

/// Waits until something accepts TCP connections at `addr`.
pub fn wait_tcp(addr: SocketAddr, patience: Duration) -> Result<()> {
    let deadline = Instant::now() + patience;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    bail!("nothing listens on {addr} after {patience:?}")
}

/// Polls `f` until it returns `Some`, or fails after `patience` with `what`.
pub async fn eventually<T, F, Fut>(what: &str, patience: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + patience;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {patience:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Random hex, for unique ids in tests.
pub fn rand_hex(n: usize) -> String {
    let bytes: Vec<u8> = (0..n).map(|_| rand::random::<u8>()).collect();
    hex::encode(bytes)
}
