//! `pnctl bench` (the `pn-bench` binary, which `pnctl bench …` runs with the same arguments, so
//! that pnctl depends on no service): measured figures, not promises. `pipeline` drives intents through a dev stack
//! it starts itself (`pnctl up --detach` on a fresh data dir, `down` at the end) with the
//! simulator's delays at zero, or — `--realistic` — at a real cloud's delays scaled down, and
//! then measures how many operations can wait in flight at once; `footprint` measures each
//! service's idle memory, start-to-ready time and the image size; `meter` measures the meter's
//! ingest through the dev stack's ingress (`pn-ingress` → center-sim, copies to svc-meter) on a
//! scratch NATS, or — `--direct` — the meter alone (`meter_load`, an in-process svc-meter).
//!
//! Never: run against a stack it did not start (other work would mix into the figures), print
//! a secret (the dev secrets reach the children through their environment only), or claim a
//! figure it did not measure — every report carries the machine's load when it ran.

pub mod capacity;
pub mod footprint;
pub mod meter;
pub mod meter_load;
pub mod pipeline;
pub mod procfs;
pub mod prom;
pub mod tracker;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail};
use serde_json::Value;

use pnctl::stack::{self, SERVICES, StackFile};

/// `pnctl bench <what>`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum BenchCmd {
    /// Provisions end to end: throughput, latency, per-stage overhead, CPU and memory per service.
    Pipeline(pipeline::PipelineArgs),
    /// Each service's idle RSS, start-to-ready time, and the image size estimate.
    Footprint(footprint::FootprintArgs),
    /// The meter's durable reports/s through the dev stack's ingress (the copies of what Center
    /// answers) against a no-op mirror; `--direct`: the meter alone against a no-op handler.
    Meter(meter::MeterArgs),
}

/// Runs one benchmark and prints its report. `data_dir` is the `--data-dir` the operator gave
/// explicitly (the stack then lives there and is kept); `None` uses a fresh temporary one.
pub async fn run(cmd: &BenchCmd, data_dir: Option<PathBuf>) -> anyhow::Result<()> {
    match cmd {
        BenchCmd::Pipeline(a) => pipeline::main(a, data_dir).await,
        BenchCmd::Footprint(a) => footprint::main(a, data_dir).await,
        BenchCmd::Meter(a) => meter::main(a).await,
    }
}

// ---------------------------------------------------------------------------------------------
// the stack a benchmark runs on

/// A dev stack started for one benchmark (through `pnctl up --detach`, so the supervisor, the
/// secrets and stack.json are exactly the operator's) and stopped by [`BenchStack::stop`].
pub struct BenchStack {
    pub dir: PathBuf,
    pub file: StackFile,
    temp: bool,
}

impl BenchStack {
    /// Starts the stack in `dir` (a fresh temporary directory when `None`). `env` reaches the
    /// supervisor and, through it, every child (e.g. `PN_MAX_IN_FLIGHT`); the stack's own
    /// per-service settings still win where it sets them.
    pub async fn start(dir: Option<PathBuf>, env: &[(String, String)]) -> anyhow::Result<BenchStack> {
        let (dir, temp) = match dir {
            Some(d) => (d, false),
            None => (fresh_dir()?, true),
        };
        // The pnctl next to this binary (target/debug), as the operator would run it.
        let exe = stack::find_bin("pnctl")?;
        let out = tokio::process::Command::new(exe)
            .args(["up", "--detach", "--json", "--data-dir"])
            .arg(&dir)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .await
            .context("run `pnctl up --detach`")?;
        if !out.status.success() {
            bail!("`pnctl up --detach --data-dir {}` failed:\n{}", dir.display(), String::from_utf8_lossy(&out.stderr).trim_end());
        }
        let file: StackFile = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("`pnctl up --detach --json` printed no stack file: {}", String::from_utf8_lossy(&out.stdout)))?;
        Ok(BenchStack { dir, file, temp })
    }

    /// The current stack file (pids change when the supervisor restarts a child).
    pub fn current(&self) -> StackFile {
        StackFile::read(&self.dir).unwrap_or_else(|_| self.file.clone())
    }

    /// Each service's pid and ops URL, from the current stack file.
    pub fn services(&self) -> Vec<Proc> {
        let s = self.current();
        SERVICES
            .iter()
            .filter_map(|n| s.services.get(*n).map(|e| Proc { name: n.to_string(), pid: e.pid, ops_url: e.ops_url.clone() }))
            .collect()
    }

    /// The services plus center-sim and nats-server (not part of the pipeline's own cost).
    pub fn all_procs(&self) -> Vec<Proc> {
        let s = self.current();
        let mut v = self.services();
        if let Some(e) = s.services.get(stack::CENTER_SIM) {
            v.push(Proc { name: stack::CENTER_SIM.into(), pid: e.pid, ops_url: String::new() });
        }
        v.push(Proc { name: stack::NATS.into(), pid: s.nats_pid, ops_url: String::new() });
        v
    }

    /// `pnctl down`, then the temporary directory goes unless `keep`.
    pub async fn stop(self, keep: bool) -> anyhow::Result<()> {
        let msg = stack::down(&self.dir).await;
        if self.temp && !keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("pnctl bench: the stack's data dir (logs, state) is kept at {}", self.dir.display());
        }
        msg.map(|_| ())
    }
}

