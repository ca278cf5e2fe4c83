//! `pnctl up` in the foreground (also what the background supervisor of `--detach` runs): its
//! options, the children in tiers started in order and stopped in reverse, the summary.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::*;

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

    pub(super) fn port_args(&self) -> Vec<String> {
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
