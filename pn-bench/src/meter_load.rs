//! The ingest benchmark behind `pnctl bench meter --direct --json`: registers N synthetic private nodes
//! by publishing `pn.op.deployed` events, drives them reporting concurrently over loopback
//! keep-alive HTTP for a while, then drives the same load against a no-op axum handler in the
//! same run, and reports both rates, their ratio, latency percentiles and peak RSS.
//!
//! It publishes synthetic deployments on PN_OPS: point it at a scratch NATS (or a stack whose
//! verifier may see fake operations), never at production. With `meter_url: None` it starts a
//! meter in this process (fresh temporary ledger, its own durable consumer, no 429 interval).
//!
//! The pieces (`register`, `phase_at`, `NoopServer`, `http_client`) are public so that
//! `pnctl bench meter` can drive the same load through the dev stack's ingress (`pn-ingress`),
//! where the meter only gets mirrored copies and the client sees Center's answers.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::serve::ListenerExt;
use futures::StreamExt;
use kit::bus::{Bus, Meta};
use proto::{Body, Instance, NodeDeployed, Operation, Stage, subjects};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;

use svc_meter::settings::Settings;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOpts {
    /// The NATS the meter consumes `pn.op.deployed` from.
    pub nats_url: String,
    /// A running meter (`http://host:port`); `None` starts one in this process.
    pub meter_url: Option<String>,
    /// The external meter's pid, to report its peak RSS (else this process's).
    pub meter_pid: Option<u32>,
    /// Synthetic nodes (each reports with its own credentials and counters).
    pub nodes: usize,
    /// Concurrent keep-alive connections (at most one per node).
    pub connections: usize,
    /// Measured time of each phase (meter, then no-op).
    pub duration: Duration,
    /// Unmeasured load before each phase (the meter's baselines land here).
    pub warmup: Duration,
    /// Pause between two reports of one node; must be ≥ the meter's `PN_MIN_REPORT_INTERVAL_MS`
    /// for an external meter (else 429s, counted as errors). 0 for the in-process meter.
    pub node_interval: Duration,
}

impl Default for BenchOpts {
    fn default() -> Self {
        BenchOpts {
            nats_url: "nats://127.0.0.1:4222".into(),
            meter_url: None,
            meter_pid: None,
            nodes: 1000,
            connections: 256,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(1),
            node_interval: Duration::ZERO,
        }
    }
}

/// The result (`pnctl bench meter --direct --json` prints it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BenchReport {
    pub nodes: usize,
    /// Acknowledged (2xx) reports per second through the real meter (durable ledger).
    pub reports_per_sec: f64,
    /// The same load against a handler that does nothing.
    pub noop_per_sec: f64,
    /// `reports_per_sec / noop_per_sec`.
    pub ratio: f64,
    /// Latency of acknowledged meter reports.
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Peak resident set (VmHWM) of the meter process (this process when in-process).
    pub peak_rss_bytes: u64,
    pub connections: usize,
    pub duration_ms: u64,
    /// Non-2xx answers and transport errors during the meter phase.
    pub errors: u64,
    pub in_process: bool,
}

struct Node {
    header: String,
    rx: u64,
    tx: u64,
    boot: String,
    next_at: Instant,
}

/// One synthetic node: name, address, secret (its Basic credentials).
pub type BenchNode = (String, Ipv4Addr, String);

/// What one phase of load saw at the client.
#[derive(Debug, Clone)]
pub struct PhaseResult {
    /// 2xx answers inside the measured window.
    pub ok: u64,
    /// Other answers and transport errors inside the window.
    pub errors: u64,
    pub elapsed: Duration,
    /// Latency of each 2xx answer in the window, µs.
    pub latencies_us: Vec<u32>,
}

/// The `q` quantile (0–1) of `sorted` latencies, in ms.
pub fn percentile_ms(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

/// The load generator's client: HTTP/1 keep-alive, `TCP_NODELAY`, a pool of `connections`.
pub fn http_client(connections: usize) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .http1_only()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(connections)
        .timeout(Duration::from_secs(10))
        .build()
        .context("http client")
}

