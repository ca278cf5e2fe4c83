//! Issue #16, the verifier's part, on real parts (nats-server, center-sim, the five service
//! binaries, the real `pnctl`): activation is final — a node that registered but whose check
//! never holds is *degraded*, never failed, and its VPS is not reaped; and a verifier that
//! restarts after `server ready` scrolled out of every `docker logs --tail` still verifies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use proto::Body;
use serde_json::{Value, json};
use testkit::stack::Stack;

const GIB: u64 = 1 << 30;

/// Runs the real `pnctl` against this stack; returns stdout (asserting success).
fn pnctl(stack: &Stack, args: &[&str]) -> String {
    let nats = stack.nats.url();
    let none = stack.dir.path().join("no-pnctl-data");
    let out = Command::new(testkit::bin("pnctl").unwrap())
        .args(args)
        .args(["--nats-url", &nats, "--center-url", &stack.center_url, "--meter-url", &stack.meter_url])
        .arg("--data-dir")
        .arg(&none)
        .output()
        .unwrap();
    assert!(out.status.success(), "pnctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn instance_named<'a>(items: &'a [Value], name: &str) -> Vec<&'a Value> {
    items.iter().filter(|i| i["name"] == name).collect()
}

/// svc-verifier's Prometheus text.
async fn verifier_metrics(stack: &Stack) -> String {
    let ops = stack.procs.get("svc-verifier").map(|p| p.name.clone()).unwrap_or_default();
    reqwest::get(format!("http://{ops}/metrics")).await.unwrap().text().await.unwrap()
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' '])).find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// (a) The node registers (the operation is `done`, the subscription active) but the meter never
/// sees usage before the verifier's deadline: the operation stays `done`, no `pn.op.failed`,
/// `pn.op.degraded` once, the VPS survives the deadline and the reap grace, `pnctl status`
/// shows it degraded — and once usage does arrive, it is verified as usual.
#[tokio::test]
async fn an_activated_node_without_usage_is_degraded_never_failed_nor_reaped() {
    let stack = Stack::builder()
        .env("svc-verifier", "PN_DEADLINE_MS", "4000")
        .env("svc-verifier", "PN_DEGRADED_POLL_MAX_MS", "2000")
        .env("svc-cloud", "PN_REAP_GRACE_MS", "1000")
        .start()
        .await
        .unwrap();
    // The sidecar's first report is only the baseline; the next is an hour away.
    stack.faults(json!({"usageIntervalMs": 3_600_000})).await.unwrap();
    let (op, sub) = stack.intent("sg", 100 * GIB, "residential").await.unwrap();
    let node = format!("pn-{sub}");
    let v = stack.wait_status(&op, &["done", "failed"], Duration::from_secs(120)).await.unwrap();
    assert_eq!(v["status"], "done", "{v}");

    // Past the deadline: degraded, not failed.
    let degraded = testkit::eventually("pn.op.degraded", Duration::from_secs(60), || async {
        stack.events_of(&op).await.unwrap().into_iter().find_map(|b| if let Body::Degraded(g) = b { Some(g) } else { None })
    })
    .await
    .unwrap();
    assert_eq!(degraded.node_name, node);
    assert_eq!(degraded.stage, "verify");
    assert!(degraded.reason.contains("not verified within 4s") && degraded.reason.contains("usage"), "{}", degraded.reason);
    assert_eq!(degraded.op.as_ref().map(|o| o.operation_id.as_str()), Some(op.as_str()));

    // The deadline and the reap grace pass (and a few slow rounds with them): nothing is undone.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let evs = stack.events_of(&op).await.unwrap();
    let k = Stack::kinds(&evs);
    assert!(!k.contains(&"failed"), "no pn.op.failed for an activated operation: {k:?}");
    assert!(!k.contains(&"verified"), "{k:?}");
    assert_eq!(k.iter().filter(|e| **e == "degraded").count(), 1, "published once: {k:?}");
    let o = stack.operation(&op).await.unwrap();
    assert_eq!(o["status"], "done", "{o}");
    assert_eq!(o["terminalReports"].as_u64().unwrap_or(0), 0, "nothing reported the operation failed: {o}");
    let inst = stack.items("/admin/instances").await.unwrap();
    let mine = instance_named(&inst, &node);
    assert_eq!(mine.len(), 1, "{inst:?}");
    assert_eq!(mine[0]["status"], "running", "the customer's VPS is alive: {}", mine[0]);
    let nodes = stack.items("/admin/nodes").await.unwrap();
    assert!(nodes.iter().any(|n| n["name"] == node.as_str() && n["hidden"] == false), "{nodes:?}");

    // The verifier counts it.
    let m = testkit::eventually("degraded metrics", Duration::from_secs(20), || async {
        let m = verifier_metrics(&stack).await;
        (metric(&m, "pn_ops_degraded_total") == Some(1.0)).then_some(m)
    })
    .await
    .unwrap();
    assert_eq!(metric(&m, "pn_ops_degraded"), Some(1.0), "{m}");

    // The operator sees it: the real pnctl, summary and history, JSON and human.
    let all: Value = serde_json::from_str(&pnctl(&stack, &["status", "--json"])).unwrap();
    let row = all["operations"].as_array().unwrap().iter().find(|r| r["operationId"] == op.as_str()).cloned().unwrap();
    assert_eq!(row["stage"], "deployed", "{row}");
    assert!(row["degraded"].as_str().unwrap_or("").contains("usage"), "{row}");
    assert!(row.get("error").is_none(), "{row}");
    let one: Value = serde_json::from_str(&pnctl(&stack, &["status", &op, "--json"])).unwrap();
    assert!(one["degraded"].as_str().unwrap_or("").contains("usage"), "{one}");
    assert_eq!(one["center"]["status"], "done", "{one}");
    let table = pnctl(&stack, &["status"]);
    let line = table.lines().find(|l| l.starts_with(&op)).unwrap_or_default().to_string();
    assert!(line.contains("degraded") && line.contains("degraded: not verified within 4s"), "{table}");

    // Usage arrives after all: the slow watch sees it and verifies as usual.
    stack.admin_send(reqwest::Method::POST, &format!("/admin/nodes/{node}/traffic"), json!({"bytes": 10_000_000})).await.unwrap();
    testkit::eventually("pn.op.verified after the degradation", Duration::from_secs(60), || async {
        stack.events_of(&op).await.unwrap().iter().any(|b| matches!(b, Body::Verified(_))).then_some(())
    })
    .await
    .unwrap();
    let all: Value = serde_json::from_str(&pnctl(&stack, &["status", "--json"])).unwrap();
    let row = all["operations"].as_array().unwrap().iter().find(|r| r["operationId"] == op.as_str()).cloned().unwrap();
    assert_eq!(row["stage"], "verified", "{row}");
    assert!(row.get("degraded").is_none(), "{row}");
    let m = testkit::eventually("the gauge falls", Duration::from_secs(20), || async {
        let m = verifier_metrics(&stack).await;
        (metric(&m, "pn_ops_degraded") == Some(0.0)).then_some(m)
    })
    .await
    .unwrap();
    assert_eq!(metric(&m, "pn_ops_degraded_total"), Some(1.0), "{m}");
    assert!(!Stack::kinds(&stack.events_of(&op).await.unwrap()).contains(&"failed"));

    assert_eq!(stack.items("/admin/violations").await.unwrap(), Vec::<Value>::new());
    assert_eq!(stack.secret_findings().await.unwrap(), Vec::<String>::new());
}

