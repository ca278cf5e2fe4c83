//! `pnctl bench pipeline`: N intents enqueued at once on a fresh dev stack, followed on PN_OPS
//! until every one is verified (or failed). Reports provisions/s end to end, queued→verified
//! latency (the verifier's `time_to_active_ms`, from Center's `createdAt`), per-stage pickup
//! lag (publish → handler start) and handler time from the services' `/metrics`, CPU seconds
//! per provision and each service's peak RSS. `--realistic` sets the simulator's delays to a
//! real cloud's divided by `--scale`, reports the orchestration overhead against those waits,
//! and then measures the in-flight capacity (`capacity.rs`).
//!
//! The verifier waits for a node's first non-zero usage, i.e. the sidecar's second report (the
//! first is the baseline); the sim's reporting interval (`--usage-interval-ms`, 200 ms by
//! default) therefore sits in every operation's latency, and in the verifier's handler time —
//! and every node keeps reporting at that interval for the rest of the run. With
//! `--customer-traffic` an emulated customer pushes 1 MiB through each node once it is deployed
//! (after its registration delay and the meter's 100 ms minimum between reports), so a long,
//! realistic reporting interval no longer sits in the latency.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use serde_json::json;

use super::tracker::{Tracker, ops_events};
use super::{BenchStack, CpuSnapshot, HANDLER, PICKUP, StageFigures, StageWatch, capacity, percentile, procfs, put_faults, r3, r6};
use pnctl::endpoints;
use pnctl::parse_duration;

/// A real cloud's waits (runbook): VPS boot, OS prep, sidecar registration.
pub const REAL_BOOT_MS: f64 = 30_000.0;
pub const REAL_PREP_MS: f64 = 120_000.0;
pub const REAL_REGISTRATION_MS: f64 = 10_000.0;

#[derive(Debug, Clone, clap::Args)]
pub struct PipelineArgs {
    /// How many intents to enqueue at once.
    #[arg(long, default_value_t = 500)]
    pub intents: usize,
    /// Print one JSON object (the documented keys; `realistic` added with --realistic).
    #[arg(long)]
    pub json: bool,
    /// Sim delays of a real cloud (boot 30 s, prep 120 s, registration 10 s) divided by
    /// --scale; reports the overhead against them, then the in-flight capacity.
    #[arg(long)]
    pub realistic: bool,
    /// With --realistic: what the real delays are divided by.
    #[arg(long, default_value_t = 100.0)]
    pub scale: f64,
    /// The sidecars' usage reporting interval (sim knob usageIntervalMs).
    #[arg(long, default_value_t = 200)]
    pub usage_interval_ms: u64,
    /// Push 1 MiB of customer traffic through each node once it is deployed (the sidecar then
    /// reports at once instead of at its next interval).
    #[arg(long)]
    pub customer_traffic: bool,
    /// PN_MAX_IN_FLIGHT for the services (default 256, the services' own default: operations
    /// waiting on a node's prep are parked, they hold no handler slot).
    #[arg(long)]
    pub max_in_flight: Option<usize>,
    /// svc-claimer's claim budget (PN_MAX_CLAIMED). Default: every intent of the run plus the
    /// highest capacity level — the bench measures the stages' overhead and capacity, not the
    /// admission of work, so the claimer's own default (PN_MAX_IN_FLIGHT) must not throttle it.
    /// Set lower to see the budget's effect (queued→verified then includes the wait at Center).
    #[arg(long)]
    pub max_claimed: Option<usize>,
    /// With --realistic: the in-flight levels at which memory is measured.
    #[arg(long, value_delimiter = ',', default_value = "500,1000,2000,4000,8000,10000")]
    pub levels: Vec<usize>,
    /// With --realistic: skip the in-flight capacity measurement.
    #[arg(long)]
    pub no_capacity: bool,
    /// Give up on operations not verified by then (default: the intrinsic waits + 60 s + 50 ms
    /// per intent).
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Keep the temporary data dir (logs, state) after the run.
    #[arg(long)]
    pub keep: bool,
}