/// Runs the benchmark.
pub async fn run(opts: BenchOpts) -> anyhow::Result<BenchReport> {
    if opts.nodes == 0 || opts.connections == 0 || opts.duration.is_zero() {
        bail!("nodes, connections and duration must be positive");
    }
    kit::init_crypto();
    let run_id = hex::encode(rand::random::<[u8; 4]>());
    let bus = Bus::connect(&opts.nats_url, "svc-meter-bench", Duration::from_secs(10)).await?;
    bus.ensure_streams().await?;

    let (meter_url, in_process) = match &opts.meter_url {
        Some(u) => (u.trim_end_matches('/').to_string(), None),
        None => {
            let p = InProcess::start(&opts.nats_url, &run_id).await?;
            (format!("http://{}", p.addr), Some(p))
        }
    };
    let result = drive(&opts, &bus, &meter_url, &run_id).await;
    if let Some(p) = in_process {
        p.stop(&bus).await;
    }
    let (meter, noop) = result?;

    let mut lat = meter.latencies_us;
    lat.sort_unstable();
    let pct = |q: f64| percentile_ms(&lat, q);
    let reports_per_sec = meter.ok as f64 / meter.elapsed.as_secs_f64().max(1e-9);
    let noop_per_sec = noop.ok as f64 / noop.elapsed.as_secs_f64().max(1e-9);
    Ok(BenchReport {
        nodes: opts.nodes,
        reports_per_sec,
        noop_per_sec,
        ratio: if noop_per_sec > 0.0 { reports_per_sec / noop_per_sec } else { 0.0 },
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        peak_rss_bytes: peak_rss(opts.meter_pid),
        connections: opts.connections.min(opts.nodes),
        duration_ms: opts.duration.as_millis() as u64,
        errors: meter.errors,
        in_process: opts.meter_url.is_none(),
    })
}

async fn drive(opts: &BenchOpts, bus: &Bus, meter_url: &str, run_id: &str) -> anyhow::Result<(PhaseResult, PhaseResult)> {
    let http = http_client(opts.connections)?;
    let nodes = register(opts, bus, &http, meter_url, run_id).await?;

    let meter = phase(opts, &http, &format!("{meter_url}/slave/usage"), nodes.clone()).await;

    let noop = NoopServer::start()?;
    let noop_result = phase(opts, &http, &format!("http://{}/slave/usage", noop.addr), nodes).await;
    noop.stop().await;
    Ok((meter, noop_result))
}

