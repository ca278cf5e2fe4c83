//! Each service's `/metrics` on a real stack: histograms with buckets, and the gauges read
//! from the services' own state (`pn_ops_in_flight`, `pn_ops_parked`, `pn_ops_overdue` per
//! stage, `pn_meter_nodes{state}`, `pn_relay_backlog{relay}`) — and that they move with an
//! operation: a slow boot parks it at the cloud stage (1, still 1 after svc-cloud is killed and
//! restarted: the gauge is read from sled), then back to 0; a report Center refuses shows in
//! the claimer's `pn_relay_backlog`; a node pushed past 95 % of its quota shows in
//! `pn_meter_nodes{state="cutoff"}`, its hide (Center without update_node) in the meter's.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::json;
use testkit::eventually;
use testkit::stack::Stack;

const PATIENCE: Duration = Duration::from_secs(120);

/// The stage each service exports its `pn_ops_*` gauges under.
const STAGES: [(&str, &str); 4] = [("svc-claimer", "claim"), ("svc-cloud", "cloud"), ("svc-deployer", "deploy"), ("svc-verifier", "verify")];

async fn scrape(stack: &Stack, service: &str) -> Option<String> {
    let addr = &stack.procs.get(service)?.name;
    let r = reqwest::Client::new().get(format!("http://{addr}/metrics")).timeout(Duration::from_secs(3)).send().await.ok()?;
    r.status().is_success().then_some(())?;
    r.text().await.ok()
}

/// The value of exactly `series` (name and labels as rendered, e.g. `pn_ops_parked{stage="cloud"}`).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn gauge(stack: &Stack, service: &str, series: &str) -> Option<f64> {
    value(&scrape(stack, service).await?, series)
}