/// `--json`: exactly these keys (plus `realistic` with --realistic).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PipelineReport {
    pub intents: usize,
    pub provisions_per_sec: f64,
    pub p50_queued_to_verified_ms: f64,
    pub p99_queued_to_verified_ms: f64,
    /// The worst per-stage p99 of `pn_stage_pickup_seconds` (publish → handler start).
    pub p99_stage_overhead_ms: f64,
    /// utime + stime of the five services during the run, ÷ intents.
    pub cpu_seconds_per_provision: f64,
    /// VmHWM of each service at the end of the run.
    pub peak_rss_bytes: BTreeMap<String, u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub realistic: Option<RealisticReport>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RealisticReport {
    pub scale: f64,
    /// boot + prep + registration as set in the sim.
    pub intrinsic_wait_ms: f64,
    /// queued→verified minus the intrinsic waits, per operation.
    pub overhead_p50_ms: f64,
    pub overhead_p99_ms: f64,
    pub overhead_fraction_p50: f64,
    pub overhead_fraction_p99: f64,
    /// Σ over the stages of the mean pickup lag: the event hand-offs alone.
    pub handoff_ms: f64,
    pub handoff_fraction: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity: Option<capacity::CapacityReport>,
}

/// What the human report shows beyond the JSON.
#[derive(Debug, Clone, Default)]
pub struct Details {
    pub load_before: String,
    pub load_after: String,
    pub machine: String,
    pub verified: usize,
    pub failures: Vec<(String, String)>,
    pub elapsed: Duration,
    /// Rate between the 10th and the 90th percentile of verifications.
    pub steady_per_sec: f64,
    pub pickup: BTreeMap<String, StageFigures>,
    pub handler: BTreeMap<String, StageFigures>,
    pub cpu: BTreeMap<String, f64>,
    pub restarted: Vec<String>,
    pub faults: String,
    /// p50/p99 of each step as pnctl saw the events: queued→claimed, →instance, →deployed, →verified.
    pub steps: Vec<(&'static str, f64, f64)>,
    pub max_in_flight: usize,
    /// svc-claimer's claim budget for the run (PN_MAX_CLAIMED).
    pub max_claimed: usize,
    pub data_dir: PathBuf,
}

pub async fn main(args: &PipelineArgs, data_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let (report, details) = run(args, data_dir).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", human(args, &report, &details));
    }
    if !details.failures.is_empty() {
        for (op, why) in details.failures.iter().take(10) {
            eprintln!("pnctl bench: {op}: {why}");
        }
        anyhow::bail!("{} of {} operations were not verified", details.failures.len(), args.intents);
    }
    Ok(())
}

/// The sim delays of a run.
fn delays(args: &PipelineArgs) -> (f64, f64, f64) {
    if args.realistic {
        let f = args.scale.max(1e-3);
        (REAL_BOOT_MS / f, REAL_PREP_MS / f, REAL_REGISTRATION_MS / f)
    } else {
        (0.0, 0.0, 0.0)
    }
}

pub async fn run(args: &PipelineArgs, data_dir: Option<PathBuf>) -> anyhow::Result<(PipelineReport, Details)> {
    anyhow::ensure!(args.intents > 0, "--intents must be at least 1");
    anyhow::ensure!(args.scale > 0.0, "--scale must be positive");
    let capacity_on = args.realistic && !args.no_capacity;
    let max_in_flight = args.max_in_flight.unwrap_or(256);
    let highest_level = if capacity_on { args.levels.iter().copied().max().unwrap_or(0) } else { 0 };
    let max_claimed = args.max_claimed.unwrap_or(args.intents + highest_level).max(1);
    // Only svc-claimer reads PN_MAX_CLAIMED.
    let mut env = vec![("PN_MAX_IN_FLIGHT".to_string(), max_in_flight.to_string()), ("PN_MAX_CLAIMED".to_string(), max_claimed.to_string())];
    if capacity_on {
        // The capacity phase parks operations in the OS prep far longer than its 5-minute
        // default limit; the deployer alone reads this key.
        env.push(("PN_SSH__PREP_TIMEOUT_MS".into(), (4 * 3600 * 1000).to_string()));
    }
    let mut details = Details { load_before: procfs::loadavg(), machine: procfs::machine(), max_in_flight, max_claimed, ..Default::default() };
    if !args.json {
        eprintln!(
            "pnctl bench: starting a dev stack (PN_MAX_IN_FLIGHT={max_in_flight}, PN_MAX_CLAIMED={max_claimed}); load average {}",
            details.load_before
        );
    }
    let stack = BenchStack::start(data_dir, &env).await?;
    details.data_dir = stack.dir.clone();
    let res = tokio::select! {
        r = measure(args, &stack, &mut details) => r,
        _ = pnctl::stack::stop_signal() => Err(anyhow::anyhow!("interrupted")),
    };
    if !args.json {
        eprintln!("pnctl bench: stopping the stack");
    }
    let stopped = stack.stop(args.keep || res.is_err()).await;
    let report = res?;
    stopped?;
    Ok((report, details))
}

