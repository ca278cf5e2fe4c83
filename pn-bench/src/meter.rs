//! `pnctl bench meter`: the meter's ingest rate in production's topology (issue #17). N
//! synthetic nodes report over keep-alive HTTP to the dev stack's ingress (`pn-ingress`), which
//! forwards every report to Center (a real center-sim, where the nodes are registered, so it
//! authenticates and records each one) and mirrors it to the real svc-meter binary; then the
//! same load through a second router whose mirror is a no-op handler. The meter's figure is the
//! copies it acknowledged (2xx = in its flushed ledger, counted by the router) per second of the
//! measured window; the no-op's the same count for the no-op. `--direct` runs the earlier
//! measurement instead: an in-process meter on its own, the load straight at it
//! (`crate::meter_load::run`).
//!
//! It publishes synthetic deployments, so it runs on a scratch nats-server (JetStream with
//! `sync_interval: always`, as the dev stack runs it) and its own center-sim, meter and routers,
//! all started and stopped here — never on a stack with real operations.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;

use pnctl::parse_duration;
use pnctl::stack;

#[derive(Debug, Clone, clap::Args)]
pub struct MeterArgs {
    /// Print one JSON object (crate::meter_load::BenchReport).
    #[arg(long)]
    pub json: bool,
    /// Synthetic nodes.
    #[arg(long, default_value_t = 1000)]
    pub nodes: usize,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 256)]
    pub connections: usize,
    /// Measured time of each phase (meter, then no-op).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Unmeasured load before each phase.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// The meter alone, in this process, the load straight at it (no Center, no router): the
    /// measurement before the meter moved out of Center's path.
    #[arg(long)]
    pub direct: bool,
}

/// A nats-server for this benchmark only: its own port and store, killed on drop.
struct ScratchNats {
    child: tokio::process::Child,
    dir: std::path::PathBuf,
    url: String,
}

