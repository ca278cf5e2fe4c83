//! The in-flight capacity part of `pnctl bench pipeline --realistic`: operations are parked in
//! their longest wait (the OS prep, which runs detached on the node while the deployer keeps
//! the operation parked in JetStream — no session, no handler) and
//! each process's RSS is measured at several in-flight levels; a least-squares line through
//! (level, RSS) gives the memory per in-flight operation.
//!
//! It stops at the first level it cannot reach, or — before trying — at a level that would
//! exhaust a process's open-file limit (the simulator holds a listener per parked node), and
//! says which limit stopped it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use serde_json::json;

use super::tracker::{Tracker, ops_events};
use super::{BenchStack, Proc, StageWatch, linear_fit, mib, procfs, put_faults, r3, table};
use pnctl::endpoints::get_json;

/// How long a parked operation's prep lasts: far beyond the measurement.
const PARK_PREP_MS: u64 = 3 * 3600 * 1000;
/// Headroom kept below a process's open-file limit.
const FD_HEADROOM: f64 = 0.95;

#[derive(Debug, Clone)]
pub struct CapacityOpts {
    pub levels: Vec<usize>,
    pub boot_ms: f64,
    pub json: bool,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Level {
    pub in_flight: usize,
    /// VmRSS per process with `in_flight` operations parked.
    pub rss_bytes: BTreeMap<String, u64>,
    pub open_fds: BTreeMap<String, u64>,
    /// From the first intent of this level to all of them parked.
    pub reached_in_ms: u64,
    pub load1: f64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CapacityReport {
    /// Level 0 is the stack before any operation was parked.
    pub levels: Vec<Level>,
    /// Fitted RSS growth per in-flight operation, per process.
    pub bytes_per_op: BTreeMap<String, f64>,
    /// r² of each fit (1 = perfectly linear).
    pub r2: BTreeMap<String, f64>,
    /// Σ of the five services' slopes.
    pub services_bytes_per_op: f64,
    /// The same fits without level 0: what one more parked operation costs once the stack
    /// has run a level's burst — the first burst also raises each allocator's high-water mark
    /// by up to PN_MAX_IN_FLIGHT busy handlers, a fixed cost, not one per operation.
    pub marginal_bytes_per_op: BTreeMap<String, f64>,
    pub services_marginal_bytes_per_op: f64,
    pub max_in_flight_reached: usize,
    /// Why it stopped where it did.
    pub stopped_because: String,
}

async fn parked(http: &reqwest::Client, center: &str) -> anyhow::Result<usize> {
    let (status, v) = get_json(http, &format!("{center}/admin/instances")).await?;
    anyhow::ensure!(status == 200, "GET /admin/instances: {status}");
    Ok(v["items"]
        .as_array()
        .map(|a| a.iter().filter(|i| i["prepRuns"].as_u64().unwrap_or(0) >= 1 && i["hardened"] == json!(false) && i["status"] != "deleted").count())
        .unwrap_or(0))
}

/// RSS of every process, sampled three times a second apart; the median of each. The services'
/// metrics buffers are drained first (a Prometheus scrape would do it), so that what is
/// measured is the operations' state and not unscraped samples.
async fn sample(http: &reqwest::Client, procs: &[Proc]) -> BTreeMap<String, u64> {
    StageWatch::new(http.clone(), procs).await;
    let mut samples: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for i in 0..3 {
        if i > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        for (n, b) in super::rss(procs) {
            samples.entry(n).or_default().push(b);
        }
    }
    samples
        .into_iter()
        .map(|(n, mut v)| {
            v.sort_unstable();
            (n, v[v.len() / 2])
        })
        .collect()
}

fn fds(procs: &[Proc]) -> BTreeMap<String, u64> {
    procs.iter().filter_map(|p| p.pid.and_then(procfs::open_fds).map(|n| (p.name.clone(), n))).collect()
}

/// The highest level every process's open-file limit allows, from the fd growth seen so far.
fn fd_ceiling(procs: &[Proc], base: &Level, last: &Level) -> Option<(usize, String)> {
    if last.in_flight == 0 {
        return None;
    }
    let mut best: Option<(usize, String)> = None;
    for p in procs {
        let (Some(pid), Some(b), Some(l)) = (p.pid, base.open_fds.get(&p.name), last.open_fds.get(&p.name)) else { continue };
        let per_op = (*l as f64 - *b as f64) / last.in_flight as f64;
        let Some(limit) = procfs::fd_limit(pid) else { continue };
        if per_op < 0.05 {
            continue;
        }
        let max = ((limit as f64 * FD_HEADROOM - *b as f64) / per_op).max(0.0) as usize;
        let why = format!("{} holds {per_op:.2} open files per parked operation and its limit is {limit} (RLIMIT_NOFILE, hard limit on this machine)", p.name);
        if best.as_ref().is_none_or(|(m, _)| max < *m) {
            best = Some((max, why));
        }
    }
    best
}

fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| procfs::parse_status_kb(&s, "MemAvailable"))
        .map(|kb| kb * 1024)
        .unwrap_or(u64::MAX)
}

