//! The pipeline end to end and svc-claimer/svc-cloud/svc-verifier at their boundaries, on real
//! parts: nats-server with JetStream, center-sim, and the five service binaries.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use kit::bus::Bus;
use proto::{Body, Event};
use serde_json::{Value, json};
use testkit::stack::{Stack, cmdline_findings, sample_cmdlines, stream_dump};

const GIB: u64 = 1 << 30;

/// Every event on PN_OPS, decoded, by operation id.
async fn events(stack: &Stack) -> HashMap<String, Vec<Body>> {
    let bus = Bus::connect(&stack.nats.url(), "test", Duration::from_secs(5)).await.unwrap();
    let mut out: HashMap<String, Vec<Body>> = HashMap::new();
    let mut s = bus.js.get_stream(proto::subjects::OPS_STREAM).await.unwrap();
    let last = s.info().await.unwrap().state.last_sequence;
    for seq in 1..=last {
        if let Ok(m) = s.get_raw_message(seq).await {
            let op = proto::subjects::op_id_of(&m.subject).unwrap_or("").to_string();
            if let Ok(b) = Event::from_bytes(&m.payload) {
                out.entry(op).or_default().push(b);
            }
        }
    }
    out
}

fn live_instances_by_name(items: &[Value]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for i in items.iter().filter(|i| i["status"] != "deleted") {
        *m.entry(i["name"].as_str().unwrap_or("").to_string()).or_insert(0) += 1;
    }
    m
}