/// When the emulated customer's traffic goes through a deployed node: after its registration
/// delay, plus 150 ms so that the report it triggers is not within the meter's 100 ms of the
/// sidecar's first (baseline) report.
fn push_after(args: &PipelineArgs) -> Option<Duration> {
    args.customer_traffic.then(|| Duration::from_millis(delays(args).2 as u64 + 150))
}

/// Intents before the measured run: connections, caches and the metrics' summaries exist
/// before the figures start (see `StageWatch`).
pub const WARM_UP: usize = 10;

async fn warm_up(
    args: &PipelineArgs,
    stack: &BenchStack,
    http: &reqwest::Client,
    events: &mut async_nats::jetstream::consumer::pull::Ordered,
    tag: &str,
) -> anyhow::Result<()> {
    if !args.json {
        eprintln!("pnctl bench: warming up with {WARM_UP} intents");
    }
    let mut t = Tracker::new(http.clone(), &stack.file.center_url);
    t.push_after = push_after(args);
    t.enqueue(WARM_UP, &format!("{tag}w"), 0).await?;
    let (boot, prep, reg) = delays(args);
    let patience = Duration::from_millis((boot + prep + reg) as u64) + Duration::from_secs(60);
    let deadline = tokio::time::Instant::now() + patience;
    while t.done < WARM_UP {
        tokio::select! {
            m = events.next() => match m {
                Some(Ok(msg)) => t.on_event(&msg.subject, &msg.payload),
                Some(Err(e)) => tracing::debug!(error = %e, "PN_OPS read error; the ordered consumer recovers"),
                None => anyhow::bail!("the PN_OPS event stream ended"),
            },
            _ = tokio::time::sleep_until(deadline) => anyhow::bail!("the warm-up intents were not verified within {}s", patience.as_secs()),
        }
    }
    if t.failed > 0 {
        let why: Vec<String> = t.ops.values().filter_map(|o| o.failed.clone()).take(3).collect();
        anyhow::bail!("{} warm-up operations failed: {}", t.failed, why.join("; "));
    }
    // Drain the metrics buffers once, so the run starts with every summary's bucket in place.
    let mut w = StageWatch::new(http.clone(), &stack.services()).await;
    w.observe().await;
    Ok(())
}

