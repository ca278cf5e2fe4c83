//! The verifier's usage check follows runbook step 7 — "Usage recorded in Center:
//! `get_cloud_instance` for the node, `trafficUsedBytes` advancing" — on real parts
//! (nats-server, center-sim behind pn-ingress, the five service binaries):
//!
//! - with the meter stopped (SIGSTOP) for the whole deployment, the node is verified on
//!   Center's ledger alone (the meter published nothing about it): the check reads Center;
//! - a meter whose ledger disagrees with Center's (it counts tx only, Center rx+tx) is a
//!   warning and `pn_verify_usage_mismatch_total`, never a failure or a degradation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use kit::bus::Bus;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use proto::{Body, Event, subjects};
use serde_json::{Value, json};
use testkit::eventually;
use testkit::stack::Stack;

const GIB: u64 = 1 << 30;
const PATIENCE: Duration = Duration::from_secs(180);

fn signal(pid: u32, sig: Signal) {
    kill(Pid::from_raw(pid as i32), sig).unwrap();
}

async fn bus(stack: &Stack) -> Bus {
    Bus::connect(&stack.nats.url(), "test", Duration::from_secs(5)).await.unwrap()
}

/// The meter's last `meter.usage.<node>` (what the verifier reads as the cross-check).
async fn meter_news(stack: &Stack, node: &str) -> Option<proto::UsageRecorded> {
    let bus = bus(stack).await;
    let s = bus.js.get_stream(subjects::METER_STREAM).await.ok()?;
    let m = s.get_last_raw_message_by_subject(&subjects::meter_usage(node)).await.ok()?;
    match Event::from_bytes(&m.payload) {
        Ok(Body::Usage(u)) => Some(u),
        _ => None,
    }
}

/// Center's ledger of `node` (`trafficUsedBytes` in `GET /admin/nodes`).
async fn center_used(stack: &Stack, node: &str) -> u64 {
    let nodes = stack.items("/admin/nodes").await.unwrap();
    nodes.iter().find(|n| n["name"] == node).and_then(|n| n["trafficUsedBytes"].as_u64()).unwrap_or(0)
}

async fn verifier_metrics(stack: &Stack) -> String {
    let ops = stack.procs.get("svc-verifier").map(|p| p.name.clone()).unwrap_or_default();
    reqwest::get(format!("http://{ops}/metrics")).await.unwrap().text().await.unwrap()
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' '])).find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

async fn verified(stack: &Stack, op: &str) {
    eventually("pn.op.verified", PATIENCE, || async { stack.events_of(op).await.unwrap().iter().any(|b| matches!(b, Body::Verified(_))).then_some(()) })
        .await
        .unwrap_or_else(|e| panic!("{e}; the verifier's log:\n{}", stack.log_tail("svc-verifier", 30)));
    let k = Stack::kinds(&stack.events_of(op).await.unwrap());
    assert!(!k.contains(&"failed") && !k.contains(&"degraded"), "{k:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_is_verified_on_centers_ledger_with_the_meter_stopped() {
    // A deadline far past the test's patience: the node must be verified, not degraded.
    let stack = Stack::builder().env("svc-verifier", "PN_DEADLINE_MS", "600000").start().await.unwrap();
    let meter = stack.pid("svc-meter").unwrap();
    signal(meter, Signal::SIGSTOP);

    let (op, sub) = stack.intent("sg", 100 * GIB, "residential").await.unwrap();
    let node = format!("pn-{sub}");
    let v = stack.wait_status(&op, &["done", "failed"], Duration::from_secs(120)).await.unwrap();
    assert_eq!(v["status"], "done", "{v}");
    verified(&stack, &op).await;

    // Center's ledger advanced; the meter, stopped all along, said nothing about the node.
    assert!(center_used(&stack, &node).await > 0);
    assert!(meter_news(&stack, &node).await.is_none(), "the stopped meter published usage of {node}");

    signal(meter, Signal::SIGCONT);
    assert_eq!(stack.secret_findings().await.unwrap(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meter_disagreeing_with_center_is_counted_not_failed() {
    // The meter counts transmitted bytes only for the sim's provider; Center counts rx+tx.
    let stack = Stack::builder()
        .env("svc-verifier", "PN_DEADLINE_MS", "600000")
        .env("svc-meter", "PN_COUNT_MODES__CENTER", "tx")
        .start()
        .await
        .unwrap();
    // The verifier sleeps until both ledgers hold 40 MB of traffic (20 MB for the meter).
    let verifier = stack.pid("svc-verifier").unwrap();
    signal(verifier, Signal::SIGSTOP);

    let (op, sub) = stack.intent("sg", 100 * GIB, "residential").await.unwrap();
    let node = format!("pn-{sub}");
    let v = stack.wait_status(&op, &["done", "failed"], Duration::from_secs(120)).await.unwrap();
    assert_eq!(v["status"], "done", "{v}");
    eventually("a report past the baseline at Center", PATIENCE, || async { (center_used(&stack, &node).await > 0).then_some(()) }).await.unwrap();
    let u: Value = eventually("the meter knows the node", PATIENCE, || async { stack.meter_usage(&node).await.ok() }).await.unwrap();
    assert_eq!(u["countMode"], "tx", "{u}");
    stack.admin_send(reqwest::Method::POST, &format!("/admin/nodes/{node}/traffic"), json!({"bytes": 40_000_000})).await.unwrap();
    eventually("Center records the traffic", PATIENCE, || async { (center_used(&stack, &node).await >= 40_000_000).then_some(()) }).await.unwrap();
    let news = eventually("the meter's news carries its half", PATIENCE, || async { meter_news(&stack, &node).await.filter(|u| u.used_bytes >= 19_000_000) })
        .await
        .unwrap();
    let center = center_used(&stack, &node).await;
    assert!(news.used_bytes + 15_000_000 < center, "the ledgers really disagree: meter {} vs Center {center}", news.used_bytes);

    signal(verifier, Signal::SIGCONT);
    verified(&stack, &op).await;
    let m = eventually("the mismatch is counted", Duration::from_secs(30), || async {
        let m = verifier_metrics(&stack).await;
        (metric(&m, "pn_verify_usage_mismatch_total") == Some(1.0)).then_some(m)
    })
    .await
    .unwrap();
    assert_eq!(metric(&m, "pn_ops_degraded_total"), None, "{m}");
    let log = std::fs::read_to_string(stack.log_path("svc-verifier")).unwrap();
    assert!(log.lines().any(|l| l.contains("usage mismatch") && l.contains("WARN")), "a warning in the verifier's log");
    let o = stack.operation(&op).await.unwrap();
    assert_eq!(o["status"], "done", "{o}");
    assert_eq!(stack.secret_findings().await.unwrap(), Vec::<String>::new());
}
