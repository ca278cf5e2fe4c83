//! The dev stack: `pnctl up` (foreground or `--detach`), `pnctl down`, the supervisor that keeps
//! nats-server, center-sim and the five services alive, and `./.pn/stack.json`, the one place
//! that says where everything runs.
//!
//! The supervisor owns its children: each runs in its own process group (a terminal's Ctrl-C
//! reaches only pnctl, which then stops them in order), a child that dies is restarted with
//! back-off and its new pid written to stack.json. Secrets reach children only through their
//! environment — never argv, never a log line. `down` signals the supervisor recorded in
//! stack.json and nothing else; it never kills processes by name.
//!
//! By concern: `file` (stack.json), `secrets` (the data dir's layout, the dev secrets), `bins`
//! (where the programs are), `specs` (each child's command, environment and health check,
//! nats-server's config among them), `supervise` (one child's life: start, restart, stop),
//! `procs` (pids, signals, log tails); this file is `up`, `up --detach` and `down`.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::Signal;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

mod bins;
mod file;
mod procs;
mod secrets;
mod specs;
mod supervise;

pub use bins::*;
pub use file::*;
pub use procs::*;
pub use secrets::*;
use specs::*;
use supervise::*;


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
        let http = crate::http::http()?;
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
    use secrecy::ExposeSecret;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

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