async fn measure(args: &PipelineArgs, stack: &BenchStack, details: &mut Details) -> anyhow::Result<PipelineReport> {
    let http = endpoints::http()?;
    let center = stack.file.center_url.clone();
    let (boot, prep, reg) = delays(args);
    let faults = json!({
        "bootDelayMs": boot.round() as u64,
        "prepDelayMs": prep.round() as u64,
        "registrationDelayMs": reg.round() as u64,
        "usageIntervalMs": args.usage_interval_ms,
    });
    put_faults(&http, &center, &faults).await?;
    details.faults = faults.to_string();
    let (_client, mut events) = ops_events(&stack.file.nats_url, &stack.dir).await?;
    // Let the services settle (their first polls, consumer creation) before the baseline.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let tag = hex::encode(rand::random::<[u8; 3]>());
    let services = stack.services();
    warm_up(args, stack, &http, &mut events, &tag).await?;
    let cpu_before = CpuSnapshot::take(&stack.all_procs());
    let mut watch = StageWatch::new(http.clone(), &services).await;
    let mut tracker = Tracker::new(http.clone(), &center);
    tracker.push_after = push_after(args);
    let intrinsic = boot + prep + reg;
    let timeout = args
        .timeout
        .unwrap_or_else(|| Duration::from_millis(intrinsic as u64) + Duration::from_secs(60) + Duration::from_millis(50 * args.intents as u64));
    if !args.json {
        eprintln!("pnctl bench: enqueueing {} intents (sim delays: boot {boot:.0} ms, prep {prep:.0} ms, registration {reg:.0} ms)", args.intents);
    }

    let t0 = Instant::now();
    tracker.enqueue(args.intents, &tag, 0).await?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut scrape = tokio::time::interval(Duration::from_secs(2));
    scrape.tick().await;
    let mut progress = tokio::time::interval(Duration::from_secs(5));
    progress.tick().await;
    while tracker.done < args.intents {
        tokio::select! {
            m = events.next() => match m {
                Some(Ok(msg)) => tracker.on_event(&msg.subject, &msg.payload),
                Some(Err(e)) => tracing::debug!(error = %e, "PN_OPS read error; the ordered consumer recovers"),
                None => anyhow::bail!("the PN_OPS event stream ended"),
            },
            _ = scrape.tick() => watch.observe().await,
            _ = progress.tick(), if !args.json => {
                eprintln!("pnctl bench: {:>5.1}s  {} of {} done ({} failed)", t0.elapsed().as_secs_f64(), tracker.done, args.intents, tracker.failed);
            }
            _ = tokio::time::sleep_until(deadline) => tracker.give_up(&format!("not verified within {}s", timeout.as_secs())),
        }
    }
    let last = tracker.ops.values().filter_map(|o| o.verified_at).max();
    details.elapsed = last.map(|l| l.duration_since(t0)).unwrap_or_else(|| t0.elapsed());
    watch.observe().await;
    let cpu_after = CpuSnapshot::take(&stack.all_procs());
    let (cpu, restarted) = cpu_after.since(&cpu_before);
    details.cpu = cpu;
    details.restarted = restarted;
    details.load_after = procfs::loadavg();
    let peak = super::peak_rss(&stack.services());
    drop(events);

    let mut lat: Vec<f64> = tracker.ops.values().filter_map(|o| o.verified_ms).collect();
    lat.sort_by(f64::total_cmp);
    details.verified = lat.len();
    details.failures = tracker.ops.iter().filter_map(|(id, o)| o.failed.clone().map(|f| (id.clone(), f))).collect();
    let mut at: Vec<f64> = tracker.ops.values().filter_map(|o| o.verified_at).map(|t| t.duration_since(t0).as_secs_f64()).collect();
    at.sort_by(f64::total_cmp);
    if at.len() >= 10 {
        let (a, b) = (percentile(&at, 0.1), percentile(&at, 0.9));
        let between = (at.len() as f64 * 0.8).round();
        details.steady_per_sec = if b > a { between / (b - a) } else { 0.0 };
    }
    let names = ["queued→claimed", "claimed→instance", "instance→deployed", "deployed→verified"];
    for (i, name) in names.into_iter().enumerate() {
        let mut v: Vec<f64> = tracker
            .ops
            .values()
            .filter_map(|o| {
                let from = if i == 0 { Some(o.enqueued) } else { o.seen[i - 1] };
                Some(o.seen[i]?.saturating_duration_since(from?).as_secs_f64() * 1000.0)
            })
            .collect();
        v.sort_by(f64::total_cmp);
        details.steps.push((name, percentile(&v, 0.5), percentile(&v, 0.99)));
    }
    details.pickup = watch.figures(PICKUP);
    details.handler = watch.figures(HANDLER);
    let service_names: Vec<String> = services.iter().map(|s| s.name.clone()).collect();
    let service_cpu: f64 = details.cpu.iter().filter(|(n, _)| service_names.contains(n)).map(|(_, c)| c).sum();

    let realistic = if args.realistic {
        let mut over: Vec<f64> = lat.iter().map(|l| l - intrinsic).collect();
        over.sort_by(f64::total_cmp);
        let handoff: f64 = details.pickup.values().map(|f| f.mean_ms).sum();
        let capacity = if args.no_capacity {
            None
        } else {
            let opts = capacity::CapacityOpts { levels: args.levels.clone(), boot_ms: boot, json: args.json };
            Some(capacity::run(stack, &http, &opts).await?)
        };
        Some(RealisticReport {
            scale: args.scale,
            intrinsic_wait_ms: r3(intrinsic),
            overhead_p50_ms: r3(percentile(&over, 0.5)),
            overhead_p99_ms: r3(percentile(&over, 0.99)),
            overhead_fraction_p50: r6(percentile(&over, 0.5) / intrinsic.max(1.0)),
            overhead_fraction_p99: r6(percentile(&over, 0.99) / intrinsic.max(1.0)),
            handoff_ms: r3(handoff),
            handoff_fraction: r6(handoff / intrinsic.max(1.0)),
            capacity,
        })
    } else {
        None
    };

    Ok(PipelineReport {
        intents: args.intents,
        provisions_per_sec: r3(details.verified as f64 / details.elapsed.as_secs_f64().max(1e-9)),
        p50_queued_to_verified_ms: r3(percentile(&lat, 0.5)),
        p99_queued_to_verified_ms: r3(percentile(&lat, 0.99)),
        p99_stage_overhead_ms: r3(details.pickup.values().map(|f| f.p99_ms).fold(0.0, f64::max)),
        cpu_seconds_per_provision: r6(service_cpu / args.intents as f64),
        peak_rss_bytes: peak,
        realistic,
    })
}

