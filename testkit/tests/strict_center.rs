//! Issue #19, Center's side: the runbook's calls are the contract (center-sim checks argument
//! names against the schemas it publishes), a stricter registration (a revoked or used claim
//! is refused), and one knob per unverified assumption about Center — `maxPageSize`,
//! `leaseExtendsOnProgress`, `idFilter`, `updateNodeTool`, `deleteInstanceTool`, `argCase` —
//! under each of which, alone and all at once, Pnp stays correct and safe. Real parts:
//! nats-server, center-sim, pn-ingress, the five service binaries, pnctl.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use kit::bus::Bus;
use kit::center::{Center, CenterError, ClientConfig, CreateInstance, McpCenter, OpFilter};
use kit::world::Activation;
use proto::Body;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use testkit::eventually;
use testkit::stack::Stack;

const GIB: u64 = 1 << 30;
const PATIENCE: Duration = Duration::from_secs(180);

/// Sim timings that keep a provision short.
fn fast() -> Value {
    json!({"bootDelayMs": 20, "prepDelayMs": 20, "registrationDelayMs": 20, "usageIntervalMs": 200})
}

/// Every knob at its strict setting.
fn all_strict() -> Value {
    json!({"maxPageSize": 7, "leaseExtendsOnProgress": false, "idFilter": false, "updateNodeTool": false, "deleteInstanceTool": false, "argCase": "snake"})
}

fn client(stack: &Stack) -> Arc<McpCenter> {
    let mut cfg = ClientConfig::new(&stack.center_url, Duration::from_secs(10));
    cfg.attempts = 2;
    McpCenter::new(cfg, SecretString::from(stack.token.clone())).unwrap()
}

/// A service's ops URL (the stack starts it with `PN_OPS_LISTEN`, kept as the process name).
fn ops_url(stack: &Stack, service: &str) -> String {
    format!("http://{}", stack.procs[service].name)
}

/// The sum of a Prometheus series over its labels (`name` or `name{…}` lines).
async fn metric(stack: &Stack, service: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", ops_url(stack, service))).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A service's log lines containing every one of `needles`.
fn log_lines(stack: &Stack, service: &str, needles: &[&str]) -> Vec<String> {
    std::fs::read_to_string(stack.log_path(service))
        .unwrap_or_default()
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_string)
        .collect()
}

