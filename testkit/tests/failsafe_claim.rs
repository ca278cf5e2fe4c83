//! svc-claimer fails safe (issue #16): a report Center refuses is retried, never turned into
//! `pn.op.failed` (so no VPS of a node that registers is reaped), a failure event for an
//! activated operation is not reported, and the claimer holds no more operations than its
//! budget. Real parts: nats-server, center-sim, the five service binaries.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kit::bus::{Bus, Meta};
use proto::{Body, OpFailed, Stage, subjects};
use serde_json::{Value, json};
use testkit::eventually;
use testkit::stack::Stack;

const GIB: u64 = 1 << 30;

/// Sim timings that keep a provision short.
fn fast() -> Value {
    json!({"bootDelayMs": 20, "prepDelayMs": 20, "registrationDelayMs": 20, "usageIntervalMs": 200})
}

fn failures(evs: &HashMap<String, Vec<Body>>) -> Vec<(String, String)> {
    evs.iter()
        .flat_map(|(op, bs)| bs.iter().filter_map(move |b| if let Body::Failed(f) = b { Some((op.clone(), f.reason.clone())) } else { None }))
        .collect()
}

/// The svc-claimer log lines (JSON, fields flattened, `span` the current span) whose message is `msg`.
fn claimer_lines(stack: &Stack, msg: &str) -> Vec<Value> {
    std::fs::read_to_string(stack.log_path("svc-claimer"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == msg)
        .collect()
}

async fn consumer_idle(bus: &Bus, durable: &str) -> Option<()> {
    let s = bus.js.get_stream(subjects::OPS_STREAM).await.ok()?;
    let mut c: async_nats::jetstream::consumer::PullConsumer = s.get_consumer(durable).await.ok()?;
    let i = c.info().await.ok()?;
    (i.num_pending == 0 && i.num_ack_pending == 0).then_some(())
}

/// Waits until the claimer's `pn.op.instance` handler for `op` was delivered at least `n`
/// times while Center refused it (each attempt logged "will retry") — or until the loop gives
/// the operation up (what the old loop did at its delivery limit: log "deliveries exhausted",
/// publish `pn.op.failed`), which the assertions after it then show.
async fn retried(stack: &Stack, op: &str, n: i64) {
    let subject = subjects::op_event(subjects::INSTANCE, op);
    eventually(&format!("the claimer retried {op}'s in_progress {n} times"), Duration::from_secs(120), || async {
        let retried = claimer_lines(stack, "will retry (this consumer never fails an operation)")
            .iter()
            .any(|l| l["subject"] == subject.as_str() && l["delivered"].as_i64().unwrap_or(0) >= n);
        let gave_up = !claimer_lines(stack, GAVE_UP).is_empty() || !failures(&stack.events_by_op().await.unwrap_or_default()).is_empty();
        (retried || gave_up).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", stack.log_tail("svc-claimer", 30)));
    assert_eq!(claimer_lines(stack, GAVE_UP), Vec::<Value>::new(), "the claimer's loop must never give an operation up");
}

/// kit::bus's log line when a consumer's deliveries run out and it fails the operation.
const GAVE_UP: &str = "deliveries exhausted; failing the operation";

/// (b) Center refuses every `update_node_operation` for far longer than the claimer's old
/// delivery limit (PN_MAX_DELIVER=2: the old loop failed the operation at the 2nd refused
/// delivery and svc-cloud reaped the VPS a second later, before the node could register): the
/// nodes register, the operations end `done`, nothing is failed and no VPS is deleted. With the
/// knob back to 0 the claimer catches up: an operation still in flight gets its `in_progress`
/// reported, and nothing stays pending. Then a forged `pn.op.failed` for an activated operation
/// is recorded, not reported.
#[tokio::test]
async fn center_refusing_reports_fails_nothing_and_deletes_nothing() {
    let stack = Stack::builder()
        .env("svc-claimer", "PN_MAX_DELIVER", "2")
        .env("svc-claimer", "PN_REPORT_RETRY_CAP_MS", "1000")
        .start()
        .await
        .unwrap();
    stack.faults(fast()).await.unwrap();
    // The sidecars register 20 s after `up -d`: long after the old claimer had given up.
    stack.faults(json!({"updateOperationErrorRate": 1.0, "registrationDelayMs": 20_000})).await.unwrap();
    let bus = Bus::connect(&stack.nats.url(), "test", Duration::from_secs(5)).await.unwrap();

    // 1. Refused from claim to activation.
    let mut ops = Vec::new();
    for region in ["sg", "de"] {
        ops.push(stack.intent(region, 100 * GIB, "residential").await.unwrap());
    }
    for (op, _) in &ops {
        retried(&stack, op, 3).await;
    }
    // svc-cloud reaps 1 s after a failure in this stack: the old claimer's failure would show now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(failures(&stack.events_by_op().await.unwrap()), Vec::<(String, String)>::new(), "no pn.op.failed while Center refused reports");
    let deleted: Vec<Value> = stack.items("/admin/instances").await.unwrap().into_iter().filter(|i| i["status"] == "deleted").collect();
    assert_eq!(deleted, Vec::<Value>::new(), "no VPS deleted while Center refused reports");
    for (op, _) in &ops {
        let v = stack.wait_status(op, &["done", "failed"], Duration::from_secs(180)).await.unwrap();
        assert_eq!(v["status"], "done", "operation {op}: {v}");
        assert_eq!(v["progressReports"], 0, "Center refused every report, yet the node registered: {v}");
        assert_eq!(v["terminalReports"], 0, "{v}");
    }

    // 2. Refused, then Center takes reports again while the operation is still in flight.
    let (late, late_sub) = stack.intent("us", 100 * GIB, "residential").await.unwrap();
    retried(&stack, &late, 3).await;
    assert_eq!(failures(&stack.events_by_op().await.unwrap()), Vec::<(String, String)>::new());
    stack.faults(json!({"updateOperationErrorRate": 0.0})).await.unwrap();
    let v = eventually("the claimer reported in_progress once Center took it", Duration::from_secs(60), || async {
        let v = stack.operation(&late).await.ok()?;
        (v["progressReports"].as_u64().unwrap_or(0) >= 1).then_some(v)
    })
    .await
    .unwrap();
    assert!(v["result"]["instanceId"].as_str().is_some() && v["result"]["ipv4"].as_str().is_some(), "{v}");
    assert!(!claimer_lines(&stack, "reported in_progress").is_empty());
    let v = stack.wait_status(&late, &["done", "failed"], Duration::from_secs(180)).await.unwrap();
    assert_eq!(v["status"], "done", "{v}");
    ops.push((late.clone(), late_sub));
    // Nothing of the refused period is left pending at the claimer.
    eventually("the claimer caught up on pn.op.instance", Duration::from_secs(60), || consumer_idle(&bus, "svc-claimer-instance")).await.unwrap();

    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(failures(&stack.events_by_op().await.unwrap()), Vec::<(String, String)>::new());
    let instances = stack.items("/admin/instances").await.unwrap();
    assert_eq!(instances.len(), ops.len(), "{instances:?}");
    assert!(instances.iter().all(|i| i["status"] != "deleted"), "no VPS deleted: {instances:?}");
    assert_eq!(stack.admin_get("/admin/stats").await.unwrap()["leaseExpiries"], 0);

    // 3. A stray failure for an activated operation: the claimer asks Center, does not report it.
    let (op, sub) = &ops[0];
    let forged = OpFailed {
        operation_id: op.clone(),
        sub_id: sub.clone(),
        stage: "verify".into(),
        reason: "forged: usage never seen".into(),
        attempt: 1,
        failed_at_ms: kit::now_ms(),
        ..Default::default()
    };
    let meta = Meta { operation_id: op.clone(), sub_id: sub.clone(), stage: Stage::Verify, msg_id: format!("{op}.failed.forged") };
    bus.publish(subjects::op_event(subjects::FAILED, op), Body::Failed(forged), &meta).await.unwrap();
    let warned = eventually("the claimer's warning about the activated operation", Duration::from_secs(60), || async {
        claimer_lines(&stack, "a failure event arrived for an activated operation; not reported to Center")
            .into_iter()
            .find(|l| l["span"]["op"] == op.as_str())
    })
    .await
    .unwrap();
    assert_eq!(warned["failed_stage"], "verify", "{warned}");
    eventually("the claimer acked the forged failure", Duration::from_secs(30), || consumer_idle(&bus, "svc-claimer-failed")).await.unwrap();
    let v = stack.operation(op).await.unwrap();
    assert_eq!((v["status"].as_str(), v["terminalReports"].as_u64()), (Some("done"), Some(0)), "{v}");
    assert_eq!(stack.secret_findings().await.unwrap(), Vec::<String>::new());
}

/// Sum of a Prometheus gauge/counter's samples in a `/metrics` text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}

/// (e) 1,000 queued intents and a claim budget of 50: Center never sees more than 50 held at
/// once, no lease runs out, and all 1,000 end `done`.
#[tokio::test]
async fn a_thousand_queued_with_a_budget_of_fifty() {
    const N: usize = 1000;
    const BUDGET: u64 = 50;
    let stack = Stack::builder()
        .env("svc-claimer", "PN_MAX_CLAIMED", &BUDGET.to_string())
        // A short lease, so that an operation claimed but not carried would show as an expiry
        // (1,000 claimed at once could not all finish within it), yet long enough that renewals
        // every lease/6 hold on a loaded machine (30 s expired once under a parallel VM test).
        .env("svc-claimer", "PN_LEASE_SECONDS", "120")
        .env("svc-verifier", "PN_DEADLINE_MS", "300000")
        .start()
        .await
        .unwrap();
    stack.faults(fast()).await.unwrap();
    let started = Instant::now();
    let regions = ["sg", "jp", "de", "us"];
    let mut ops = Vec::with_capacity(N);
    for i in 0..N {
        ops.push(stack.intent(regions[i % regions.len()], 100 * GIB, "residential").await.unwrap().0);
    }
    let enqueued = started.elapsed();
    let claimer_metrics = format!("http://{}/metrics", stack.procs["svc-claimer"].name);
    let http = reqwest::Client::new();
    let claimer_peak = std::sync::Mutex::new(0.0f64);
    let last_report = std::sync::Mutex::new(Instant::now());
    let done = eventually("1,000 operations done", Duration::from_secs(40 * 60), || {
        let (stack, http, url, peak, last) = (&stack, &http, &claimer_metrics, &claimer_peak, &last_report);
        async move {
            let s = stack.admin_get("/admin/stats").await.ok()?;
            assert!(s["heldPeak"].as_u64().unwrap_or(0) <= BUDGET, "Center saw more held than the budget: {s}");
            assert_eq!(s["leaseExpiries"], 0, "{s}");
            if let Ok(r) = http.get(url).send().await
                && let Ok(t) = r.text().await
                && let Some(g) = metric(&t, "pn_claimed_in_flight")
            {
                assert!(g <= BUDGET as f64, "pn_claimed_in_flight {g} above the budget");
                let mut p = peak.lock().unwrap();
                *p = p.max(g);
            }
            let done = stack.items("/admin/operations?status=done").await.ok()?.len();
            let failed = stack.items("/admin/operations?status=failed").await.ok()?;
            assert!(failed.is_empty(), "failed: {:?}", failed.first());
            if last.lock().unwrap().elapsed() > Duration::from_secs(30) {
                eprintln!("{:>5.0} s: {done} done, Center {s}", started.elapsed().as_secs_f64());
                *last.lock().unwrap() = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            (done == N).then_some(done)
        }
    })
    .await
    .unwrap();
    let took = started.elapsed();
    let claimer_peak = *claimer_peak.lock().unwrap();
    let s = stack.admin_get("/admin/stats").await.unwrap();
    eprintln!(
        "{done} operations done in {:.0} s (enqueued in {:.1} s) with PN_MAX_CLAIMED={BUDGET}; Center {s}; claimer's pn_claimed_in_flight peak {claimer_peak}",
        took.as_secs_f64(),
        enqueued.as_secs_f64()
    );
    let peak = s["heldPeak"].as_u64().unwrap();
    assert!(peak <= BUDGET && peak > 0, "{s}");
    assert_eq!(s["leaseExpiries"], 0, "{s}");
    assert!(claimer_peak > 0.0 && claimer_peak <= BUDGET as f64, "{claimer_peak}");
    for op in ops.iter().step_by(97) {
        let v = stack.operation(op).await.unwrap();
        assert_eq!((v["status"].as_str(), v["leaseExpiries"].as_u64()), (Some("done"), Some(0)), "{v}");
    }
}