pub async fn run(stack: &BenchStack, http: &reqwest::Client, opts: &CapacityOpts) -> anyhow::Result<CapacityReport> {
    let center = stack.file.center_url.clone();
    put_faults(http, &center, &json!({ "prepDelayMs": PARK_PREP_MS, "operationTimeoutMs": 4 * PARK_PREP_MS })).await?;
    // A fresh view of PN_OPS: failures of parked operations are what this phase watches.
    let (_client, mut events) = ops_events(&stack.file.nats_url, &stack.dir).await?;
    let procs = stack.all_procs();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let base = Level { in_flight: 0, rss_bytes: sample(http, &procs).await, open_fds: fds(&procs), reached_in_ms: 0, load1: procfs::load1() };
    let mut levels = vec![base.clone()];
    let mut tracker = Tracker::new(http.clone(), &center);
    let tag = hex::encode(rand::random::<[u8; 3]>());
    let mut current = 0usize;
    let mut stopped_because = String::from("every requested level was reached");
    let mut wanted: Vec<usize> = opts.levels.iter().copied().filter(|l| *l > 0).collect();
    wanted.sort_unstable();
    wanted.dedup();
    let mut i = 0;
    while i < wanted.len() {
        let level = wanted[i];
        i += 1;
        if let Some((ceiling, why)) = fd_ceiling(&procs, &base, levels.last().unwrap_or(&base))
            && level > ceiling
        {
            let rounded = ceiling / 100 * 100;
            stopped_because = format!("{level} in flight would not fit: {why}, so at most ≈{ceiling}");
            if rounded > current && !wanted.contains(&rounded) {
                // One more level just under the ceiling: how far this machine goes.
                wanted.insert(i, rounded);
                stopped_because.push_str(&format!("; measured {rounded} instead"));
                continue;
            }
            break;
        }
        if mem_available() < 1 << 30 {
            stopped_because = format!("less than 1 GiB of memory available before {level}");
            break;
        }
        if !opts.json {
            eprintln!("pnctl bench: parking {} more operations in the OS prep ({level} in flight)", level - current);
        }
        let started = Instant::now();
        tracker.enqueue(level - current, &tag, current).await?;
        current = level;
        let patience = Duration::from_secs(120) + Duration::from_millis(opts.boot_ms as u64) + Duration::from_millis(60 * level as u64);
        let deadline = tokio::time::Instant::now() + patience;
        let mut poll = tokio::time::interval(Duration::from_secs(3));
        let mut count = 0;
        let reached = loop {
            tokio::select! {
                m = events.next() => {
                    if let Some(Ok(msg)) = m {
                        tracker.on_event(&msg.subject, &msg.payload);
                    }
                }
                _ = poll.tick() => {
                    count = parked(http, &center).await.unwrap_or(count);
                    if count + tracker.failed >= level {
                        break true;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => break false,
            }
        };
        if !reached {
            stopped_because = format!(
                "{level} in flight was not reached within {}s: {count} parked, {} failed",
                patience.as_secs(),
                tracker.failed
            );
            break;
        }
        if tracker.failed > 0 {
            let why: Vec<String> = tracker.ops.values().filter_map(|o| o.failed.clone()).take(3).collect();
            stopped_because = format!("{} operations failed on the way to {level} in flight: {}", tracker.failed, why.join("; "));
            break;
        }
        let reached_in_ms = started.elapsed().as_millis() as u64;
        // The deployer watches a started prep on its session for PN_SSH__PREP_INLINE_WAIT_MS
        // (5 s) before parking the operation: sample once the last ones have parked.
        tokio::time::sleep(Duration::from_secs(8)).await;
        let l = Level { in_flight: level, rss_bytes: sample(http, &procs).await, open_fds: fds(&procs), reached_in_ms, load1: procfs::load1() };
        if !opts.json {
            let total: u64 = stack.services().iter().filter_map(|s| l.rss_bytes.get(&s.name)).sum();
            eprintln!("pnctl bench: {level} in flight after {:.1}s; the five services hold {}", reached_in_ms as f64 / 1000.0, mib(total));
        }
        levels.push(l);
    }

    let services: Vec<String> = stack.services().into_iter().map(|s| s.name).collect();
    let mut bytes_per_op = BTreeMap::new();
    let mut marginal_bytes_per_op = BTreeMap::new();
    let mut r2 = BTreeMap::new();
    for p in &procs {
        let pts: Vec<(f64, f64)> =
            levels.iter().filter_map(|l| l.rss_bytes.get(&p.name).map(|b| (l.in_flight as f64, *b as f64))).collect();
        let (_, slope, fit) = linear_fit(&pts);
        bytes_per_op.insert(p.name.clone(), r3(slope));
        r2.insert(p.name.clone(), r3(fit));
        let later: Vec<(f64, f64)> = pts.iter().copied().filter(|(x, _)| *x > 0.0).collect();
        let marginal = if later.len() >= 2 { linear_fit(&later).1 } else { slope };
        marginal_bytes_per_op.insert(p.name.clone(), r3(marginal));
    }
    let services_bytes_per_op = r3(services.iter().filter_map(|s| bytes_per_op.get(s)).sum());
    let services_marginal_bytes_per_op = r3(services.iter().filter_map(|s| marginal_bytes_per_op.get(s)).sum());
    Ok(CapacityReport {
        max_in_flight_reached: levels.last().map(|l| l.in_flight).unwrap_or(0),
        levels,
        bytes_per_op,
        r2,
        services_bytes_per_op,
        marginal_bytes_per_op,
        services_marginal_bytes_per_op,
        stopped_because,
    })
}

pub fn human(c: &CapacityReport) -> String {
    let mut out = String::from("\nin-flight capacity (operations parked in the OS prep; VmRSS, median of 3 samples):\n");
    let names: Vec<String> = c.bytes_per_op.keys().cloned().collect();
    let mut header = vec!["in flight".to_string()];
    header.extend(names.iter().cloned());
    header.push("reached in".into());
    header.push("load".into());
    let mut rows = vec![header];
    for l in &c.levels {
        let mut r = vec![l.in_flight.to_string()];
        r.extend(names.iter().map(|n| l.rss_bytes.get(n).map(|b| mib(*b)).unwrap_or_else(|| "-".into())));
        r.push(format!("{:.1}s", l.reached_in_ms as f64 / 1000.0));
        r.push(format!("{:.2}", l.load1));
        rows.push(r);
    }
    let mut slope = vec!["KiB/op".to_string()];
    slope.extend(names.iter().map(|n| format!("{:.2}", c.bytes_per_op.get(n).copied().unwrap_or(0.0) / 1024.0)));
    rows.push(slope);
    let mut marginal = vec!["KiB/op, levels > 0".to_string()];
    marginal.extend(names.iter().map(|n| format!("{:.2}", c.marginal_bytes_per_op.get(n).copied().unwrap_or(0.0) / 1024.0)));
    rows.push(marginal);
    let mut fit = vec!["r²".to_string()];
    fit.extend(names.iter().map(|n| format!("{:.3}", c.r2.get(n).copied().unwrap_or(0.0))));
    rows.push(fit);
    let mut files = vec!["open files at max".to_string()];
    let last = c.levels.last();
    files.extend(names.iter().map(|n| last.and_then(|l| l.open_fds.get(n)).map(|f| f.to_string()).unwrap_or_else(|| "-".into())));
    rows.push(files);
    out.push_str(&table(&rows));
    out.push_str(&format!(
        "\nthe five services: {:.2} KiB per in-flight operation (goal < 4 KiB; {:.2} KiB fitted over the levels above 0, without the first burst's fixed cost); reached {} in flight (goal 10,000); stopped: {}\n",
        c.services_bytes_per_op / 1024.0,
        c.services_marginal_bytes_per_op / 1024.0,
        c.max_in_flight_reached,
        c.stopped_because
    ));
    out
}