/// Waits until every operation of `ops` has a `pn.op.verified`.
async fn all_verified(stack: &Stack, ops: &[(String, String)]) {
    eventually(&format!("{} operations verified", ops.len()), PATIENCE, || async {
        let e = stack.events_by_op().await.unwrap();
        ops.iter().all(|(op, _)| e.get(op).is_some_and(|v| v.iter().any(|b| matches!(b, Body::Verified(_))))).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", stack.log_tail("svc-verifier", 20)));
}

/// Waits until every operation is `done` at Center.
async fn all_done(stack: &Stack, ops: &[(String, String)]) {
    for (op, _) in ops {
        let v = stack.wait_status(op, &["done", "failed"], PATIENCE).await.unwrap();
        assert_eq!(v["status"], "done", "operation {op}: {v}");
    }
}

/// One live instance per subscription, none deleted, exactly `n` in all; no guardrail breach.
async fn one_vps_each_and_no_violation(stack: &Stack, ops: &[(String, String)]) -> Vec<Value> {
    let inst = stack.items("/admin/instances").await.unwrap();
    assert_eq!(inst.len(), ops.len(), "no duplicate, no orphan: {inst:?}");
    for (_, sub) in ops {
        let mine: Vec<_> = inst.iter().filter(|i| i["name"] == format!("pn-{sub}")).collect();
        assert_eq!(mine.len(), 1, "pn-{sub}: {mine:?}");
        assert_ne!(mine[0]["status"], "deleted", "{:?}", mine[0]);
    }
    assert_eq!(stack.items("/admin/violations").await.unwrap(), Vec::<Value>::new());
    inst
}

async fn intents(stack: &Stack, n: usize) -> Vec<(String, String)> {
    let kinds = [("sg", 950 * GIB, "residential"), ("de", 100 * GIB, "non_residential"), ("us", 2048 * GIB, "residential"), ("jp", 300 * GIB, "unknown")];
    let mut ops = Vec::new();
    for i in 0..n {
        let (r, q, t) = kinds[i % kinds.len()];
        ops.push(stack.intent(r, q, t).await.unwrap());
    }
    ops
}

async fn no_secret_leaked(stack: &Stack) {
    assert_eq!(stack.secret_findings().await.unwrap(), Vec::<String>::new());
}

async fn register(stack: &Stack, ip: &str, secret: &str, name: &str, claim: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{}/slave/register", stack.center_url))
        .basic_auth(ip, Some(secret))
        .json(&json!({"name": name, "region": "sg", "ipType": "residential", "privateClaim": claim, "domain": ""}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// Center alone, no pipeline: the runbook's own calls are accepted as it shows them; a
/// misspelled or unknown argument is refused naming it; the client follows strict camel and
/// snake schemas; pages capped below the client's size, an ignored `id` filter and missing
/// tools are handled; a revoked or used claim is refused at registration.
#[tokio::test]
async fn center_takes_the_runbooks_calls_and_the_client_follows_every_knob() {
    let stack = Stack::builder().only(&[]).start().await.unwrap();
    let center = client(&stack);
    let (op, sub) = stack.intent("sg", 950 * GIB, "residential").await.unwrap();

    // 1. The runbook's calls, verbatim (raw arguments, as an agent would send them).
    let queued = center.call("list_node_operations", json!({"action": "provision", "status": "queued"})).await.unwrap();
    assert_eq!(queued["items"][0]["id"], op.as_str(), "{queued}");
    let claimed = center.call("claim_node_operation", json!({"id": op, "holder": "runbook-agent", "leaseSeconds": 600})).await.unwrap();
    assert!(claimed["identity"]["claimToken"].as_str().unwrap().len() >= 32);
    // Runbook step 3's report names no holder: accepted (the sim used to say "holder is required").
    let progressed = center
        .call("update_node_operation", json!({"id": op, "status": "in_progress", "result": {"instanceId": "i-x", "ipv4": "127.0.0.9"}}))
        .await
        .unwrap();
    assert_eq!(progressed["operation"]["status"], "in_progress", "{progressed}");
    let created = center
        .call("create_cloud_instance", json!({"account_name": "sim-lightsail", "region": "ap-southeast-1", "plan": "small_1tb", "image_id": "ubuntu-24-04", "name": format!("pn-{sub}")}))
        .await
        .unwrap();
    assert_eq!(created["instance"]["name"], format!("pn-{sub}"));
    // The runbook's example: 950 GB sold on a 1 TB bundle picks the 1 TB bundle (headroom 1.0).
    let provider = kit::cloud::center::CenterProvider::new(center.clone(), String::new());
    let choice = kit::cloud::Provider::choose(&provider, "ap-southeast-1", 950 * GIB).await.unwrap();
    assert_eq!(choice.plan, "small_1tb", "{choice:?}");

    // 2. Misspelled or unknown: refused, naming the argument; nothing done.
    let refused = |e: CenterError, name: &str| {
        assert!(e.is_invalid_arguments() && e.to_string().contains(name), "{e}");
    };
    refused(center.call("list_node_operations", json!({"action": "provision", "stauts": "queued"})).await.unwrap_err(), "stauts");
    refused(center.call("claim_node_operation", json!({"id": op, "holder": "h", "lease_seconds": 5})).await.unwrap_err(), "lease_seconds");
    refused(
        center.call("create_cloud_instance", json!({"accountName": "sim-lightsail", "region": "ap-southeast-1", "plan": "small_1tb", "image_id": "ubuntu-24-04", "name": "pn-z"})).await.unwrap_err(),
        "accountName",
    );
    assert_eq!(stack.items("/admin/instances").await.unwrap().len(), 1, "the refused create created nothing");

    // 3. Strict camel / snake: the typed client reads the published schema and follows it,
    //    re-reading it when the names change under it.
    for case in ["camel", "snake", "any", "runbook"] {
        stack.faults(json!({"argCase": case})).await.unwrap();
        assert!(center.call("list_cloud_regions", json!({"account_name": "sim-lightsail"})).await.is_ok() == (case != "camel"), "{case}");
        let plans = center.list_cloud_plans("sim-lightsail", "ap-southeast-1").await.unwrap_or_else(|e| panic!("{case}: {e}"));
        assert!(plans.iter().any(|p| p.id == "small_1tb"), "{case}");
        let ops = center.list_node_operations(&OpFilter { action: Some("provision".into()), ..Default::default() }).await.unwrap();
        assert_eq!(ops.len(), 1, "{case}");
        let i = center
            .create_cloud_instance(&CreateInstance {
                account_name: "sim-lightsail".into(),
                region: "eu-central-1".into(),
                plan: "small_1tb".into(),
                image_id: "ubuntu-24-04".into(),
                name: format!("pn-case-{case}"),
            })
            .await
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_eq!(i.name, format!("pn-case-{case}"));
        center.update_node_operation(&op, "runbook-agent", "in_progress", None, None).await.unwrap_or_else(|e| panic!("{case}: {e}"));
    }

    // 4. maxPageSize 7 below the client's 100: every item still comes back.
    for _ in 0..24 {
        stack.intent("de", GIB, "unknown").await.unwrap();
    }
    stack.faults(json!({"maxPageSize": 7})).await.unwrap();
    let page = center.call("list_node_operations", json!({"page": 1, "pageSize": 100})).await.unwrap();
    assert_eq!((page["items"].as_array().unwrap().len(), page["pageSize"].as_u64(), page["total"].as_u64()), (7, Some(7), Some(25)), "{page}");
    let all = center.list_node_operations(&OpFilter::default()).await.unwrap();
    assert_eq!(all.len(), 25, "a short page is not the last");
    let ids: std::collections::HashSet<_> = all.iter().map(|o| o.id.clone()).collect();
    assert_eq!(ids.len(), 25, "no operation twice");

    // 5. idFilter off: the answer is the whole list; kit::world finds the operation by its status.
    stack.faults(json!({"idFilter": false})).await.unwrap();
    let ignored = center.call("list_node_operations", json!({"id": op, "page": 1, "pageSize": 100})).await.unwrap();
    assert_eq!(ignored["total"], 25, "the id filter is ignored: {ignored}");
    let found = kit::world::find_operation(center.as_ref(), &op, &kit::world::STATUS_ORDER).await.unwrap().unwrap();
    assert_eq!((found.id.as_str(), found.status.as_str()), (op.as_str(), "in_progress"));
    assert!(kit::world::id_filter_ignored());
    assert_eq!(kit::world::activation(center.as_ref(), &op, &format!("pn-{sub}")).await, Activation::InFlight { status: "in_progress".into() });
    assert!(kit::world::find_operation(center.as_ref(), "op-nope", &kit::world::STATUS_ORDER).await.unwrap().is_none());

    // 6. update_node and delete_cloud_instance absent: typed as unsupported, not retried.
    stack.faults(json!({"updateNodeTool": false, "deleteInstanceTool": false})).await.unwrap();
    center.refresh_schemas();
    assert!(!center.schemas().await.tools.contains_key("update_node"));
    assert!(center.update_node("pn-x", true).await.unwrap_err().is_unsupported());
    let e = center.delete_cloud_instance(&i_id(&created)).await.unwrap_err();
    assert!(e.is_unsupported() && e.to_string().contains(kit::center::UNSUPPORTED_MARK), "{e}");
    stack.faults(json!({"deleteInstanceTool": true})).await.unwrap();
    center.delete_cloud_instance(&i_id(&created)).await.unwrap();

    // 7. Registration: a revoked claim, a used one, one never issued — refused (403).
    let (op2, sub2) = stack.intent("sg", GIB, "residential").await.unwrap();
    let t1 = center.claim_node_operation(&op2, "h", 1).await.unwrap().identity.unwrap().claim_token.expose_secret().to_string();
    eventually("the lease runs out", Duration::from_secs(20), || async {
        (stack.operation(&op2).await.ok()?["status"] == "queued").then_some(())
    })
    .await
    .unwrap();
    let t2 = center.claim_node_operation(&op2, "h", 600).await.unwrap().identity.unwrap().claim_token.expose_secret().to_string();
    let name = format!("pn-{sub2}");
    let (s, v) = register(&stack, "127.0.9.1", "secret-a-0123456789", &name, &t1).await;
    assert_eq!(s, 403, "the earlier attempt's token is revoked: {v}");
    assert!(v["error"].as_str().unwrap().starts_with("claim revoked"), "{v}");
    assert_eq!(stack.operation(&op2).await.unwrap()["status"], "claimed", "a refused registration changes nothing");
    assert_eq!(register(&stack, "127.0.9.1", "secret-a-0123456789", &name, &t2).await.0, 200);
    assert_eq!(stack.operation(&op2).await.unwrap()["status"], "done");
    assert_eq!(register(&stack, "127.0.9.1", "secret-a-0123456789", &name, &t2).await.0, 200, "the same node again (a reboot)");
    let (s, v) = register(&stack, "127.0.9.2", "secret-b-0123456789", "pn-other", &t2).await;
    assert_eq!(s, 403, "{v}");
    assert!(v["error"].as_str().unwrap().contains("already used"), "{v}");
    assert_eq!(register(&stack, "127.0.9.3", "secret-c-0123456789", "pn-x", "pnclaim_never_issued").await.0, 403);
    let nodes = stack.items("/admin/nodes").await.unwrap();
    assert_eq!(nodes.iter().map(|n| n["name"].as_str().unwrap()).collect::<Vec<_>>(), [name.as_str()], "no refused node registered: {nodes:?}");
    let stats = stack.admin_get("/admin/stats").await.unwrap();
    assert_eq!(stats["claimRefusals"], 3, "{stats}");
}

fn i_id(created: &Value) -> String {
    created["instance"]["id"].as_str().unwrap().to_string()
}

/// maxPageSize alone: 25 queued intents, pages of 7 whatever the claimer asks; one poll of the
/// claimer (its next is an hour away) claims all 25 — it pages until `total`, not until a
/// short page.
#[tokio::test]
async fn pages_capped_below_the_clients_size_still_claim_every_queued_intent() {
    let mut stack = Stack::builder()
        .only(&[])
        .env("svc-claimer", "PN_POLL_INTERVAL_MS", "3600000")
        .env("svc-claimer", "PN_MAX_CLAIMED", "100")
        .start()
        .await
        .unwrap();
    stack.faults(json!({"maxPageSize": 7})).await.unwrap();
    let mut ops = Vec::new();
    for _ in 0..25 {
        ops.push(stack.intent("sg", 100 * GIB, "residential").await.unwrap().0);
    }
    stack.spawn("svc-claimer").unwrap();
    stack.wait_ready("svc-claimer").await.unwrap();
    eventually("all 25 claimed by the first poll", Duration::from_secs(60), || async {
        let queued = stack.items("/admin/operations?status=queued").await.ok()?;
        queued.is_empty().then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", stack.log_tail("svc-claimer", 20)));
    for op in &ops {
        let o = stack.operation(op).await.unwrap();
        assert_eq!((o["status"].as_str(), o["claims"].as_u64()), (Some("claimed"), Some(1)), "{o}");
    }
    assert_eq!(metric(&stack, "svc-claimer", "pn_claimed_in_flight").await, 25.0);
}

/// idFilter alone: the verifier still verifies (it finds the operation by its status), and a
/// forged failure of a verified operation still deletes nothing and is not reported.
#[tokio::test]
async fn without_the_id_filter_the_verifier_verifies_and_a_forged_failure_deletes_nothing() {
    let stack = Stack::builder().start().await.unwrap();
    stack.faults(fast()).await.unwrap();
    stack.faults(json!({"idFilter": false})).await.unwrap();
    let ops = intents(&stack, 3).await;
    all_done(&stack, &ops).await;
    all_verified(&stack, &ops).await;
    assert!(metric(&stack, "svc-verifier", "pn_center_id_filter_ignored_total").await >= 1.0, "the verifier noticed the ignored filter");

    let (op, sub) = &ops[0];
    let instance_id = stack.operation(op).await.unwrap()["result"]["instanceId"].as_str().unwrap().to_string();
    let bus = Bus::connect(&stack.nats.url(), "test", Duration::from_secs(5)).await.unwrap();
    bus.publish_failed(proto::OpFailed {
        sub_id: sub.clone(),
        ..proto::OpFailed::new(op, "verify", "verify: forged by the test", kit::now_ms()).on_instance(instance_id.clone())
    })
    .await
    .unwrap();
    let line = eventually("svc-cloud's reap decision", Duration::from_secs(60), || async {
        log_lines(&stack, "svc-cloud", &[op.as_str(), "reap: "]).into_iter().next()
    })
    .await
    .unwrap();
    assert!(line.contains("kept-active"), "{line}");
    let o = stack.operation(op).await.unwrap();
    assert_eq!((o["status"].as_str(), o["terminalReports"].as_u64()), (Some("done"), Some(0)), "{o}");
    one_vps_each_and_no_violation(&stack, &ops).await;
    no_secret_leaked(&stack).await;
}

/// leaseExtendsOnProgress alone, with a 4 s lease and a pipeline that takes longer: the
/// claimer sees `in_progress` not extend the lease and renews it by a claim of its holder
/// before it runs out. No lease is lost, so no deploy goes on under a lost lease: no lease
/// expiry, one claim per operation, no registration refused.
#[tokio::test]
async fn without_lease_extension_leases_are_renewed_by_claim_and_none_is_lost() {
    let stack = Stack::builder().env("svc-claimer", "PN_LEASE_SECONDS", "4").start().await.unwrap();
    stack
        .faults(json!({"leaseExtendsOnProgress": false, "bootDelayMs": 1500, "prepDelayMs": 3000, "registrationDelayMs": 1500, "usageIntervalMs": 300}))
        .await
        .unwrap();
    let t0 = std::time::Instant::now();
    let ops = intents(&stack, 4).await;
    let first = stack.wait_status(&ops[0].0, &["done", "failed"], PATIENCE).await.unwrap();
    assert!(t0.elapsed() > Duration::from_millis(4500), "the pipeline must outlive the 4 s lease for this to test anything: {first}");
    all_done(&stack, &ops).await;
    all_verified(&stack, &ops).await;
    let stats = stack.admin_get("/admin/stats").await.unwrap();
    assert_eq!((stats["leaseExpiries"].as_u64(), stats["claimRefusals"].as_u64()), (Some(0), Some(0)), "{stats}");
    assert!(stats["leaseRenewals"].as_u64().unwrap() >= 4, "every pipeline outlived a lease: {stats}");
    for (op, _) in &ops {
        let o = stack.operation(op).await.unwrap();
        assert_eq!((o["claims"].as_u64(), o["leaseExpiries"].as_u64()), (Some(1), Some(0)), "{o}");
    }
    assert!(metric(&stack, "svc-claimer", "pn_lease_not_extended_total").await >= 1.0);
    assert!(metric(&stack, "svc-claimer", "pn_lease_renewals_total").await >= 4.0);
    assert_eq!(metric(&stack, "svc-claimer", "pn_lease_lost_total").await, 0.0);
    one_vps_each_and_no_violation(&stack, &ops).await;
    no_secret_leaked(&stack).await;
}

/// updateNodeTool alone: a node over quota still gets 402 from the meter's admission; the hide
/// Center cannot take is reported (a warning and `pn_meter_hide_unsupported_total`) and not
/// retried in a loop.
#[tokio::test]
async fn without_update_node_the_meter_still_answers_402_and_reports_the_missing_hide() {
    let stack = Stack::builder().start().await.unwrap();
    stack.faults(fast()).await.unwrap();
    stack.faults(json!({"updateNodeTool": false})).await.unwrap();
    let (op, sub) = stack.intent("sg", 10_000_000, "residential").await.unwrap();
    all_done(&stack, &[(op.clone(), sub.clone())]).await;
    let node = format!("pn-{sub}");
    let admission = || async {
        reqwest::get(format!("{}/v1/admission/{node}", stack.meter_url)).await.unwrap().status().as_u16()
    };
    eventually("the meter knows the node", Duration::from_secs(60), || async { (admission().await == 200).then_some(()) }).await.unwrap();
    stack.admin_send(reqwest::Method::POST, &format!("/admin/nodes/{node}/traffic"), json!({"bytes": 10_000_000})).await.unwrap();
    eventually("402 at the meter's admission", Duration::from_secs(60), || async { (admission().await == 402).then_some(()) }).await.unwrap();
    eventually("the missing hide reported", Duration::from_secs(30), || async {
        (metric(&stack, "svc-meter", "pn_meter_hide_unsupported_total").await >= 1.0).then_some(())
    })
    .await
    .unwrap();
    let warned = log_lines(&stack, "svc-meter", &["Center has no update_node tool", node.as_str()]);
    assert_eq!(warned.len(), 1, "{warned:?}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(metric(&stack, "svc-meter", "pn_meter_hide_unsupported_total").await, 1.0, "not retried in a loop");
    assert_eq!(admission().await, 402, "still 402");
    no_secret_leaked(&stack).await;
}

/// deleteInstanceTool alone: the VPS of an operation that failed (its node never registered) is
/// proven dead and ours, but cannot be deleted: it is listed for the operator with the reason
/// (`GET /v1/reap/pending`, `pnctl reap --pending`), kept, and looked at only every recheck.
#[tokio::test]
async fn without_delete_a_failed_operations_vps_is_listed_for_the_operator() {
    let stack = Stack::builder().env("svc-verifier", "PN_DEADLINE_MS", "4000").start().await.unwrap();
    stack.faults(fast()).await.unwrap();
    stack.faults(json!({"deleteInstanceTool": false, "neverRegister": true})).await.unwrap();
    let (op, sub) = stack.intent("jp", 200 * GIB, "residential").await.unwrap();
    let v = stack.wait_status(&op, &["failed", "done"], PATIENCE).await.unwrap();
    assert_eq!(v["status"], "failed", "{v}");
    let pending = eventually("the orphan listed", Duration::from_secs(60), || async {
        let p: Value = reqwest::get(format!("{}/v1/reap/pending", ops_url(&stack, "svc-cloud"))).await.ok()?.json().await.ok()?;
        let items = p["items"].as_array().or(p.as_array())?.clone();
        items.into_iter().find(|i| i["operationId"] == op.as_str())
    })
    .await
    .unwrap();
    assert!(pending["reason"].as_str().unwrap().contains("no delete_cloud_instance tool"), "{pending}");
    let out = Command::new(testkit::bin("pnctl").unwrap())
        .args(["reap", "--pending", "--cloud-url", &ops_url(&stack, "svc-cloud")])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(&op), "{}", String::from_utf8_lossy(&out.stdout));
    let looks = |s: &Stack| log_lines(s, "svc-cloud", &[op.as_str(), "reap: pending"]).len();
    let before = looks(&stack);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = looks(&stack);
    assert!(after - before <= 4, "looked again only every recheck (2 s here): {before} → {after}");
    let inst = stack.items("/admin/instances").await.unwrap();
    let mine: Vec<_> = inst.iter().filter(|i| i["name"] == format!("pn-{sub}")).collect();
    assert_eq!((mine.len(), mine[0]["status"].as_str()), (1, Some("running")), "{mine:?}");
    assert_eq!(metric(&stack, "svc-cloud", "pn_reap_pending").await, 1.0);
    no_secret_leaked(&stack).await;
}

/// argCase alone, strict camelCase and then strict snake_case (switched under running
/// services): every call follows the published schema, end to end.
#[tokio::test]
async fn strict_camel_and_strict_snake_argument_names_work_end_to_end() {
    let stack = Stack::builder().start().await.unwrap();
    stack.faults(fast()).await.unwrap();
    let mut all = Vec::new();
    for case in ["camel", "snake"] {
        stack.faults(json!({"argCase": case})).await.unwrap();
        let ops = intents(&stack, 2).await;
        all_done(&stack, &ops).await;
        all_verified(&stack, &ops).await;
        for (op, _) in &ops {
            let o = stack.operation(op).await.unwrap();
            assert!(o["result"]["instanceId"].is_string(), "in_progress was reported under {case}: {o}");
        }
        all.extend(ops);
    }
    one_vps_each_and_no_violation(&stack, &all).await;
    no_secret_leaked(&stack).await;
}

/// Registration strictness in the pipeline: the operation's lease is taken back by Center and
/// given to another agent after the node was deployed; the node's registration with the
/// revoked claim is refused, and the pipeline fails the operation saying so — without
/// reporting over the other agent's lease or deleting the VPS it may adopt.
#[tokio::test]
async fn a_revoked_claim_is_refused_and_the_pipeline_fails_the_operation_saying_so() {
    let stack = Stack::builder().start().await.unwrap();
    stack.faults(fast()).await.unwrap();
    stack.faults(json!({"registrationDelayMs": 6000})).await.unwrap();
    let (op, sub) = stack.intent("sg", 100 * GIB, "residential").await.unwrap();
    eventually("the node deployed", Duration::from_secs(90), || async {
        let inst = stack.items("/admin/instances").await.ok()?;
        inst.iter().any(|i| i["name"] == format!("pn-{sub}") && i["containersUp"] == true).then_some(())
    })
    .await
    .unwrap();
    let r = stack.admin_send(reqwest::Method::POST, &format!("/admin/operations/{op}/revoke"), json!({"claimBy": "other-agent"})).await.unwrap();
    assert_eq!(r["operation"]["holder"], "other-agent", "{r}");

    let failed = eventually("pn.op.failed", PATIENCE, || async {
        let e = stack.events_by_op().await.unwrap();
        e.get(&op)?.iter().find_map(|b| if let Body::Failed(f) = b { Some(f.clone()) } else { None })
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", stack.log_tail("svc-verifier", 20)));
    assert!(failed.reason.contains("claim refused/revoked"), "{}", failed.reason);
    assert!(failed.reason.contains("another holder"), "{}", failed.reason);
    // Center still has it with the other agent: no failure was reported over its lease.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let o = stack.operation(&op).await.unwrap();
    assert_eq!((o["status"].as_str(), o["holder"].as_str(), o["terminalReports"].as_u64()), (Some("claimed"), Some("other-agent"), Some(0)), "{o}");
    assert!(o["claimRefusals"].as_u64().unwrap() >= 1, "{o}");
    assert!(stack.items("/admin/nodes").await.unwrap().is_empty(), "the refused node is not registered");
    let inst = stack.items("/admin/instances").await.unwrap();
    assert!(inst.iter().all(|i| i["status"] != "deleted"), "the VPS is kept for the holder to adopt: {inst:?}");
    assert!(log_lines(&stack, "svc-cloud", &[op.as_str(), "reap: deleted"]).is_empty());
    no_secret_leaked(&stack).await;
}

/// Every knob strict at once — pages of 7, no lease extension on progress (a 6 s lease), the
/// id filter ignored, no update_node, no delete_cloud_instance, strict snake_case names — and
/// 30 intents through the whole pipeline: all done and verified, one VPS each (the 950 GiB
/// ones on the 1 TiB bundle), no lease lost, no refused registration, nothing leaked.
#[tokio::test]
async fn thirty_intents_with_every_knob_strict_at_once() {
    let stack = Stack::builder().env("svc-claimer", "PN_LEASE_SECONDS", "6").start().await.unwrap();
    stack.faults(json!({"bootDelayMs": 300, "prepDelayMs": 2500, "registrationDelayMs": 200, "usageIntervalMs": 500})).await.unwrap();
    stack.faults(all_strict()).await.unwrap();
    let ops = intents(&stack, 30).await;
    all_done(&stack, &ops).await;
    all_verified(&stack, &ops).await;
    let inst = one_vps_each_and_no_violation(&stack, &ops).await;
    for i in inst.iter().filter(|i| i["region"] == "ap-southeast-1") {
        assert_eq!(i["plan"], "small_1tb", "950 GiB sold on the 1 TiB bundle: {i}");
    }
    let stats = stack.admin_get("/admin/stats").await.unwrap();
    assert_eq!((stats["leaseExpiries"].as_u64(), stats["claimRefusals"].as_u64()), (Some(0), Some(0)), "{stats}");
    assert!(stats["leaseRenewals"].as_u64().unwrap() >= 1, "{stats}");
    let evs = stack.events_by_op().await.unwrap();
    for (op, _) in &ops {
        assert!(!evs[op].iter().any(|b| matches!(b, Body::Failed(_))), "{op}: {:?}", evs[op].iter().map(|b| b.event_name()).collect::<Vec<_>>());
        assert_eq!(stack.operation(op).await.unwrap()["claims"], 1);
    }
    no_secret_leaked(&stack).await;
}
