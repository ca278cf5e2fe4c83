//! Resilience and security suite: crash anywhere, restart NATS, deliver everything twice,
//! storm Center and drop SSH — and every intent still ends `done` or `failed` with a reason,
//! with exactly one VPS per subscription, no orphan, at most one terminal report, no guardrail
//! breach, and no secret in any log (RUST_LOG=trace), stream, state file or command line.
//!
//! CI runs the bounded, seeded tests. `soak` is the long mode:
//! `PN_SOAK_SECS=1800 cargo nextest run -p testkit --test resilience --run-ignored only soak`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use futures::StreamExt;
use kit::bus::Bus;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use testkit::stack::{SERVICES, Stack, cmdline_findings, sample_cmdlines};

const GIB: u64 = 1 << 30;
const REGIONS: [&str; 4] = ["sg", "jp", "de", "us"];

#[derive(Default)]
struct Report {
    scenario: String,
    seed: u64,
    kills: BTreeMap<String, u32>,
    nats_restarts: u32,
    duplicates: u64,
    faults: Value,
    outcomes: BTreeMap<String, u32>,
    reasons: BTreeMap<String, u32>,
    invariants: Vec<(String, bool, String)>,
    /// Forged `pn.op.failed` events for verified operations.
    forged_failures: u32,
    /// Instances of activated nodes that were deleted (must be 0).
    live_deleted: usize,
    elapsed: Duration,
}

impl Report {
    fn check(&mut self, name: &str, ok: bool, detail: String) {
        self.invariants.push((name.to_string(), ok, detail));
    }

    fn print(&self) {
        println!("── resilience report: {} (seed {}) in {:.1}s", self.scenario, self.seed, self.elapsed.as_secs_f64());
        println!("   faults: kills {:?}, nats restarts {}, duplicated events {}, sim faults {}", self.kills, self.nats_restarts, self.duplicates, self.faults);
        println!("   outcomes: {:?}", self.outcomes);
        println!("   forged pn.op.failed for verified operations: {}; live nodes deleted: {}", self.forged_failures, self.live_deleted);
        for (r, n) in &self.reasons {
            println!("   failed ×{n}: {r}");
        }
        for (name, ok, detail) in &self.invariants {
            println!("   [{}] {name}{}", if *ok { "held" } else { "BROKEN" }, if detail.is_empty() { String::new() } else { format!(": {detail}") });
        }
    }

    fn assert_held(&self) {
        self.print();
        let broken: Vec<_> = self.invariants.iter().filter(|(_, ok, _)| !ok).collect();
        assert!(broken.is_empty(), "invariants broken: {broken:?}");
    }
}

fn chaos_stack() -> testkit::stack::StackBuilder {
    let mut b = Stack::builder();
    for s in SERVICES {
        b = b
            .env(s, "RUST_LOG", "trace,async_nats=debug,hyper=info,hyper_util=info,h2=info,russh=debug,sled=info,reqwest=debug")
            .env(s, "PN_ACK_WAIT_MS", "3000");
    }
    b.env("svc-verifier", "PN_DEADLINE_MS", "45000").env("svc-claimer", "PN_LEASE_SECONDS", "30")
}

async fn enqueue(stack: &Stack, n: usize, rng: &mut StdRng) -> Vec<(String, String)> {
    let mut ops = Vec::new();
    for _ in 0..n {
        let region = REGIONS[rng.random_range(0..REGIONS.len())];
        let quota = rng.random_range(50..1500) * GIB;
        let ip = if rng.random_bool(0.5) { "residential" } else { "non_residential" };
        ops.push(stack.intent(region, quota, ip).await.unwrap());
    }
    ops
}