/// Waits until `series` on `service` reads `want`.
async fn until(stack: &Stack, service: &str, series: &str, want: f64) {
    let what = format!("{service}: {series} = {want}");
    let res = eventually(&what, PATIENCE, || async { (gauge(stack, service, series).await? == want).then_some(()) }).await;
    if let Err(e) = res {
        panic!("{e}; last scrape:\n{}", scrape(stack, service).await.unwrap_or_default());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_exports_buckets_and_gauges_that_follow_an_operation() {
    let mut b = Stack::builder();
    for s in testkit::stack::SERVICES {
        b = b.env(s, "PN_GAUGE_SAMPLE_MS", "200");
    }
    let mut stack = b.start().await.unwrap();

    // Idle: every gauge is there, at 0.
    for (svc, stage) in STAGES {
        for g in ["pn_ops_in_flight", "pn_ops_parked", "pn_ops_overdue"] {
            until(&stack, svc, &format!("{g}{{stage=\"{stage}\"}}"), 0.0).await;
        }
    }
    for relay in ["claimer-instance", "claimer-failed", "claimer-verified"] {
        until(&stack, "svc-claimer", &format!("pn_relay_backlog{{relay=\"{relay}\"}}"), 0.0).await;
    }
    for state in ["ok", "warn", "cutoff"] {
        until(&stack, "svc-meter", &format!("pn_meter_nodes{{state=\"{state}\"}}"), 0.0).await;
    }
    until(&stack, "svc-meter", "pn_relay_backlog{relay=\"meter-visibility\"}", 0.0).await;

    // A slow boot (30 s, decided at the create): the operation waits parked at the cloud stage.
    stack.faults(json!({"bootDelayMs": 30_000})).await.unwrap();
    let (op, sub) = stack.intent("sg", 100_000_000, "residential").await.unwrap();
    until(&stack, "svc-cloud", "pn_ops_parked{stage=\"cloud\"}", 1.0).await;
    until(&stack, "svc-cloud", "pn_ops_in_flight{stage=\"cloud\"}", 1.0).await;
    stack.faults(json!({"bootDelayMs": 500})).await.unwrap();
    assert_eq!(gauge(&stack, "svc-cloud", "pn_ops_overdue{stage=\"cloud\"}").await, Some(0.0), "a boot within its timeout is not overdue");
    // Killed and started again mid-boot: its first sample, read from sled, holds the
    // operation parked (no handler has run in the new process to count anything).
    stack.restart("svc-cloud").await.unwrap();
    let after = eventually("svc-cloud's gauges after the restart", PATIENCE, || async {
        let t = scrape(&stack, "svc-cloud").await?;
        Some((value(&t, "pn_ops_in_flight{stage=\"cloud\"}")?, value(&t, "pn_ops_parked{stage=\"cloud\"}")?))
    })
    .await
    .unwrap();
    assert_eq!(after, (1.0, 1.0), "still booting after the restart: held and parked, read from sled");
    until(&stack, "svc-cloud", "pn_ops_parked{stage=\"cloud\"}", 0.0).await;
    until(&stack, "svc-cloud", "pn_ops_in_flight{stage=\"cloud\"}", 0.0).await;

    let v = stack.wait_status(&op, &["done", "failed"], PATIENCE).await.unwrap();
    assert_eq!(v["status"], "done", "{v}");
    // Handed on all the way: no stage holds it any more.
    for (svc, stage) in STAGES {
        until(&stack, svc, &format!("pn_ops_in_flight{{stage=\"{stage}\"}}"), 0.0).await;
        until(&stack, svc, &format!("pn_ops_overdue{{stage=\"{stage}\"}}"), 0.0).await;
    }
    // Every service ran a handler: its histogram has buckets (not a summary's quantiles).
    for svc in testkit::stack::SERVICES {
        let t = scrape(&stack, svc).await.unwrap();
        assert!(t.contains("pn_handler_seconds_bucket{"), "{svc} has no pn_handler_seconds buckets:\n{t}");
        assert!(!t.contains("quantile=\""), "{svc} still exports a summary:\n{t}");
        assert!(t.contains("# HELP pn_ops_in_flight ") || svc == "svc-meter", "{svc}: no HELP for pn_ops_in_flight:\n{t}");
    }
    // The two end-to-end histograms: queued → active (once per operation, at the verifier)
    // and the meter's answer to a usage report.
    let t = scrape(&stack, "svc-verifier").await.unwrap();
    assert_eq!(value(&t, "pn_time_to_active_seconds_count"), Some(1.0), "one operation became active:\n{t}");
    assert!(t.contains("pn_time_to_active_seconds_bucket{le="), "{t}");
    let t = scrape(&stack, "svc-meter").await.unwrap();
    assert!(value(&t, "pn_meter_ingest_seconds_count").is_some_and(|n| n >= 1.0), "the meter answered reports:\n{t}");
    assert!(t.contains("pn_meter_ingest_seconds_bucket{le="), "{t}");

    // Center refuses progress reports for a while: the claimer's in_progress report of a
    // second operation waits (nak'ed, unacknowledged), counted as relay backlog, then goes out.
    stack.faults(json!({"updateOperationErrorRate": 1.0})).await.unwrap();
    let (op2, _) = stack.intent("de", 100_000_000, "residential").await.unwrap();
    let waiting = eventually("a refused report counted in the claimer's backlog", PATIENCE, || async {
        (gauge(&stack, "svc-claimer", "pn_relay_backlog{relay=\"claimer-instance\"}").await? >= 1.0).then_some(())
    })
    .await;
    stack.faults(json!({"updateOperationErrorRate": 0.0})).await.unwrap();
    waiting.unwrap();
    until(&stack, "svc-claimer", "pn_relay_backlog{relay=\"claimer-instance\"}", 0.0).await;
    let v = stack.wait_status(&op2, &["done", "failed"], PATIENCE).await.unwrap();
    assert_eq!(v["status"], "done", "{v}");

    // The first node past 95 % of its sold quota, at a Center without update_node: counted as
    // cut off, its hide pending in the meter's relay backlog (Center's own cut-off still hides
    // it there); a raised quota lifts the cut-off and nothing is left to tell Center.
    let node = format!("pn-{sub}");
    until(&stack, "svc-meter", "pn_meter_nodes{state=\"ok\"}", 2.0).await;
    stack.faults(json!({"updateNodeTool": false})).await.unwrap();
    stack.admin_send(reqwest::Method::POST, &format!("/admin/nodes/{node}/traffic"), json!({"bytes": 97_000_000})).await.unwrap();
    until(&stack, "svc-meter", "pn_meter_nodes{state=\"cutoff\"}", 1.0).await;
    until(&stack, "svc-meter", "pn_meter_nodes{state=\"ok\"}", 1.0).await;
    let cutoffs = gauge(&stack, "svc-meter", "pn_meter_cutoffs_total").await.unwrap_or(0.0);
    assert!(cutoffs >= 1.0, "pn_meter_cutoffs_total = {cutoffs}");
    until(&stack, "svc-meter", "pn_relay_backlog{relay=\"meter-visibility\"}", 1.0).await;
    let r = stack.meter_internal(reqwest::Method::PUT, &format!("/v1/nodes/{node}/quota")).json(&json!({"soldBytes": 1_000_000_000u64})).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    until(&stack, "svc-meter", "pn_meter_nodes{state=\"cutoff\"}", 0.0).await;
    until(&stack, "svc-meter", "pn_meter_nodes{state=\"ok\"}", 2.0).await;
    until(&stack, "svc-meter", "pn_relay_backlog{relay=\"meter-visibility\"}", 0.0).await;

    let findings = stack.secret_findings().await.unwrap();
    assert!(findings.is_empty(), "{findings:?}");
}