/// (f) The verifier is down while a node deploys whose containers log thousands of lines after
/// their start-up lines (`server ready`, `Registration completed`, `usage-reporter-start` are
/// far out of any `docker logs --tail`); restarted, it still verifies.
#[tokio::test]
async fn a_restarted_verifier_verifies_after_server_ready_scrolled_away() {
    let mut stack = Stack::builder().start().await.unwrap();
    stack.faults(json!({"logNoiseLines": 50_000})).await.unwrap();
    stack.kill("svc-verifier");
    let (op, sub) = stack.intent("de", 100 * GIB, "residential").await.unwrap();
    let node = format!("pn-{sub}");
    let v = stack.wait_status(&op, &["done", "failed"], Duration::from_secs(120)).await.unwrap();
    assert_eq!(v["status"], "done", "{v}");
    testkit::eventually("pn.op.deployed", Duration::from_secs(30), || async {
        stack.events_of(&op).await.unwrap().iter().any(|b| matches!(b, Body::Deployed(_))).then_some(())
    })
    .await
    .unwrap();

    // On the node: the lines are out of the tail the verifier used to read, and in the log.
    let inst = stack.items("/admin/instances").await.unwrap();
    let ip = instance_named(&inst, &node)[0]["ipv4"].as_str().unwrap().to_string();
    let key = kit::ssh::AdminKeys::parse(&format!("a={}", stack.dir.path().join("secrets/ssh-admin-key").display())).unwrap().load("a").unwrap();
    let target = kit::ssh::Target {
        host: ip,
        port: stack.hardened_port,
        user: "ubuntu".into(),
        key,
        pinned: None,
        connect_timeout: Duration::from_secs(5),
    };
    let s = kit::ssh::connect(&target).await.unwrap();
    let t = Duration::from_secs(30);
    let tail = s.exec("sudo docker logs --tail 20 k2s 2>&1", None, t).await.unwrap();
    assert_eq!(tail.status, 0);
    assert_eq!(tail.stdout_str().lines().count(), 20, "--tail N is the last N lines");
    assert!(!tail.stdout_str().contains("server ready"), "{}", tail.stdout_str());
    let tail = s.exec("sudo docker logs --tail 80 k2-sidecar 2>&1", None, t).await.unwrap();
    assert!(!tail.stdout_str().contains("Registration completed") && !tail.stdout_str().contains("usage-reporter-start"));
    let found = s.exec("sudo docker logs k2s 2>&1 | grep -F -m 1 -e 'server ready'", None, t).await.unwrap();
    assert_eq!(found.status, 0);
    assert_eq!(found.stdout_str().lines().count(), 1);
    assert!(found.stdout_str().contains("server ready listen=:443"));
    let none = s.exec("sudo docker logs k2s 2>&1 | grep -F -m 1 -e 'no such line'", None, t).await.unwrap();
    assert_eq!((none.status, none.stdout.len()), (1, 0));
    s.close().await;

    stack.spawn("svc-verifier").unwrap();
    stack.wait_ready("svc-verifier").await.unwrap();
    let v = testkit::eventually("pn.op.verified", Duration::from_secs(90), || async {
        stack.events_of(&op).await.unwrap().into_iter().find_map(|b| if let Body::Verified(v) = b { Some(v) } else { None })
    })
    .await
    .unwrap();
    assert_eq!(v.node_name, node);
    assert!(v.domain.ends_with(".sslip.io"), "{}", v.domain);
    let k = Stack::kinds(&stack.events_of(&op).await.unwrap());
    assert!(!k.contains(&"failed") && !k.contains(&"degraded"), "{k:?}");
    assert_eq!(stack.items("/admin/violations").await.unwrap(), Vec::<Value>::new());
    assert_eq!(stack.secret_findings().await.unwrap(), Vec::<String>::new());
}