#[tokio::test]
async fn e2e_intents_become_verified_metered_nodes_without_leaking_a_secret() {
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_cmdlines(stop.clone());
    let stack = Stack::builder().env("svc-claimer", "RUST_LOG", "trace,async_nats=info,hyper=info,russh=info").start().await.unwrap();
    let intents = [("sg", 950 * GIB, "residential"), ("de", 100 * GIB, "non_residential"), ("us", 2048 * GIB, "residential")];
    let mut ops = Vec::new();
    for (r, q, t) in intents {
        ops.push(stack.intent(r, q, t).await.unwrap());
    }
    for (op, _) in &ops {
        let v = stack.wait_status(op, &["done", "failed"], Duration::from_secs(120)).await.unwrap();
        assert_eq!(v["status"], "done", "operation {op}: {v}");
    }
    // pn.op.verified for each, with the node's sslip.io domain.
    let evs = testkit::eventually("three pn.op.verified", Duration::from_secs(60), || async {
        let e = events(&stack).await;
        let n = ops.iter().filter(|(op, _)| e.get(op).is_some_and(|v| v.iter().any(|b| matches!(b, Body::Verified(_))))).count();
        (n == ops.len()).then_some(e)
    })
    .await
    .unwrap();
    for (op, sub) in &ops {
        let kinds: Vec<&str> = evs[op].iter().map(|b| b.event_name()).collect();
        for k in ["claimed", "instance", "deployed", "verified"] {
            assert!(kinds.contains(&k), "{op}: {kinds:?}");
        }
        assert!(!kinds.contains(&"failed"), "{op}: {kinds:?}");
        let v = evs[op].iter().find_map(|b| if let Body::Verified(v) = b { Some(v.clone()) } else { None }).unwrap();
        assert_eq!(v.node_name, format!("pn-{sub}"));
        assert!(v.domain.ends_with(".sslip.io"), "{}", v.domain);
        assert_eq!(v.tunnel_count, 1);
        let o = stack.operation(op).await.unwrap();
        assert!(o["result"]["instanceId"].as_str().is_some(), "{o}");
    }
    // Exactly one instance per subscription; nodes registered as private; no guardrail breach.
    let inst = stack.items("/admin/instances").await.unwrap();
    assert_eq!(inst.len(), ops.len(), "{inst:?}");
    assert!(live_instances_by_name(&inst).values().all(|n| *n == 1));
    let nodes = stack.items("/admin/nodes").await.unwrap();
    assert_eq!(nodes.iter().filter(|n| n["class"] == "private").count(), ops.len(), "{nodes:?}");
    assert_eq!(stack.items("/admin/violations").await.unwrap(), Vec::<Value>::new());
    // Metered: the meter's ledger has the node's usage.
    for (_, sub) in &ops {
        let u: Value = stack.meter_usage(&format!("pn-{sub}")).await.unwrap();
        assert!(u["usedBytes"].as_u64().unwrap_or(0) > 0, "{u}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = sampler.join().unwrap();
    let secrets = stack.known_secrets().await.unwrap();
    assert!(secrets.len() >= 2 * ops.len(), "the sim should know the claim tokens and node secrets: {}", secrets.len());
    let mut findings = stack.secret_findings().await.unwrap();
    findings.extend(cmdline_findings(&seen, &secrets));
    assert_eq!(findings, Vec::<String>::new());
}

#[tokio::test]
async fn e2e_a_node_that_never_registers_fails_naming_registration_and_its_vps_is_reaped() {
    let stack = Stack::builder().env("svc-verifier", "PN_DEADLINE_MS", "4000").start().await.unwrap();
    stack.faults(json!({"neverRegister": true})).await.unwrap();
    let (op, sub) = stack.intent("jp", 200 * GIB, "residential").await.unwrap();
    let v = stack.wait_status(&op, &["failed", "done"], Duration::from_secs(90)).await.unwrap();
    assert_eq!(v["status"], "failed", "{v}");
    let err = v["error"].as_str().unwrap_or("");
    assert!(err.starts_with("verify:") && err.contains("registration"), "{err}");
    // The failed operation's VPS is deleted after the grace period; nothing else is touched.
    testkit::eventually("the VPS reaped", Duration::from_secs(30), || async {
        let inst = stack.items("/admin/instances").await.ok()?;
        let mine: Vec<_> = inst.iter().filter(|i| i["name"] == format!("pn-{sub}")).collect();
        (mine.len() == 1 && mine[0]["status"] == "deleted").then_some(())
    })
    .await
    .unwrap();
    assert_eq!(v["terminalReports"].as_u64().unwrap_or(1), 1, "{v}");
}

#[tokio::test]
async fn a_plan_less_region_fails_with_a_readable_reason_and_creates_nothing() {
    let stack = Stack::builder().only(&["svc-claimer", "svc-cloud"]).start().await.unwrap();
    let (op, _) = stack.intent("br", 2048 * GIB, "non_residential").await.unwrap();
    let v = stack.wait_status(&op, &["failed"], Duration::from_secs(60)).await.unwrap();
    let err = v["error"].as_str().unwrap_or("");
    assert!(err.starts_with("cloud:") && err.contains("no plan"), "{err}");
    assert!(stack.items("/admin/instances").await.unwrap().is_empty());
}

#[tokio::test]
async fn two_claimer_replicas_never_claim_one_operation_twice() {
    let mut stack = Stack::builder().only(&["svc-claimer", "svc-cloud"]).start().await.unwrap();
    stack.spawn("svc-claimer#2").unwrap();
    stack.wait_ready("svc-claimer#2").await.unwrap();
    let mut ops = Vec::new();
    for i in 0..12 {
        ops.push(stack.intent(["sg", "jp", "de", "us"][i % 4], 300 * GIB, "residential").await.unwrap());
    }
    for (op, _) in &ops {
        let v = stack.wait_status(op, &["in_progress"], Duration::from_secs(60)).await.unwrap();
        assert_eq!(v["claims"].as_u64(), Some(1), "{v}");
        assert!(v["result"]["ipv4"].as_str().is_some_and(|s| s.starts_with("127.")), "{v}");
    }
    let evs = events(&stack).await;
    for (op, _) in &ops {
        let claimed = evs[op].iter().filter(|b| matches!(b, Body::Claimed(_))).count();
        assert_eq!(claimed, 1, "{op} claimed {claimed} times");
    }
    let inst = stack.items("/admin/instances").await.unwrap();
    assert_eq!(inst.len(), ops.len());
    assert!(live_instances_by_name(&inst).values().all(|n| *n == 1));
}

#[tokio::test]
async fn svc_cloud_killed_right_after_create_leaves_exactly_one_instance() {
    let mut stack = Stack::builder().only(&["svc-claimer", "svc-cloud"]).start().await.unwrap();
    // A slow boot keeps svc-cloud waiting right after its create call.
    stack.faults(json!({"bootDelayMs": 3000})).await.unwrap();
    let (op, sub) = stack.intent("sg", 300 * GIB, "residential").await.unwrap();
    testkit::eventually("the create call", Duration::from_secs(30), || async {
        let inst = stack.items("/admin/instances").await.ok()?;
        (!inst.is_empty()).then_some(())
    })
    .await
    .unwrap();
    stack.restart("svc-cloud").await.unwrap();
    let v = stack.wait_status(&op, &["in_progress"], Duration::from_secs(60)).await.unwrap();
    assert!(v["result"]["instanceId"].as_str().is_some(), "{v}");
    let inst = stack.items("/admin/instances").await.unwrap();
    let mine: Vec<_> = inst.iter().filter(|i| i["name"] == format!("pn-{sub}")).collect();
    assert_eq!(mine.len(), 1, "{inst:?}");
    assert_eq!(v["result"]["instanceId"], mine[0]["id"]);
}

#[tokio::test]
async fn a_center_error_storm_ends_in_success_or_a_reason_never_a_duplicate() {
    let stack = Stack::builder().only(&["svc-claimer", "svc-cloud"]).start().await.unwrap();
    stack.faults(json!({"centerErrorRate": 0.3, "centerLatencyMs": 20})).await.unwrap();
    let mut ops = Vec::new();
    for i in 0..6 {
        ops.push(stack.intent(["sg", "jp", "de"][i % 3], 300 * GIB, "residential").await.unwrap());
    }
    for (op, _) in &ops {
        let v = stack.wait_status(op, &["in_progress", "failed"], Duration::from_secs(120)).await.unwrap();
        if v["status"] == "failed" {
            assert!(!v["error"].as_str().unwrap_or("").is_empty(), "{v}");
        }
    }
    stack.faults(json!({"centerErrorRate": 0.0, "centerLatencyMs": 0})).await.unwrap();
    let inst = stack.items("/admin/instances").await.unwrap();
    assert!(live_instances_by_name(&inst).values().all(|n| *n == 1), "{inst:?}");
    let bus = Bus::connect(&stack.nats.url(), "t", Duration::from_secs(5)).await.unwrap();
    assert!(!stream_dump(&bus, proto::subjects::OPS_STREAM).await.unwrap().is_empty());
}

/// Publishes an event the way a stage would.
async fn publish(stack: &Stack, body: Body, op: &str, sub: &str, stage: proto::Stage) {
    let bus = Bus::connect(&stack.nats.url(), "test", Duration::from_secs(5)).await.unwrap();
    bus.ensure_streams().await.unwrap();
    let subject = proto::subjects::op_event(body.event_name(), op);
    bus.publish(subject, body, &kit::bus::Meta::outcome(op, sub, stage, 1)).await.unwrap();
}

#[tokio::test]
async fn a_sidecar_without_the_claim_fails_naming_the_usage_reporter() {
    use kit::center::{Center, ClientConfig, CreateInstance, McpCenter};
    use secrecy::SecretString;
    let stack = Stack::builder().only(&["svc-verifier", "svc-meter"]).start().await.unwrap();
    let center = McpCenter::new(ClientConfig::new(&stack.center_url, Duration::from_secs(5)), SecretString::from(stack.token.clone())).unwrap();
    let (op, sub) = stack.intent("de", 100 * GIB, "residential").await.unwrap();
    let claimed = center.claim_node_operation(&op, "test-holder", 600).await.unwrap();
    let name = format!("pn-{sub}");
    let inst = center
        .create_cloud_instance(&CreateInstance {
            account_name: "sim-lightsail".into(),
            region: "eu-central-1".into(),
            plan: "small_1tb".into(),
            image_id: "ubuntu-24-04".into(),
            name: name.clone(),
        })
        .await
        .unwrap();
    let inst = testkit::eventually("instance running", Duration::from_secs(20), || async {
        let i = center.get_cloud_instance(&inst.id).await.ok()?;
        (i.status == "running" && i.ipv4.is_some()).then_some(i)
    })
    .await
    .unwrap();
    let ip = inst.ipv4.clone().unwrap();
    // Walk the node by hand: prep, a .env WITHOUT K2_PRIVATE_CLAIM (the deployer's bug this
    // check exists for), compose up.
    let key = kit::ssh::AdminKeys::parse(&format!("a={}", stack.dir.path().join("secrets/ssh-admin-key").display())).unwrap().load("a").unwrap();
    let target = |port: u16, pinned: Option<String>| kit::ssh::Target {
        host: ip.clone(),
        port,
        user: "ubuntu".into(),
        key: key.clone(),
        pinned,
        connect_timeout: Duration::from_secs(5),
    };
    let s = kit::ssh::connect(&target(stack.fresh_port, None)).await.unwrap();
    let t = Duration::from_secs(30);
    assert_eq!(s.exec("sudo bash -s", Some(b"echo prep\n"), t).await.unwrap().status, 0);
    s.close().await;
    let s = testkit::eventually("hardened ssh", Duration::from_secs(10), || async { kit::ssh::connect(&target(stack.hardened_port, None)).await.ok() })
        .await
        .unwrap();
    let host_key = s.host_key.clone();
    let secret = "ab".repeat(32);
    let env = format!("K2_NODE_SECRET={secret}\nK2_CENTER_URL={}\nK2_DOMAIN=\nK2_VERSION=1.6.3\nK2_NODE_NAME={name}\nK2_NODE_REGION=de\nK2_IP_TYPE=residential\n", stack.center_url);
    assert_eq!(s.exec("sudo tee /apps/kaitu-slave/.env > /dev/null", Some(env.as_bytes()), t).await.unwrap().status, 0);
    // The stack the deployer ships (compose checks its images against the sim's registry).
    let compose = include_str!("../../deploy/node/docker-compose.yml");
    assert_eq!(s.exec("sudo tee /apps/kaitu-slave/docker-compose.yml > /dev/null", Some(compose.as_bytes()), t).await.unwrap().status, 0);
    let up = s.exec("cd /apps/kaitu-slave && sudo docker compose -f docker-compose.yml up -d", None, t).await.unwrap();
    assert_eq!(up.status, 0, "{}", up.stderr_tail());
    let mut op_pb = proto::Operation { operation_id: op.clone(), sub_id: sub.clone(), region: "de".into(), traffic_total_bytes: 100 * GIB, claim_attempt: 1, ..Default::default() };
    op_pb.center_url = claimed.identity.as_ref().map(|i| i.center_url.clone()).unwrap_or_default();
    let deployed = proto::NodeDeployed {
        op: Some(op_pb),
        instance: Some(proto::Instance { instance_id: inst.id.clone(), name: name.clone(), ipv4: ip.clone(), account: "sim-lightsail".into(), ..Default::default() }),
        node_name: name.clone(),
        node_secret_sha256: vec![0; 32],
        sold_bytes: 100 * GIB,
        host_key,
        ssh_port: u32::from(stack.hardened_port),
        deployed_at_ms: kit::now_ms(),
        private_node: true,
        ssh_user: "ubuntu".into(),
    };
    publish(&stack, Body::Deployed(deployed), &op, &sub, proto::Stage::Deploy).await;
    let bus = Bus::connect(&stack.nats.url(), "t", Duration::from_secs(5)).await.unwrap();
    let s2 = bus.js.get_stream(proto::subjects::OPS_STREAM).await.unwrap();
    let m = testkit::eventually("pn.op.failed", Duration::from_secs(30), || async { s2.get_last_raw_message_by_subject(&format!("pn.op.failed.{op}")).await.ok() })
        .await
        .unwrap();
    let Ok(Body::Failed(f)) = Event::from_bytes(&m.payload) else { panic!("not OpFailed") };
    assert_eq!(f.stage, "verify");
    assert!(f.reason.contains("usage reporter"), "{}", f.reason);
}

#[tokio::test]
async fn a_verifier_restarted_mid_wait_keeps_the_original_deadline() {
    let deadline_ms = 12_000u64;
    let mut stack = Stack::builder().env("svc-verifier", "PN_DEADLINE_MS", &deadline_ms.to_string()).start().await.unwrap();
    stack.faults(json!({"neverRegister": true})).await.unwrap();
    let (op, _) = stack.intent("sg", 100 * GIB, "residential").await.unwrap();
    let bus = Bus::connect(&stack.nats.url(), "t", Duration::from_secs(5)).await.unwrap();
    let s = bus.js.get_stream(proto::subjects::OPS_STREAM).await.unwrap();
    testkit::eventually("pn.op.deployed", Duration::from_secs(60), || async { s.get_last_raw_message_by_subject(&format!("pn.op.deployed.{op}")).await.ok() })
        .await
        .unwrap();
    // Give the verifier a moment to record the deadline, then take it down past that deadline.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stack.kill("svc-verifier");
    tokio::time::sleep(Duration::from_millis(deadline_ms + 1000)).await;
    let restarted_at = kit::now_ms();
    stack.spawn("svc-verifier").unwrap();
    stack.wait_ready("svc-verifier").await.unwrap();
    let m = testkit::eventually("pn.op.failed", Duration::from_secs(60), || async { s.get_last_raw_message_by_subject(&format!("pn.op.failed.{op}")).await.ok() })
        .await
        .unwrap();
    let Ok(Body::Failed(f)) = Event::from_bytes(&m.payload) else { panic!("not OpFailed") };
    assert!(f.reason.contains("registration"), "{}", f.reason);
    // A fresh deadline would have given the node another 12 s after the restart.
    assert!(f.failed_at_ms - restarted_at < deadline_ms as i64, "failed {} ms after the restart", f.failed_at_ms - restarted_at);
}
