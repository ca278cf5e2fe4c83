//! The meter's load engine (`pnctl bench meter --direct`) against an in-process meter on a real
//! nats-server: the report's shape, never its speed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::Result;
use testkit::Nats;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bench_api_measures_an_in_process_meter() -> Result<()> {
    let nats = Nats::start()?;
    let report = pn_bench::meter_load::run(pn_bench::meter_load::BenchOpts {
        nats_url: nats.url(),
        nodes: 40,
        connections: 8,
        duration: Duration::from_millis(800),
        warmup: Duration::from_millis(200),
        ..Default::default()
    })
    .await?;
    assert_eq!(report.nodes, 40);
    assert_eq!(report.errors, 0, "{report:?}");
    assert!(report.reports_per_sec > 0.0 && report.noop_per_sec > 0.0, "{report:?}");
    assert!(report.p99_ms >= report.p50_ms && report.peak_rss_bytes > 0, "{report:?}");
    let json = serde_json::to_value(&report)?;
    for k in ["nodes", "reportsPerSec", "noopPerSec", "ratio", "p50Ms", "p99Ms", "peakRssBytes"] {
        assert!(json.get(k).is_some(), "{k} missing in {json}");
    }
    Ok(())
}