/// One process of the stack.
#[derive(Debug, Clone)]
pub struct Proc {
    pub name: String,
    pub pid: Option<u32>,
    pub ops_url: String,
}

fn fresh_dir() -> anyhow::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("pnctl-bench-{}-{}", std::process::id(), hex::encode(rand::random::<[u8; 4]>())));
    std::fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
    Ok(d)
}

/// `PUT <center>/admin/faults` (merged by the sim); fails with the sim's words.
pub async fn put_faults(http: &reqwest::Client, center: &str, faults: &Value) -> anyhow::Result<Value> {
    let url = format!("{center}/admin/faults");
    let resp = http.put(&url).json(faults).send().await.with_context(|| format!("PUT {url}"))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("PUT {url}: {status}: {text}");
    }
    Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
}

// ---------------------------------------------------------------------------------------------
// metrics: the per-stage summaries of every service

/// One stage's figures over a run, in milliseconds.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StageFigures {
    /// Messages this stage started on during the run (first deliveries).
    pub count: u64,
    /// Mean over the run (from the lifetime `_sum`/`_count` deltas).
    pub mean_ms: f64,
    /// The run's p50 / p99 from the histogram's buckets (interpolated), and the upper bound of
    /// the highest bucket that saw a sample (the most any sample can have been).
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Scrapes every service's `/metrics` at the start of a run and again at its end; a stage's
/// figures are the difference of the two histograms, so they cover the run and only the run
/// (the services export cumulative histograms with buckets, kit::ops::SECONDS_BUCKETS).
/// Quantiles are interpolated inside a bucket, so they are as fine as the buckets around them.
pub struct StageWatch {
    http: reqwest::Client,
    urls: Vec<String>,
    base: BTreeMap<(String, String), prom::Histogram>,
    last: BTreeMap<(String, String), prom::Histogram>,
}

pub const PICKUP: &str = "pn_stage_pickup_seconds";
pub const HANDLER: &str = "pn_handler_seconds";

impl StageWatch {
    pub async fn new(http: reqwest::Client, procs: &[Proc]) -> StageWatch {
        let urls = procs.iter().filter(|p| !p.ops_url.is_empty()).map(|p| format!("{}/metrics", p.ops_url)).collect();
        let mut w = StageWatch { http, urls, base: BTreeMap::new(), last: BTreeMap::new() };
        w.base = w.scrape_all().await;
        w
    }

    async fn scrape_all(&self) -> BTreeMap<(String, String), prom::Histogram> {
        let mut out = BTreeMap::new();
        for url in &self.urls {
            let Ok(resp) = self.http.get(url).send().await else { continue };
            let Ok(text) = resp.text().await else { continue };
            for metric in [PICKUP, HANDLER] {
                for (stage, h) in prom::histograms(&text, metric) {
                    out.insert((metric.to_string(), stage), h);
                }
            }
        }
        out
    }

    /// One scrape; the last one taken is the end of the run.
    pub async fn observe(&mut self) {
        self.last = self.scrape_all().await;
    }