/// Waits until every operation is terminal at Center (or the patience runs out).
async fn settle(stack: &Stack, ops: &[(String, String)], patience: Duration) -> HashMap<String, Value> {
    let deadline = Instant::now() + patience;
    loop {
        let mut out = HashMap::new();
        for (op, _) in ops {
            if let Ok(v) = stack.operation(op).await {
                out.insert(op.clone(), v);
            }
        }
        let terminal = out.values().filter(|v| matches!(v["status"].as_str(), Some("done" | "failed"))).count();
        if terminal == ops.len() || Instant::now() > deadline {
            return out;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Checks every invariant and records it in the report.
async fn check_invariants(stack: &Stack, ops: &[(String, String)], states: &HashMap<String, Value>, r: &mut Report) {
    for (op, _) in ops {
        let st = states.get(op).and_then(|v| v["status"].as_str()).unwrap_or("missing").to_string();
        *r.outcomes.entry(st).or_default() += 1;
        if let Some(v) = states.get(op).filter(|v| v["status"] == "failed") {
            let reason: String = v["error"].as_str().unwrap_or("").chars().take(90).collect();
            *r.reasons.entry(reason).or_default() += 1;
        }
    }
    let not_terminal: Vec<_> = ops.iter().filter(|(op, _)| !matches!(states.get(op).and_then(|v| v["status"].as_str()), Some("done" | "failed"))).collect();
    r.check("every operation ended done or failed", not_terminal.is_empty(), format!("{} not terminal", not_terminal.len()));
    let no_reason = ops.iter().filter(|(op, _)| states.get(op).is_some_and(|v| v["status"] == "failed" && v["error"].as_str().unwrap_or("").is_empty())).count();
    r.check("every failure has a reason", no_reason == 0, format!("{no_reason} without"));
    let multi = ops.iter().filter(|(op, _)| states.get(op).is_some_and(|v| v["terminalReports"].as_u64().unwrap_or(0) > 1)).count();
    r.check("at most one terminal report per operation", multi == 0, format!("{multi} with more"));

    // Let the reaper delete failed operations' VPSes (grace 1 s in tests).
    let failed_names: Vec<String> =
        ops.iter().filter(|(op, _)| states.get(op).is_some_and(|v| v["status"] == "failed")).map(|(_, s)| format!("pn-{s}")).collect();
    let done_names: Vec<String> = ops.iter().filter(|(op, _)| states.get(op).is_some_and(|v| v["status"] == "done")).map(|(_, s)| format!("pn-{s}")).collect();
    let inst = testkit::eventually("failed operations' VPSes reaped", Duration::from_secs(30), || async {
        let inst = stack.items("/admin/instances").await.ok()?;
        let orphan = inst.iter().any(|i| i["status"] != "deleted" && failed_names.iter().any(|n| i["name"] == n.as_str()));
        (!orphan).then_some(inst)
    })
    .await
    .unwrap_or_else(|_| futures::executor::block_on(stack.items("/admin/instances")).unwrap_or_default());
    let mut live: HashMap<String, u32> = HashMap::new();
    let mut ever: HashMap<String, u32> = HashMap::new();
    for i in &inst {
        let n = i["name"].as_str().unwrap_or("").to_string();
        *ever.entry(n.clone()).or_default() += 1;
        if i["status"] != "deleted" {
            *live.entry(n).or_default() += 1;
        }
    }
    let dup = live.values().filter(|n| **n > 1).count();
    r.check("never two live instances for one subscription", dup == 0, format!("{dup} names with more"));
    let done_without = done_names.iter().filter(|n| live.get(*n).copied().unwrap_or(0) != 1).count();
    r.check("exactly one instance per active node", done_without == 0, format!("{done_without} active without exactly one"));
    let all_names: Vec<String> = ops.iter().map(|(_, s)| format!("pn-{s}")).collect();
    let strangers = ever.keys().filter(|n| !all_names.contains(n)).count();
    r.check("no instance without an operation", strangers == 0, format!("{strangers}"));
    let orphans = failed_names.iter().filter(|n| live.get(*n).copied().unwrap_or(0) > 0).count();
    r.check("no orphan VPS after a failure", orphans == 0, format!("{orphans} live after failure"));
    // Activation is final: no instance of a node that registered at Center (or whose operation
    // is done) is ever deleted — whatever failed, was duplicated or was forged afterwards.
    let registered: Vec<String> =
        stack.items("/admin/nodes").await.unwrap_or_default().iter().filter_map(|n| n["name"].as_str().map(str::to_string)).collect();
    let live_deleted: Vec<String> = inst
        .iter()
        .filter(|i| i["status"] == "deleted")
        .filter_map(|i| i["name"].as_str())
        .filter(|n| registered.iter().any(|r| r == n) || done_names.iter().any(|d| d == n))
        .map(str::to_string)
        .collect();
    r.live_deleted = live_deleted.len();
    r.check("0 live nodes deleted", live_deleted.is_empty(), format!("{live_deleted:?}"));
    let created_twice = ever.values().filter(|n| **n > 1).count();
    r.check("one create per subscription (no-IP fail path aside)", created_twice == 0, format!("{created_twice}"));
    // No double usage: the meter never bills more than the node's NIC counters reported. A node
    // that just registered may not have reported past its baseline yet: wait for it (bounded).
    // The ledger is on the meter's internal listener (with its token).
    let usage = |name: String| {
        let req = stack.meter_internal(reqwest::Method::GET, &format!("/v1/nodes/{name}/usage"));
        async move {
            match req.send().await {
                Ok(r) => r.json::<Value>().await.unwrap_or(Value::Null)["usedBytes"].as_u64().unwrap_or(0),
                Err(_) => 0,
            }
        }
    };
    let deadline = Instant::now() + Duration::from_secs(45);
    let (mut over, mut metered);
    loop {
        over = Vec::new();
        metered = 0;
        for name in &done_names {
            // Reports keep flowing: read the meter first, then the sim (which counts a report
            // once the meter has answered it), and give the sim a moment to catch up. A real
            // double count does not go away.
            let mut last = None;
            for _ in 0..10 {
                let used = usage(name.clone()).await;
                let inst = stack.items("/admin/instances").await.unwrap_or_default();
                let Some(i) = inst.iter().find(|i| i["name"] == name.as_str() && i["status"] != "deleted") else { break };
                let nic = i["trafficUsedBytes"].as_u64().unwrap_or(0);
                last = Some((used, nic));
                if used <= nic {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            let Some((used, nic)) = last else { continue };
            if used > 0 {
                metered += 1;
            }
            if used > nic {
                over.push(format!("{name}: billed {used} > NIC {nic}"));
            }
        }
        if metered == done_names.len() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    r.check("no double usage (billed ≤ what the NIC counters reported)", over.is_empty(), format!("{over:?}"));
    r.check("every active node is metered", metered == done_names.len(), format!("{metered}/{}", done_names.len()));
    let violations = stack.items("/admin/violations").await.unwrap_or_default();
    r.check("no guardrail violation", violations.is_empty(), format!("{violations:?}"));
    let findings = stack.secret_findings().await.unwrap_or_else(|e| vec![format!("scan failed: {e}")]);
    r.check("no secret in logs (trace), streams or state files", findings.is_empty(), format!("{findings:?}"));
}

/// Publishes a forged `pn.op.failed` (right attempt, right instance id) for up to `n`
/// operations that are `done`, as a stray or hostile event would. Returns how many.
async fn forge_failures(stack: &Stack, ops: &[(String, String)], states: &HashMap<String, Value>, n: usize) -> u32 {
    let bus = Bus::connect(&stack.nats.url(), "forger", Duration::from_secs(10)).await.unwrap();
    let mut forged = 0;
    for (op, sub) in ops.iter().filter(|(op, _)| states.get(op).is_some_and(|v| v["status"] == "done")).take(n) {
        let instance_id = states[op]["result"]["instanceId"].as_str().unwrap_or("").to_string();
        let claims = states[op]["claims"].as_u64().unwrap_or(1) as u32;
        let f = proto::OpFailed {
            operation_id: op.clone(),
            sub_id: sub.clone(),
            stage: "verify".into(),
            reason: "forged by the resilience suite".into(),
            attempt: claims.max(1),
            failed_at_ms: kit::now_ms(),
            instance_id,
            holder: String::new(),
        };
        if bus.publish_failed(f).await.is_ok() {
            forged += 1;
        }
    }
    forged
}

/// Republishes every PN_OPS message once more with a new Msg-Id while `stop` is unset.
fn duplicator(url: String, stop: Arc<AtomicBool>, count: Arc<AtomicU64>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let bus = Bus::connect(&url, "duplicator", Duration::from_secs(30)).await.unwrap();
        let stream = bus.js.get_stream(proto::subjects::OPS_STREAM).await.unwrap();
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig { filter_subject: "pn.op.>".into(), ..Default::default() })
            .await
            .unwrap();
        let mut msgs = consumer.messages().await.unwrap();
        while !stop.load(Ordering::Relaxed) {
            let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_millis(300), msgs.next()).await else { continue };
            let h = m.headers.clone().unwrap_or_default();
            if h.get("Pn-Dup").is_some() {
                continue;
            }
            let mut nh = HeaderMap::new();
            for (k, vs) in h.iter() {
                if k.to_string() == "Nats-Msg-Id" {
                    continue;
                }
                for v in vs {
                    nh.append(k.clone(), v.clone());
                }
            }
            let id = h.get("Nats-Msg-Id").map(|v| v.to_string()).unwrap_or_default();
            nh.insert("Nats-Msg-Id", format!("{id}.dup").as_str());
            nh.insert("Pn-Dup", "1");
            if let Ok(ack) = bus.js.publish_with_headers(m.subject.to_string(), nh, m.payload.clone()).await
                && ack.await.is_ok() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
        }
    })
}

/// Crash anywhere: ≥ 50 provisions while services are SIGKILLed at random moments (each
/// several times) and restarted, NATS is killed and restarted on its store once, and every
/// event is delivered twice.
async fn crash_anywhere(intents: usize, seed: u64, kills_per_service: u32, r: &mut Report) {
    let started = Instant::now();
    r.seed = seed;
    let mut rng = StdRng::seed_from_u64(seed);
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let sampler = sample_cmdlines(stop_sampling.clone());
    let mut stack = chaos_stack().start().await.unwrap();
    let dup_stop = Arc::new(AtomicBool::new(false));
    let dups = Arc::new(AtomicU64::new(0));
    let mut dup_task = duplicator(stack.nats.url(), dup_stop.clone(), dups.clone());
    let ops = enqueue(&stack, intents, &mut rng).await;
    // Kill schedule: every service `kills_per_service` times, shuffled, one every 0.3–1.2 s.
    let mut schedule: Vec<&str> = SERVICES.iter().flat_map(|s| std::iter::repeat_n(*s, kills_per_service as usize)).collect();
    for i in (1..schedule.len()).rev() {
        schedule.swap(i, rng.random_range(0..=i));
    }
    let nats_at = schedule.len() / 2;
    for (i, svc) in schedule.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1200))).await;
        if i == nats_at {
            dup_stop.store(true, Ordering::Relaxed);
            let _ = dup_task.await;
            stack.nats.restart().unwrap();
            r.nats_restarts += 1;
            dup_stop.store(false, Ordering::Relaxed);
            dup_task = duplicator(stack.nats.url(), dup_stop.clone(), dups.clone());
        }
        stack.kill(svc);
        *r.kills.entry(svc.to_string()).or_default() += 1;
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..400))).await;
        stack.spawn(svc).unwrap();
        stack.wait_ready(svc).await.unwrap();
        // Traffic through a few nodes, so metering runs while the meter crashes too.
        for _ in 0..3 {
            let (_, sub) = &ops[rng.random_range(0..ops.len())];
            let bytes = rng.random_range(1..200u64) << 20;
            let _ = stack.admin_send(reqwest::Method::POST, &format!("/admin/nodes/pn-{sub}/traffic"), json!({"bytes": bytes})).await;
        }
    }
    let states = settle(&stack, &ops, Duration::from_secs(240)).await;
    dup_stop.store(true, Ordering::Relaxed);
    let _ = dup_task.await;
    r.duplicates = dups.load(Ordering::Relaxed);
    r.check("events were really delivered twice", r.duplicates > 0, format!("{}", r.duplicates));
    check_invariants(&stack, &ops, &states, r).await;
    let done = states.values().filter(|v| v["status"] == "done").count();
    r.check("the pipeline still delivers under crashes (most operations done)", done * 10 >= ops.len() * 8, format!("{done}/{}", ops.len()));
    stop_sampling.store(true, Ordering::Relaxed);
    let seen = sampler.join().unwrap();
    let cl = cmdline_findings(&seen, &stack.known_secrets().await.unwrap());
    r.check("no secret on any sampled command line", cl.is_empty(), format!("{cl:?} ({} distinct command lines sampled)", seen.len()));
    r.elapsed = started.elapsed();
}