impl ScratchNats {
    async fn start() -> anyhow::Result<ScratchNats> {
        let dir = std::env::temp_dir().join(format!("pnctl-bench-meter-{}-{}", std::process::id(), hex::encode(rand::random::<[u8; 4]>())));
        std::fs::create_dir_all(dir.join("js"))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let conf = dir.join("nats.conf");
        std::fs::write(
            &conf,
            format!("listen: 127.0.0.1:{port}\njetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n", dir.join("js").display()),
        )?;
        let child = tokio::process::Command::new(stack::find_nats_server()?)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("start a scratch nats-server")?;
        let started = Instant::now();
        while TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_millis(200)).is_err() {
            anyhow::ensure!(started.elapsed() < Duration::from_secs(10), "the scratch nats-server did not listen within 10 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(ScratchNats { child, dir, url: format!("nats://127.0.0.1:{port}") })
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Points fd 1 at stderr; returns the original stdout to restore.
fn redirect_stdout_to_stderr() -> Option<std::os::fd::OwnedFd> {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let saved = nix::unistd::dup(std::io::stdout()).ok()?;
    nix::unistd::dup2_stdout(std::io::stderr()).ok()?;
    Some(saved)
}

pub async fn main(args: &MeterArgs) -> anyhow::Result<()> {
    if args.direct { direct(args).await } else { through_router(args).await }
}

async fn direct(args: &MeterArgs) -> anyhow::Result<()> {
    let nats = ScratchNats::start().await?;
    let opts = crate::meter_load::BenchOpts {
        nats_url: nats.url.clone(),
        meter_url: None,
        meter_pid: None,
        nodes: args.nodes,
        connections: args.connections,
        duration: args.duration,
        warmup: args.warmup,
        node_interval: Duration::ZERO,
    };
    let load = super::procfs::loadavg();
    // The in-process meter announces its address on stdout (its start-up contract); with
    // --json, stdout must hold the report alone, so that line goes to stderr meanwhile.
    let saved = if args.json { redirect_stdout_to_stderr() } else { None };
    let res = crate::meter_load::run(opts).await;
    if let Some(fd) = saved {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let _ = nix::unistd::dup2_stdout(&fd);
    }
    nats.stop().await;
    let r = res?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!("pnctl bench meter: machine {}; load average {load}", super::procfs::machine());
        println!("{}", serde_json::to_string_pretty(&r)?);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// through the router (the default)

/// `pnctl bench meter --json` (through the router).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouterReport {
    /// `router`: the load goes to `pn-ingress`; Center answers; the meter gets the copies.
    pub mode: &'static str,
    pub nodes: usize,
    pub connections: usize,
    pub duration_ms: u64,
    /// Copies the meter acknowledged (2xx after its ledger flush) per second of the window.
    pub reports_per_sec: f64,
    /// The same through a router whose mirror is a no-op handler.
    pub noop_per_sec: f64,
    /// `reports_per_sec / noop_per_sec`.
    pub ratio: f64,
    /// Reports Center answered 2xx per second (the meter phase): what the nodes saw.
    pub center_answered_per_sec: f64,
    /// `reports_per_sec / center_answered_per_sec`: the share of Center's reports the meter
    /// recorded in the same window.
    pub mirrored_share: f64,
    /// Latency of Center's answers through the router, meter phase.
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Non-2xx answers or transport errors at the client, meter phase (window).
    pub errors: u64,
    /// The meter router's counters over the whole meter phase (warm-up included).
    pub mirror_dropped: u64,
    pub mirror_failed: u64,
    pub mirror_rejected: u64,
    /// Peak resident set (VmHWM) of the svc-meter process.
    pub meter_peak_rss_bytes: u64,
    /// CPU time (user + system) per report Center answered in the meter phase's window, by
    /// process: `pn-ingress`, `center-sim`, `svc-meter`, and `generator` (this process: the
    /// load generator's client). What the path costs, whatever else the machine runs.
    pub cpu_ms_per_report: std::collections::BTreeMap<String, f64>,
}

/// A child process of the bench, killed on drop.
struct Child {
    child: tokio::process::Child,
}

impl Child {
    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    std::fs::File::create(dir.join(format!("{name}.log"))).with_context(|| format!("create {name}.log"))
}

/// Starts `cmd` and returns it with the URL its first stdout line announces (`<prefix> http://…`).
async fn spawn_announced(mut cmd: tokio::process::Command, prefix: &str) -> anyhow::Result<(Child, String)> {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).kill_on_drop(true).spawn().with_context(|| format!("start {prefix}"))?;
    let out = child.stdout.take().context("stdout")?;
    let mut lines = tokio::io::BufReader::new(out).lines();
    let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .with_context(|| format!("{prefix} printed no address in 20 s"))??
        .unwrap_or_default();
    let url = first.strip_prefix(&format!("{prefix} listening on ")).map(str::to_string);
    let Some(url) = url else { bail!("{prefix}'s first line is not its address: {first:?}") };
    // Keep reading so a chatty child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((Child { child }, url))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn wait_http(http: &reqwest::Client, url: &str, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http.get(url).timeout(Duration::from_secs(1)).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what} did not answer {url} within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn router_stats(http: &reqwest::Client, router: &str) -> anyhow::Result<Value> {
    Ok(http.get(format!("{router}/_pn_ingress/stats")).send().await?.json().await?)
}

fn count(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

/// What one phase through a router measured.
struct Routed {
    /// The generator's view (Center's answers).
    client: crate::meter_load::PhaseResult,
    /// Copies the mirror acknowledged inside the window.
    mirror_ok: u64,
    /// The router's drop/fail/reject counts over the whole phase.
    whole: Value,
    /// CPU seconds of each watched process inside the window.
    cpu: std::collections::BTreeMap<String, f64>,
}

fn cpu_of(procs: &[(String, u32)]) -> Vec<Option<f64>> {
    procs.iter().map(|(_, pid)| super::procfs::cpu_seconds(*pid)).collect()
}

/// One phase through `router`: the generator's view, the router's `mirrorOk` over the
/// measured window, and the CPU the watched processes spent in it.
async fn routed_phase(
    opts: &crate::meter_load::BenchOpts,
    http: &reqwest::Client,
    router: &str,
    nodes: Vec<crate::meter_load::BenchNode>,
    procs: &[(String, u32)],
) -> anyhow::Result<Routed> {
    let start = Instant::now() + opts.warmup;
    let end = start + opts.duration;
    let before = router_stats(http, router).await?;
    let sampler = {
        let (http, router, procs) = (http.clone(), router.to_string(), procs.to_vec());
        tokio::spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            let (a, ca) = (router_stats(&http, &router).await.ok(), cpu_of(&procs));
            tokio::time::sleep_until(end.into()).await;
            let (b, cb) = (router_stats(&http, &router).await.ok(), cpu_of(&procs));
            let cpu = procs
                .iter()
                .zip(ca.iter().zip(&cb))
                .filter_map(|((name, _), (a, b))| Some((name.clone(), (*b)? - (*a)?)))
                .collect::<std::collections::BTreeMap<_, _>>();
            (a, b, cpu)
        })
    };
    let res = crate::meter_load::phase_at(opts, http, &format!("{router}/slave/usage"), nodes, start).await;
    let (a, b, cpu) = sampler.await.context("sampler")?;
    let (Some(a), Some(b)) = (a, b) else { bail!("the router {router} did not answer its stats") };
    // Let the queued copies land before anything else is measured.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = router_stats(http, router).await?;
    let ok_in_window = count(&b, "mirrorOk").saturating_sub(count(&a, "mirrorOk"));
    let whole = json!({
        "mirrorDropped": count(&after, "mirrorDropped").saturating_sub(count(&before, "mirrorDropped")),
        "mirrorFailed": count(&after, "mirrorFailed").saturating_sub(count(&before, "mirrorFailed")),
        "mirrorRejected": count(&after, "mirrorRejected").saturating_sub(count(&before, "mirrorRejected")),
    });
    Ok(Routed { client: res, mirror_ok: ok_in_window, whole, cpu })
}

async fn through_router(args: &MeterArgs) -> anyhow::Result<()> {
    if args.nodes == 0 || args.connections == 0 || args.duration.is_zero() {
        bail!("nodes, connections and duration must be positive");
    }
    kit::init_crypto();
    let load = super::procfs::loadavg();
    let dir: PathBuf = std::env::temp_dir().join(format!("pnctl-bench-meter-{}-{}", std::process::id(), hex::encode(rand::random::<[u8; 4]>())));
    std::fs::create_dir_all(&dir)?;
    let nats = ScratchNats::start().await?;
    let res = routed(args, &dir, &nats.url).await;
    nats.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    let r = res?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!("pnctl bench meter (through pn-ingress): machine {}; load average {load}", super::procfs::machine());
        println!("{}", serde_json::to_string_pretty(&r)?);
    }
    Ok(())
}