    /// The figures of `metric` per stage, for the stages that saw messages during the run.
    pub fn figures(&self, metric: &str) -> BTreeMap<String, StageFigures> {
        let mut out = BTreeMap::new();
        for ((m, stage), h) in &self.last {
            if m != metric {
                continue;
            }
            let run = h.since(&self.base.get(&(m.clone(), stage.clone())).cloned().unwrap_or_default());
            if run.count == 0 {
                continue;
            }
            out.insert(
                stage.clone(),
                StageFigures {
                    count: run.count,
                    mean_ms: run.sum / run.count as f64 * 1000.0,
                    p50_ms: run.quantile(0.5).unwrap_or(0.0) * 1000.0,
                    p99_ms: run.quantile(0.99).unwrap_or(0.0) * 1000.0,
                    max_ms: run.max_bound().unwrap_or(0.0) * 1000.0,
                },
            );
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// CPU and memory of the stack's processes

/// CPU seconds of each process, taken before and after a run.
#[derive(Debug, Clone, Default)]
pub struct CpuSnapshot(pub BTreeMap<String, (u32, f64)>);

impl CpuSnapshot {
    pub fn take(procs: &[Proc]) -> CpuSnapshot {
        CpuSnapshot(
            procs.iter().filter_map(|p| p.pid.and_then(|pid| procfs::cpu_seconds(pid).map(|c| (p.name.clone(), (pid, c))))).collect(),
        )
    }

    /// Seconds used since `before`, per process; a process restarted meanwhile (new pid) counts
    /// only its new life and is named in the second map.
    pub fn since(&self, before: &CpuSnapshot) -> (BTreeMap<String, f64>, Vec<String>) {
        let mut used = BTreeMap::new();
        let mut restarted = Vec::new();
        for (name, (pid, after)) in &self.0 {
            match before.0.get(name) {
                Some((bpid, b)) if bpid == pid => {
                    used.insert(name.clone(), (after - b).max(0.0));
                }
                _ => {
                    used.insert(name.clone(), *after);
                    restarted.push(name.clone());
                }
            }
        }
        (used, restarted)
    }
}

/// Peak RSS (VmHWM) of each process that is alive.
pub fn peak_rss(procs: &[Proc]) -> BTreeMap<String, u64> {
    procs.iter().filter_map(|p| p.pid.and_then(procfs::peak_rss).map(|b| (p.name.clone(), b))).collect()
}

/// Current RSS (VmRSS) of each process that is alive.
pub fn rss(procs: &[Proc]) -> BTreeMap<String, u64> {
    procs.iter().filter_map(|p| p.pid.and_then(procfs::rss).map(|b| (p.name.clone(), b))).collect()
}

// ---------------------------------------------------------------------------------------------
// small statistics

/// Nearest-rank percentile of `v` (sorted ascending); 0 when empty.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Least squares `y = a + b·x`: (intercept, slope, r²).
pub fn linear_fit(points: &[(f64, f64)]) -> (f64, f64, f64) {
    let n = points.len() as f64;
    if points.len() < 2 {
        return (points.first().map(|p| p.1).unwrap_or(0.0), 0.0, 0.0);
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let syy: f64 = points.iter().map(|p| (p.1 - my).powi(2)).sum();
    if sxx == 0.0 {
        return (my, 0.0, 0.0);
    }
    let b = sxy / sxx;
    let r2 = if syy == 0.0 { 1.0 } else { (sxy * sxy) / (sxx * syy) };
    (my - b * mx, b, r2)
}

pub fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

/// Rounds to 3 decimals (keeps the JSON readable).
pub fn r3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Rounds to 6 decimals (fractions, seconds per provision).
pub fn r6(v: f64) -> f64 {
    (v * 1e6).round() / 1e6
}

/// A plain text table: the first row is the header.
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; cols];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    rows.iter()
        .map(|r| {
            r.iter()
                .enumerate()
                .map(|(i, c)| if i == 0 { format!("{c:<w$}", w = widths[i]) } else { format!("{c:>w$}", w = widths[i]) })
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Where the workspace binaries are (next to this pnctl, like `pnctl up` finds them).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let p = stack::find_bin("svc-claimer")?;
    Ok(p.parent().map(Path::to_path_buf).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn a_line_is_fitted_exactly() {
        let pts: Vec<(f64, f64)> = [0.0, 500.0, 1000.0, 2000.0].iter().map(|x| (*x, 1000.0 + 3.5 * x)).collect();
        let (a, b, r2) = linear_fit(&pts);
        assert!((a - 1000.0).abs() < 1e-6 && (b - 3.5).abs() < 1e-9 && (r2 - 1.0).abs() < 1e-9);
        assert_eq!(linear_fit(&[(1.0, 2.0)]).1, 0.0);
    }

    #[test]
    fn tables_align() {
        let t = table(&[vec!["a".into(), "bb".into()], vec!["ccc".into(), "d".into()]]);
        assert_eq!(t, "a    bb\nccc   d");
    }
}