#[tokio::test]
async fn crash_anywhere_nats_restart_and_duplicates() {
    let mut r = Report { scenario: "crash anywhere + NATS restart + duplicates".into(), ..Default::default() };
    crash_anywhere(50, 20261125, 3, &mut r).await;
    r.assert_held();
}

#[tokio::test]
async fn center_storms_and_ssh_drops_complete_or_fail_with_a_reason() {
    let started = Instant::now();
    let mut r = Report { scenario: "Center error storm + SSH drops".into(), seed: 11, ..Default::default() };
    let mut rng = StdRng::seed_from_u64(11);
    let stack = chaos_stack().start().await.unwrap();
    let faults = json!({"seed": 11, "centerErrorRate": 0.3, "centerLatencyMs": 30, "sshDropRate": 0.3});
    stack.faults(faults.clone()).await.unwrap();
    r.faults = faults;
    let ops = enqueue(&stack, 12, &mut rng).await;
    // Deadlines: verifier 45 s after deploy; everything must be terminal well within 4 min.
    let states = settle(&stack, &ops, Duration::from_secs(240)).await;
    stack.faults(json!({"centerErrorRate": 0.0, "centerLatencyMs": 0, "sshDropRate": 0.0})).await.unwrap();
    r.forged_failures = forge_failures(&stack, &ops, &states, 3).await;
    // Past the reap grace (1 s in tests) and a few reaper passes.
    tokio::time::sleep(Duration::from_secs(5)).await;
    check_invariants(&stack, &ops, &states, &mut r).await;
    r.elapsed = started.elapsed();
    r.assert_held();
}

#[tokio::test]
#[ignore = "long soak: PN_SOAK_SECS=… cargo nextest run -p testkit --test resilience --run-ignored only soak"]
async fn soak() {
    let secs: u64 = std::env::var("PN_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(600);
    let until = Instant::now() + Duration::from_secs(secs);
    let mut round = 0u64;
    while Instant::now() < until {
        round += 1;
        let mut r = Report { scenario: format!("soak round {round}"), ..Default::default() };
        crash_anywhere(100, 1000 + round, 4, &mut r).await;
        r.assert_held();
    }
}