/// Publishes one deployment per synthetic node and waits until the meter knows them all.
pub async fn register(opts: &BenchOpts, bus: &Bus, http: &reqwest::Client, meter_url: &str, run_id: &str) -> anyhow::Result<Vec<BenchNode>> {
    let mut nodes = Vec::with_capacity(opts.nodes);
    let net: u8 = rand::random();
    for i in 0..opts.nodes {
        let n = i as u32 + 1;
        // 10.x.y.z, distinct per node in this run; the run id keeps names distinct across runs.
        let ip = Ipv4Addr::new(10, net.wrapping_add((n >> 16) as u8), (n >> 8) as u8, n as u8);
        let secret = hex::encode(rand::random::<[u8; 32]>());
        nodes.push((format!("bench-{run_id}-{i}"), ip, secret));
    }
    let now = kit::now_ms();
    let published = futures::stream::iter(nodes.iter().enumerate())
        .map(|(i, (name, ip, secret))| async move {
            let op_id = format!("bench-{run_id}-op-{i}");
            let ev = NodeDeployed {
                op: Some(Operation { operation_id: op_id.clone(), sub_id: format!("bench-{i}"), ..Default::default() }),
                instance: Some(Instance { ipv4: ip.to_string(), provider: "bench".into(), name: name.clone(), ..Default::default() }),
                node_name: name.clone(),
                node_secret_sha256: Sha256::digest(secret.as_bytes()).to_vec(),
                // Effectively unlimited: the bench measures ingest, not cut-offs.
                sold_bytes: u64::MAX / 2,
                deployed_at_ms: now,
                private_node: true,
                ..Default::default()
            };
            let meta = Meta::outcome(&op_id, &format!("bench-{i}"), Stage::Deploy, 1);
            bus.publish(subjects::op_event(subjects::DEPLOYED, &op_id), Body::Deployed(ev), &meta).await
        })
        .buffer_unordered(256)
        .collect::<Vec<_>>()
        .await;
    if let Some(Err(e)) = published.into_iter().find(Result::is_err) {
        return Err(e).context("publish synthetic deployments");
    }
    let deadline = Instant::now() + Duration::from_secs(60) + Duration::from_millis(opts.nodes as u64 * 10);
    let missing = futures::stream::iter(nodes.iter())
        .map(|(name, _, _)| async move {
            let url = format!("{meter_url}/v1/admission/{name}");
            while Instant::now() < deadline {
                if let Ok(r) = http.get(&url).send().await
                    && r.status().is_success()
                {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            true
        })
        .buffer_unordered(64)
        .filter(|m| futures::future::ready(*m))
        .count()
        .await;
    if missing > 0 {
        bail!("the meter did not learn {missing} of {} synthetic nodes in time", opts.nodes);
    }
    Ok(nodes)
}

/// Warm-up then a measured run of `opts.duration` over `url`.
async fn phase(opts: &BenchOpts, http: &reqwest::Client, url: &str, nodes: Vec<BenchNode>) -> PhaseResult {
    phase_at(opts, http, url, nodes, Instant::now() + opts.warmup).await
}

/// Load from now on, measured from `start` for `opts.duration` (the time before `start` is the
/// warm-up): every node reports over `opts.connections` keep-alive connections as fast as the
/// answers come (or every `node_interval`).
pub async fn phase_at(opts: &BenchOpts, http: &reqwest::Client, url: &str, nodes: Vec<BenchNode>, start: Instant) -> PhaseResult {
    let workers = opts.connections.min(nodes.len()).max(1);
    let mut per_worker: Vec<Vec<Node>> = (0..workers).map(|_| Vec::new()).collect();
    let now = Instant::now();
    for (i, (_, ip, secret)) in nodes.into_iter().enumerate() {
        per_worker[i % workers].push(Node {
            header: svc_meter::auth::basic_header(ip, &secret),
            rx: 1_000_000,
            tx: 1_000_000,
            boot: format!("bench-boot-{i}"),
            next_at: now,
        });
    }
    let end = start + opts.duration;
    let mut set = tokio::task::JoinSet::new();
    for mut mine in per_worker {
        let http = http.clone();
        let url = url.to_string();
        let interval = opts.node_interval;
        set.spawn(async move {
            let mut ok = 0u64;
            let mut errors = 0u64;
            let mut lat = Vec::new();
            let mut i = 0usize;
            let count = mine.len();
            loop {
                let n = &mut mine[i % count];
                i += 1;
                let t = Instant::now();
                if t >= end {
                    break;
                }
                if n.next_at > t {
                    tokio::time::sleep_until(n.next_at.into()).await;
                }
                n.rx += 1500;
                n.tx += 3000;
                let at = time::OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_default();
                let body = format!(r#"{{"rxBytes":{},"txBytes":{},"bootId":"{}","at":"{}"}}"#, n.rx, n.tx, n.boot, at);
                let sent = Instant::now();
                let res = http
                    .post(&url)
                    .header("authorization", &n.header)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                let done = Instant::now();
                n.next_at = done + interval;
                let measured = sent >= start && done <= end;
                match res {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        if measured {
                            ok += 1;
                            lat.push(done.duration_since(sent).as_micros().min(u32::MAX as u128) as u32);
                        }
                    }
                    Ok(r) => {
                        let _ = r.bytes().await;
                        if measured {
                            errors += 1;
                        }
                    }
                    Err(_) => {
                        if measured {
                            errors += 1;
                        }
                    }
                }
            }
            (ok, errors, lat)
        });
    }
    let mut out = PhaseResult { ok: 0, errors: 0, elapsed: opts.duration, latencies_us: Vec::new() };
    while let Some(r) = set.join_next().await {
        if let Ok((ok, errors, lat)) = r {
            out.ok += ok;
            out.errors += errors;
            out.latencies_us.extend(lat);
        }
    }
    out
}

/// The no-op baseline: the same route answering `{"ok":true}` without reading anything, on its
/// own runtime like the in-process meter, so that the two are served alike.
pub struct NoopServer {
    pub addr: SocketAddr,
    token: tokio_util::sync::CancellationToken,
    thread: std::thread::JoinHandle<()>,
}

impl NoopServer {
    pub fn start() -> anyhow::Result<NoopServer> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().thread_name("bench-noop").build()?;
        let listener = std::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let token = tokio_util::sync::CancellationToken::new();
        let stop = token.clone();
        let thread = std::thread::Builder::new().name("bench-noop".into()).spawn(move || {
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
                let router = axum::Router::new().route(
                    "/slave/usage",
                    axum::routing::post(|_body: axum::body::Bytes| async { axum::Json(serde_json::json!({"ok": true})) }),
                );
                let l = listener.tap_io(|t| {
                    let _ = t.set_nodelay(true);
                });
                let _ = axum::serve(l, router).with_graceful_shutdown(stop.cancelled_owned()).await;
            });
        })?;
        Ok(NoopServer { addr, token, thread })
    }

    pub async fn stop(self) {
        self.token.cancel();
        let thread = self.thread;
        let _ = tokio::time::timeout(Duration::from_secs(10), tokio::task::spawn_blocking(move || thread.join())).await;
    }
}