async fn routed(args: &MeterArgs, dir: &Path, nats_url: &str) -> anyhow::Result<RouterReport> {
    let token = hex::encode(rand::random::<[u8; 16]>());
    let http = crate::meter_load::http_client(args.connections)?;

    // Center.
    let mut cmd = tokio::process::Command::new(stack::find_bin(stack::CENTER_SIM)?);
    cmd.args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("sim"))
        .env("PN_CENTER_TOKEN", &token)
        .env("PN_LOG_FORMAT", "json")
        .env("RUST_LOG", "warn")
        .stderr(Stdio::from(log_file(dir, "center-sim")?));
    let (sim, center) = spawn_announced(cmd, "center-sim").await?;

    // The meter: the real binary, on a fresh ledger, no per-node rate limit.
    let (listen, ops) = (free_port()?, free_port()?);
    let meter_url = format!("http://127.0.0.1:{listen}");
    let meter = tokio::process::Command::new(stack::find_bin("svc-meter")?)
        .env("PN_NATS_URL", nats_url)
        .env("PN_DATA_DIR", dir.join("meter"))
        .env("PN_LISTEN", format!("127.0.0.1:{listen}"))
        .env("PN_OPS_LISTEN", format!("127.0.0.1:{ops}"))
        .env("PN_CENTER_URL", &center)
        .env("PN_CENTER_TOKEN", &token)
        .env("PN_MIN_REPORT_INTERVAL_MS", "0")
        .env("PN_LOG_FORMAT", "json")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log_file(dir, "svc-meter")?))
        .stderr(Stdio::from(log_file(dir, "svc-meter.err")?))
        .kill_on_drop(true)
        .spawn()
        .context("start svc-meter")?;
    let meter = Child { child: meter };
    wait_http(&http, &format!("{meter_url}/healthz"), "svc-meter").await?;

    // The no-op mirror, and one router per mirror, both in front of Center.
    let noop = crate::meter_load::NoopServer::start()?;
    let router = |mirror: String, name: &str| -> anyhow::Result<tokio::process::Command> {
        let mut c = tokio::process::Command::new(stack::find_bin(stack::INGRESS)?);
        c.args(["--listen", "127.0.0.1:0", "--upstream", &center, "--mirror", &mirror])
            .env("RUST_LOG", "warn")
            .stderr(Stdio::from(log_file(dir, name)?));
        Ok(c)
    };
    let (router_meter, via_meter) = spawn_announced(router(meter_url.clone(), "pn-ingress-meter")?, "pn-ingress").await?;
    let (_router_noop, via_noop) = spawn_announced(router(format!("http://{}", noop.addr), "pn-ingress-noop")?, "pn-ingress").await?;

    // The nodes: known to the meter (pn.op.deployed) and registered at Center (as sidecars do).
    let opts = crate::meter_load::BenchOpts {
        nats_url: nats_url.to_string(),
        meter_url: Some(meter_url.clone()),
        meter_pid: Some(meter.pid()),
        nodes: args.nodes,
        connections: args.connections,
        duration: args.duration,
        warmup: args.warmup,
        node_interval: Duration::ZERO,
    };
    let bus = kit::bus::Bus::connect(nats_url, "pnctl-bench-meter", Duration::from_secs(10)).await?;
    bus.ensure_streams().await?;
    let run_id = hex::encode(rand::random::<[u8; 4]>());
    let nodes = crate::meter_load::register(&opts, &bus, &http, &meter_url, &run_id).await?;
    let refused = futures::stream::iter(nodes.iter())
        .map(|(name, ip, secret)| {
            let (http, url) = (http.clone(), format!("{center}/slave/register"));
            async move {
                let r = http.post(url).basic_auth(ip.to_string(), Some(secret)).json(&json!({"name": name, "region": "sg"})).send().await;
                !matches!(r, Ok(r) if r.status().is_success())
            }
        })
        .buffer_unordered(64)
        .filter(|refused| futures::future::ready(*refused))
        .count()
        .await;
    if refused > 0 {
        bail!("Center refused {refused} of {} synthetic registrations", nodes.len());
    }

    let procs = vec![
        ("pn-ingress".to_string(), router_meter.pid()),
        ("center-sim".to_string(), sim.pid()),
        ("svc-meter".to_string(), meter.pid()),
        ("generator".to_string(), std::process::id()),
    ];
    let routed_meter = routed_phase(&opts, &http, &via_meter, nodes.clone(), &procs).await?;
    let meter_peak = super::procfs::peak_rss(meter.pid()).unwrap_or(0);
    let routed_noop = routed_phase(&opts, &http, &via_noop, nodes, &[]).await?;
    let (m, meter_ok, meter_whole, noop_ok) = (routed_meter.client, routed_meter.mirror_ok, routed_meter.whole, routed_noop.mirror_ok);
    let per_report = |cpu_s: f64| if m.ok > 0 { (cpu_s * 1000.0 / m.ok as f64 * 1000.0).round() / 1000.0 } else { 0.0 };
    let cpu_ms_per_report = routed_meter.cpu.iter().map(|(k, v)| (k.clone(), per_report(*v))).collect();
    noop.stop().await;
    drop(meter);

    let secs = args.duration.as_secs_f64();
    let reports_per_sec = meter_ok as f64 / secs;
    let noop_per_sec = noop_ok as f64 / secs;
    let center_answered_per_sec = m.ok as f64 / secs;
    let mut lat = m.latencies_us;
    lat.sort_unstable();
    Ok(RouterReport {
        mode: "router",
        nodes: args.nodes,
        connections: args.connections.min(args.nodes),
        duration_ms: args.duration.as_millis() as u64,
        reports_per_sec,
        noop_per_sec,
        ratio: if noop_per_sec > 0.0 { reports_per_sec / noop_per_sec } else { 0.0 },
        center_answered_per_sec,
        mirrored_share: if center_answered_per_sec > 0.0 { reports_per_sec / center_answered_per_sec } else { 0.0 },
        p50_ms: crate::meter_load::percentile_ms(&lat, 0.50),
        p99_ms: crate::meter_load::percentile_ms(&lat, 0.99),
        errors: m.errors,
        mirror_dropped: count(&meter_whole, "mirrorDropped"),
        mirror_failed: count(&meter_whole, "mirrorFailed"),
        mirror_rejected: count(&meter_whole, "mirrorRejected"),
        meter_peak_rss_bytes: meter_peak,
        cpu_ms_per_report,
    })
}