fn human(args: &PipelineArgs, r: &PipelineReport, d: &Details) -> String {
    use super::{mib, table};
    let mut out = String::new();
    out.push_str(&format!("pnctl bench pipeline --intents {}{}\n", r.intents, if args.realistic { format!(" --realistic --scale {}", args.scale) } else { String::new() }));
    out.push_str(&format!("machine: {}; load average before {} / after {}\n", d.machine, d.load_before, d.load_after));
    out.push_str(&format!(
        "sim faults: {}; PN_MAX_IN_FLIGHT={}; PN_MAX_CLAIMED={}{}; customer traffic: {}\n\n",
        d.faults,
        d.max_in_flight,
        d.max_claimed,
        if args.max_claimed.is_none() { " (the claimer's budget, set above the run so it does not throttle it)" } else { "" },
        if args.customer_traffic { "1 MiB per node once deployed" } else { "none (usage = the sidecars' interval chatter)" }
    ));
    out.push_str(&format!(
        "verified {} of {} in {:.2}s: {:.1} provisions/s end to end ({:.1}/s between the 10th and 90th percentile)\n",
        d.verified,
        r.intents,
        d.elapsed.as_secs_f64(),
        r.provisions_per_sec,
        d.steady_per_sec
    ));
    out.push_str(&format!("queued→verified: p50 {:.0} ms, p99 {:.0} ms\n", r.p50_queued_to_verified_ms, r.p99_queued_to_verified_ms));
    out.push_str(&format!("worst stage pickup p99 (publish → handler start): {:.1} ms\n", r.p99_stage_overhead_ms));
    let steps: Vec<String> = d.steps.iter().map(|(n, a, b)| format!("{n} {a:.0}/{b:.0}")).collect();
    out.push_str(&format!("steps as pnctl saw the events, p50/p99 ms: {}\n\n", steps.join(", ")));
    let mut rows = vec![vec![
        "stage".into(),
        "msgs".into(),
        "pickup mean".into(),
        "p50".into(),
        "p99".into(),
        "max".into(),
        "handler mean".into(),
        "p50".into(),
        "p99".into(),
    ]];
    for stage in ["claim", "cloud", "deploy", "verify", "meter"] {
        let p = d.pickup.get(stage).cloned().unwrap_or_default();
        let h = d.handler.get(stage).cloned().unwrap_or_default();
        rows.push(vec![
            stage.into(),
            p.count.to_string(),
            format!("{:.1} ms", p.mean_ms),
            format!("{:.1} ms", p.p50_ms),
            format!("{:.1} ms", p.p99_ms),
            format!("{:.1} ms", p.max_ms),
            format!("{:.0} ms", h.mean_ms),
            format!("{:.0} ms", h.p50_ms),
            format!("{:.0} ms", h.p99_ms),
        ]);
    }
    out.push_str(&table(&rows));
    out.push_str("\n(claim = svc-claimer's consumers of pn.op.instance/failed; the claim itself is a Center poll)\n\n");
    let mut rows = vec![vec!["process".into(), "cpu s".into(), "cpu ms/provision".into(), "peak RSS".into()]];
    for (name, c) in &d.cpu {
        let peak = r.peak_rss_bytes.get(name).map(|b| mib(*b)).unwrap_or_else(|| "-".into());
        rows.push(vec![name.clone(), format!("{c:.2}"), format!("{:.2}", c / r.intents as f64 * 1000.0), peak]);
    }
    out.push_str(&table(&rows));
    out.push_str(&format!("\nCPU per provision (the five services): {:.2} ms\n", r.cpu_seconds_per_provision * 1000.0));
    if !d.restarted.is_empty() {
        out.push_str(&format!("restarted during the run (their CPU counts only the new process): {}\n", d.restarted.join(", ")));
    }
    if let Some(x) = &r.realistic {
        out.push_str(&format!(
            "\nrealistic (scale {}): intrinsic waits {:.0} ms; overhead p50 {:.0} ms ({:.2}%), p99 {:.0} ms ({:.2}%); event hand-offs Σ mean {:.1} ms ({:.3}%)\n",
            x.scale,
            x.intrinsic_wait_ms,
            x.overhead_p50_ms,
            x.overhead_fraction_p50 * 100.0,
            x.overhead_p99_ms,
            x.overhead_fraction_p99 * 100.0,
            x.handoff_ms,
            x.handoff_fraction * 100.0
        ));
        if let Some(c) = &x.capacity {
            out.push_str(&capacity::human(c));
        }
    }
    let met = |ok: bool| if ok { "met" } else { "MISSED" };
    match &r.realistic {
        None => out.push_str(&format!(
            "\ngoals (2 cores): ≥ 100 provisions/s: {}; p99 stage overhead < 50 ms: {}",
            met(r.provisions_per_sec >= 100.0),
            met(r.p99_stage_overhead_ms < 50.0)
        )),
        Some(x) => {
            out.push_str(&format!("\ngoals: overhead < 1% of the intrinsic waits (p99): {}", met(x.overhead_fraction_p99 < 0.01)));
            if let Some(c) = &x.capacity {
                out.push_str(&format!(
                    "; 10,000 in flight: {}; < 4 KiB per in-flight operation: {}",
                    met(c.max_in_flight_reached >= 10_000),
                    met(c.services_bytes_per_op < 4096.0)
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_report_has_exactly_the_documented_keys() {
        let r = PipelineReport {
            intents: 5,
            provisions_per_sec: 1.0,
            p50_queued_to_verified_ms: 2.0,
            p99_queued_to_verified_ms: 3.0,
            p99_stage_overhead_ms: 4.0,
            cpu_seconds_per_provision: 0.5,
            peak_rss_bytes: [("svc-cloud".to_string(), 7u64)].into_iter().collect(),
            realistic: None,
        };
        let v = serde_json::to_value(&r).unwrap_or_default();
        let keys: Vec<&String> = v.as_object().map(|m| m.keys().collect()).unwrap_or_default();
        let mut want = vec![
            "cpuSecondsPerProvision",
            "intents",
            "p50QueuedToVerifiedMs",
            "p99QueuedToVerifiedMs",
            "p99StageOverheadMs",
            "peakRssBytes",
            "provisionsPerSec",
        ];
        want.sort();
        assert_eq!(keys, want);
        assert_eq!(v["peakRssBytes"]["svc-cloud"], 7);
    }

    #[test]
    fn realistic_delays_are_the_real_ones_scaled() {
        let mut a = PipelineArgs {
            intents: 1,
            json: true,
            realistic: true,
            scale: 100.0,
            usage_interval_ms: 200,
            customer_traffic: false,
            max_in_flight: None,
            max_claimed: None,
            levels: vec![],
            no_capacity: true,
            timeout: None,
            keep: false,
        };
        assert_eq!(delays(&a), (300.0, 1200.0, 100.0));
        a.realistic = false;
        assert_eq!(delays(&a), (0.0, 0.0, 0.0));
    }
}