/// A meter started in this process for the bench, with its own ledger and consumer, on its own
/// tokio runtime (two workers, like the service's own), so that the load generator's tasks do
/// not queue behind the meter's on the same workers.
struct InProcess {
    addr: SocketAddr,
    token: tokio_util::sync::CancellationToken,
    thread: std::thread::JoinHandle<()>,
    consumer: String,
    dir: std::path::PathBuf,
}

impl InProcess {
    async fn start(nats_url: &str, run_id: &str) -> anyhow::Result<InProcess> {
        let dir = std::env::temp_dir().join(format!("pn-meter-bench-{run_id}"));
        let mut s = Settings::default();
        s.common.nats_url = nats_url.to_string();
        s.common.data_dir = dir.clone();
        // Center is never called: the synthetic quotas cannot be reached.
        s.common.center_url = "http://127.0.0.1:9".into();
        s.common.center_token = Some(secrecy::SecretString::from("bench-unused".to_string()));
        s.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        s.min_report_interval_ms = 0;
        s.deployed_consumer = format!("svc-meter-bench-{run_id}");
        let consumer = s.deployed_consumer.clone();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().thread_name("bench-meter").build()?;
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new().name("bench-meter".into()).spawn(move || {
            rt.block_on(async move {
                match svc_meter::App::build(s).await {
                    Ok(app) => {
                        let token = app.shutdown_token();
                        let _ = ready_tx.send(Ok((app.http_addr(), token.clone())));
                        if let Err(e) = app.run(token.cancelled_owned()).await {
                            tracing::error!(error = %e, "bench meter failed");
                        }
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            });
        })?;
        let (addr, token) = ready_rx.await.context("bench meter thread ended")??;
        Ok(InProcess { addr, token, thread, consumer, dir })
    }

    async fn stop(self, bus: &Bus) {
        self.token.cancel();
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        if let Ok(stream) = bus.js.get_stream(subjects::OPS_STREAM).await {
            let _ = stream.delete_consumer(&self.consumer).await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// VmHWM of `pid` (or this process), in bytes; 0 when unknown.
fn peak_rss(pid: Option<u32>) -> u64 {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".to_string(),
    };
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
