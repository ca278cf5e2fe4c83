//! Issue #16, svc-cloud's part: the reaper deletes only what is provably dead and ours, an
//! operator sees and confirms what it kept (`pnctl reap`), and svc-cloud's waits park instead
//! of holding a handler. Real nats-server, center-sim, service binaries and pnctl.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::time::{Duration, Instant};

use kit::bus::Bus;
use serde_json::{Value, json};
use testkit::stack::Stack;

const GIB: u64 = 1 << 30;

/// svc-cloud's ops URL (the stack starts it with `PN_OPS_LISTEN`, kept as the process name).
fn cloud_url(stack: &Stack) -> String {
    format!("http://{}", stack.procs["svc-cloud"].name)
}

/// Runs the real `pnctl` binary: (success, stdout, stderr).
async fn pnctl(args: Vec<String>) -> (bool, String, String) {
    pnctl_env(args, vec![]).await
}

/// Like [`pnctl`], with `env` set (e.g. `PN_OPS_TOKEN`).
async fn pnctl_env(args: Vec<String>, env: Vec<(&'static str, String)>) -> (bool, String, String) {
    tokio::task::spawn_blocking(move || {
        let out = Command::new(testkit::bin("pnctl").unwrap()).args(&args).env_remove("RUST_LOG").envs(env).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
    })
    .await
    .unwrap()
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// The instance named `pn-<sub>` (the newest, if several).
async fn instance_of(stack: &Stack, sub: &str) -> Option<Value> {
    let inst = stack.items("/admin/instances").await.ok()?;
    inst.into_iter().rev().find(|i| i["name"] == format!("pn-{sub}"))
}

/// svc-cloud's log lines about `op` that carry `needle`.
fn cloud_log_lines(stack: &Stack, op: &str, needle: &str) -> Vec<String> {
    std::fs::read_to_string(stack.log_path("svc-cloud"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(op) && l.contains(needle))
        .map(str::to_string)
        .collect()
}

async fn no_secret_leaked(stack: &Stack) {
    assert_eq!(stack.secret_findings().await.unwrap(), Vec::<String>::new());
}

/// (c) A forged `pn.op.failed` — the right attempt and instance id — for an operation Center
/// activated deletes nothing: the reaper asks Center, which says `done`.
#[tokio::test]
async fn a_forged_failure_for_a_verified_operation_deletes_nothing() {
    let stack = Stack::builder().start().await.unwrap();
    let (op, sub) = stack.intent("sg", 300 * GIB, "residential").await.unwrap();
    let v = stack.wait_status(&op, &["done", "failed"], Duration::from_secs(120)).await.unwrap();
    assert_eq!(v["status"], "done", "{v}");
    let bus = Bus::connect(&stack.nats.url(), "test", Duration::from_secs(5)).await.unwrap();
    let ops = bus.js.get_stream(proto::subjects::OPS_STREAM).await.unwrap();
    testkit::eventually("pn.op.verified", Duration::from_secs(60), || async {
        ops.get_last_raw_message_by_subject(&format!("pn.op.verified.{op}")).await.ok()
    })
    .await
    .unwrap();
    let instance_id = v["result"]["instanceId"].as_str().unwrap().to_string();

    bus.publish_failed(proto::OpFailed {
        sub_id: sub.clone(),
        ..proto::OpFailed::new(&op, "verify", "verify: forged by the test", kit::now_ms()).on_instance(instance_id.clone())
    })
    .await
    .unwrap();

    // After the grace (1 s here) the reaper looks, and says why it kept the VPS.
    let line = testkit::eventually("svc-cloud's reap decision", Duration::from_secs(60), || async {
        cloud_log_lines(&stack, &op, "reap: ").into_iter().next()
    })
    .await
    .unwrap();
    assert!(line.contains("kept-active"), "{line}");
    assert!(line.contains("done at Center") || line.contains("registered at Center"), "{line}");
    let i = instance_of(&stack, &sub).await.unwrap();
    assert_eq!(i["id"], instance_id.as_str());
    assert_eq!(i["status"], "running", "{i}");
    assert!(cloud_log_lines(&stack, &op, "reap: deleted").is_empty());

    // Nor does an operator's confirm move it: activation is final.
    let (ok, out, err) =
        pnctl_env(args(&["reap", "--confirm", &op, "--cloud-url", &cloud_url(&stack)]), vec![("PN_OPS_TOKEN", stack.ops_token.clone())]).await;
    assert!(!ok, "confirm must refuse: {out} {err}");
    assert!(err.contains("kept-active"), "{err}");
    let i = instance_of(&stack, &sub).await.unwrap();
    assert_eq!(i["status"], "running", "{i}");
    let o = stack.operation(&op).await.unwrap();
    assert_eq!(o["status"], "done", "{o}");
    no_secret_leaked(&stack).await;
}

/// (d) A node that never registers: Center's sweep fails the operation, the pipeline reports
/// it, and its VPS is reaped — proven dead (failed at Center, the current attempt) and ours.
#[tokio::test]
async fn a_node_that_never_registers_is_failed_by_the_sweep_and_reaped() {
    // The sweep (15 s after the claim) fails it at Center first; the verifier sees that and
    // reports it at the latest at its own deadline.
    let stack = Stack::builder().env("svc-verifier", "PN_DEADLINE_MS", "25000").start().await.unwrap();
    stack.faults(json!({"neverRegister": true, "operationTimeoutMs": 15000})).await.unwrap();
    let (op, sub) = stack.intent("jp", 200 * GIB, "residential").await.unwrap();
    let v = stack.wait_status(&op, &["failed", "done"], Duration::from_secs(90)).await.unwrap();
    assert_eq!(v["status"], "failed", "{v}");
    assert!(v["error"].as_str().unwrap_or("").contains("timed out"), "{v}");
    testkit::eventually("the VPS reaped", Duration::from_secs(60), || async {
        let i = instance_of(&stack, &sub).await?;
        (i["status"] == "deleted").then_some(())
    })
    .await
    .unwrap();
    let inst = stack.items("/admin/instances").await.unwrap();
    assert_eq!(inst.iter().filter(|i| i["name"] == format!("pn-{sub}")).count(), 1, "{inst:?}");
    // The decision is logged right after the delete returns: give the line a moment.
    let lines = testkit::eventually("the reap decision logged", Duration::from_secs(10), || async {
        let l = cloud_log_lines(&stack, &op, "reap: deleted");
        (!l.is_empty()).then_some(l)
    })
    .await
    .unwrap();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("failed at Center"), "{}", lines[0]);
    no_secret_leaked(&stack).await;
}

/// (p) Center down when the reap is due: uncertain → kept, counted and listed
/// (`pnctl reap --pending --json`, svc-cloud found through stack.json); once Center answers
/// again, `pnctl reap --confirm` runs the checks and deletes it.
#[tokio::test]
async fn a_reap_center_cannot_confirm_is_kept_listed_and_deleted_on_confirm() {
    let stack = Stack::builder()
        .env("svc-verifier", "PN_DEADLINE_MS", "4000")
        .env("svc-cloud", "PN_REAP_GRACE_MS", "6000")
        // The re-check would delete it by itself once Center answers; here the operator does.
        .env("svc-cloud", "PN_REAP_RECHECK_MS", "600000")
        .start()
        .await
        .unwrap();
    stack.faults(json!({"neverRegister": true})).await.unwrap();
    let (op, sub) = stack.intent("de", 100 * GIB, "residential").await.unwrap();
    let v = stack.wait_status(&op, &["failed", "done"], Duration::from_secs(90)).await.unwrap();
    assert_eq!(v["status"], "failed", "{v}");
    // Center goes down before the grace ends.
    stack.faults(json!({"centerErrorRate": 1.0})).await.unwrap();

    // A stack file like `pnctl up` writes, naming svc-cloud's ops URL.
    let data = tempfile::tempdir().unwrap();
    let stack_json = json!({
        "natsUrl": stack.nats.url(), "natsPid": null, "centerUrl": stack.center_url, "meterUrl": stack.meter_url,
        "services": {"svc-cloud": {"pid": stack.pid("svc-cloud"), "opsUrl": cloud_url(&stack)}},
        "restarts": {}, "supervisorPid": std::process::id(), "state": "ready"
    });
    std::fs::write(data.path().join("stack.json"), stack_json.to_string()).unwrap();
    // …and the operator token where `pnctl up` keeps it (the confirm sends it).
    std::fs::create_dir_all(data.path().join("secrets")).unwrap();
    std::fs::copy(stack.dir.path().join("secrets/ops-token"), data.path().join("secrets/ops-token")).unwrap();
    let dd = data.path().display().to_string();

    let listed = testkit::eventually("the reap listed as pending", Duration::from_secs(90), || async {
        let (ok, out, _) = pnctl(args(&["--data-dir", &dd, "reap", "--pending", "--json"])).await;
        let v: Value = serde_json::from_str(out.trim()).ok()?;
        let item = v.as_array()?.iter().find(|i| i["operationId"] == op.as_str())?.clone();
        ok.then_some(item)
    })
    .await
    .unwrap();
    assert_eq!(listed["subId"], sub.as_str());
    assert!(listed["reason"].as_str().unwrap_or("").starts_with("center:"), "{listed}");
    assert!(listed["since"].as_i64().unwrap_or(0) > 0, "{listed}");
    let i = instance_of(&stack, &sub).await.unwrap();
    assert_eq!(listed["instanceIds"], json!([i["id"]]));
    assert_ne!(i["status"], "deleted", "{i}");
    let pending_line = cloud_log_lines(&stack, &op, "reap: pending");
    assert!(!pending_line.is_empty());
    let metrics = reqwest::get(format!("{}/metrics", cloud_url(&stack))).await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|l| l.starts_with("pn_reap_pending") && l.trim_end().ends_with(" 1")), "{metrics}");
    assert!(metrics.contains("pn_reap_decisions_total{decision=\"pending\"}"), "{metrics}");
    // The readable listing names it too.
    let (ok, out, _) = pnctl(args(&["--data-dir", &dd, "reap", "--pending"])).await;
    assert!(ok && out.contains(&op), "{out}");

    // While Center is still down, a confirm cannot prove anything: kept.
    let (ok, _, err) = pnctl(args(&["--data-dir", &dd, "reap", "--confirm", &op])).await;
    assert!(!ok && err.contains("pending"), "{err}");
    assert_ne!(instance_of(&stack, &sub).await.unwrap()["status"], "deleted");

    stack.faults(json!({"centerErrorRate": 0.0})).await.unwrap();
    let (ok, out, err) = pnctl(args(&["--data-dir", &dd, "reap", "--confirm", &op, "--json"])).await;
    assert!(ok, "{out} {err}");
    let o: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(o["decision"], "deleted", "{o}");
    assert_eq!(instance_of(&stack, &sub).await.unwrap()["status"], "deleted");
    let (ok, out, _) = pnctl(args(&["--data-dir", &dd, "reap", "--pending", "--json"])).await;
    assert!(ok);
    assert_eq!(serde_json::from_str::<Value>(out.trim()).unwrap(), json!([]));
    assert_eq!(cloud_log_lines(&stack, &op, "reap: deleted").len(), 1);
    no_secret_leaked(&stack).await;

    // Unreachable svc-cloud: a clear error, not a hang.
    let (ok, _, err) = pnctl(args(&["reap", "--pending", "--cloud-url", "http://127.0.0.1:9"])).await;
    assert!(!ok && err.contains("cannot reach svc-cloud"), "{err}");
}

/// (w) A booting VPS holds no handler slot: with 2 slots and a 10 s boot, 8 operations all get
/// their VPS created before the first one is running, and all 8 finish.
#[tokio::test]
async fn boot_waits_are_parked_not_held() {
    let boot_ms = 10_000u64;
    let stack = Stack::builder().env("svc-cloud", "PN_MAX_IN_FLIGHT", "2").env("svc-cloud", "PN_BOOT_POLL_MS", "500").start().await.unwrap();
    stack.faults(json!({"bootDelayMs": boot_ms})).await.unwrap();
    let mut ops = Vec::new();
    for i in 0..8 {
        ops.push(stack.intent(["sg", "jp", "de", "us"][i % 4], 300 * GIB, "residential").await.unwrap());
    }
    // Watch the cloud: when each instance appears, and when the first one runs.
    let started = Instant::now();
    let mut appeared: BTreeMap<String, Duration> = BTreeMap::new();
    let first_running = loop {
        let inst = stack.items("/admin/instances").await.unwrap();
        for i in &inst {
            appeared.entry(i["id"].as_str().unwrap_or("").to_string()).or_insert_with(|| started.elapsed());
        }
        if inst.iter().any(|i| i["status"] == "running") {
            break started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(120), "nothing running after 120 s: {inst:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(appeared.len(), 8, "only {} of 8 VPSs created before the first ran ({first_running:?}): {appeared:?}", appeared.len());
    let (first, last) = (appeared.values().min().unwrap(), appeared.values().max().unwrap());
    eprintln!("8 VPSs created within {:?} (first seen at {first:?}); the first ran at {first_running:?}", *last - *first);
    for (op, _) in &ops {
        let v = stack.wait_status(op, &["done", "failed"], Duration::from_secs(180)).await.unwrap();
        assert_eq!(v["status"], "done", "{op}: {v}");
    }
    // One VPS per subscription, none deleted.
    let inst = stack.items("/admin/instances").await.unwrap();
    let mut by_name: HashMap<String, usize> = HashMap::new();
    for i in &inst {
        assert_ne!(i["status"], "deleted", "{i}");
        *by_name.entry(i["name"].as_str().unwrap_or("").to_string()).or_default() += 1;
    }
    assert!(by_name.values().all(|n| *n == 1) && by_name.len() == 8, "{by_name:?}");
    let metrics = reqwest::get(format!("{}/metrics", cloud_url(&stack))).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("pn_handler_parks_total{stage=\"cloud\"}"), "svc-cloud never parked");
    no_secret_leaked(&stack).await;
}

/// Seed 001 §3.f on the parked path: an instance without an IP is deleted and the create is
/// retried after the pause, then in the sibling region, and the operation fails with every
/// reason; a create the cloud keeps refusing goes the same way. Nothing is left running.
#[tokio::test]
async fn seed_001_fail_paths_hold_with_parking() {
    let stack = Stack::builder().only(&["svc-claimer", "svc-cloud"]).start().await.unwrap();
    stack.faults(json!({"noIpRate": 1.0})).await.unwrap();
    let (op, sub) = stack.intent("sg", 300 * GIB, "residential").await.unwrap();
    let v = stack.wait_status(&op, &["failed", "in_progress"], Duration::from_secs(120)).await.unwrap();
    assert_eq!(v["status"], "failed", "{v}");
    let err = v["error"].as_str().unwrap_or("");
    // The reason is clipped at Center; the first three of the four are in it.
    assert!(err.starts_with("cloud:") && err.matches("got no public IPv4").count() >= 3, "{err}");
    assert!(err.contains("ap-southeast-1") && err.contains("ap-northeast-1"), "{err}");
    let inst = stack.items("/admin/instances").await.unwrap();
    let mine: Vec<&Value> = inst.iter().filter(|i| i["name"] == format!("pn-{sub}")).collect();
    assert_eq!(mine.len(), 4, "{mine:?}");
    assert!(mine.iter().all(|i| i["status"] == "deleted"), "{mine:?}");

    stack.faults(json!({"noIpRate": 0.0, "createFailRate": 1.0})).await.unwrap();
    let (op, sub) = stack.intent("us", 300 * GIB, "residential").await.unwrap();
    let v = stack.wait_status(&op, &["failed", "in_progress"], Duration::from_secs(120)).await.unwrap();
    assert_eq!(v["status"], "failed", "{v}");
    let err = v["error"].as_str().unwrap_or("");
    assert!(err.contains("us-west-2") && err.contains("us-east-1") && err.contains("plan unavailable"), "{err}");
    assert!(instance_of(&stack, &sub).await.is_none());

    // A cloud that recovers between tries: the retry succeeds, the broken VPS is gone.
    stack.faults(json!({"createFailRate": 0.0, "noIpRate": 1.0})).await.unwrap();
    let (op, sub) = stack.intent("jp", 300 * GIB, "residential").await.unwrap();
    testkit::eventually("the first create", Duration::from_secs(60), || async { instance_of(&stack, &sub).await }).await.unwrap();
    stack.faults(json!({"noIpRate": 0.0})).await.unwrap();
    let v = stack.wait_status(&op, &["failed", "in_progress"], Duration::from_secs(120)).await.unwrap();
    assert_eq!(v["status"], "in_progress", "{v}");
    let inst = stack.items("/admin/instances").await.unwrap();
    let mine: Vec<&Value> = inst.iter().filter(|i| i["name"] == format!("pn-{sub}")).collect();
    assert_eq!(mine.iter().filter(|i| i["status"] != "deleted").count(), 1, "{mine:?}");
    assert_eq!(v["result"]["instanceId"], mine.iter().find(|i| i["status"] != "deleted").unwrap()["id"]);
}
