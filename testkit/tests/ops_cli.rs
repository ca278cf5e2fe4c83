//! Issue #20, items 6 and 7: the operator's commands (`pnctl ops list|show|abandon`,
//! `pnctl completions`) and replays that always work, against a real stack (nats-server,
//! center-sim, the service binaries) and the real `pnctl` binary, logged in as the operator
//! identity (`PN_NATS_USER`/`PN_NATS_PASSWORD`, as against a deployment) and given only URLs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use testkit::stack::Stack;

const GIB: u64 = 1 << 30;

/// Runs the real `pnctl` as the operator against `stack`: (success, stdout, stderr).
async fn pnctl(stack: &Stack, a: &[&str]) -> (bool, String, String) {
    let mut args: Vec<String> = vec!["--data-dir".into(), stack.dir.path().join("no-stack-here").display().to_string()];
    args.extend(["--nats-url".to_string(), stack.nats.plain_url(), "--center-url".to_string(), stack.center_url.clone()]);
    args.extend(a.iter().map(|s| s.to_string()));
    let mut urls: Vec<String> = Vec::new();
    for (name, p) in &stack.procs {
        if name.starts_with("svc-") && !name.contains('#') {
            urls.push(format!("{name}=http://{}", p.name));
        }
    }
    let pw = stack.nats.password(kit::nats_auth::OPERATOR).unwrap();
    let ops_token = stack.ops_token.clone();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(testkit::bin("pnctl").unwrap())
            .args(&args)
            .env_remove("RUST_LOG")
            .env("PN_NATS_USER", kit::nats_auth::OPERATOR)
            .env("PN_NATS_PASSWORD", pw)
            .env("PN_OPS_URLS", urls.join(","))
            .env("PN_OPS_TOKEN", ops_token)
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
    })
    .await
    .unwrap()
}

async fn pnctl_json(stack: &Stack, a: &[&str]) -> Value {
    let (ok, out, err) = pnctl(stack, a).await;
    assert!(ok, "pnctl {a:?} failed: {out}\n{err}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("pnctl {a:?}: not JSON ({e}): {out}"))
}

/// The messages on `subject` in PN_OPS: (Nats-Msg-Id, payload) each.
async fn on_subject(stack: &Stack, subject: &str) -> Vec<(String, Vec<u8>)> {
    let bus = kit::bus::Bus::connect(&stack.nats.url(), "test", Duration::from_secs(10)).await.unwrap();
    let mut s = bus.js.get_stream(proto::subjects::OPS_STREAM).await.unwrap();
    let info = s.info().await.unwrap();
    let mut out = Vec::new();
    for seq in info.state.first_sequence.max(1)..=info.state.last_sequence {
        if let Ok(m) = s.get_raw_message(seq).await
            && m.subject.as_str() == subject
        {
            let id = m.headers.get("Nats-Msg-Id").map(|v| v.to_string()).unwrap_or_default();
            out.push((id, m.payload.to_vec()));
        }
    }
    out
}

async fn wait_events(stack: &Stack, event: &str, op: &str, n: usize, patience: Duration) -> Vec<(String, Vec<u8>)> {
    let subject = proto::subjects::op_event(event, op);
    testkit::eventually(&format!("{n} × {subject}"), patience, || async {
        let v = on_subject(stack, &subject).await;
        (v.len() >= n).then_some(v)
    })
    .await
    .unwrap()
}

async fn no_secret_leaked(stack: &Stack) {
    let f = stack.secret_findings().await.unwrap();
    assert!(f.is_empty(), "secrets leaked: {f:?}");
}

/// An operation deployed whose node never registers: it stays held by the verifier (parked
/// between rounds) well past a short deadline.
async fn stuck_in_verify(stack: &Stack) -> (String, String) {
    stack.faults(json!({"neverRegister": true})).await.unwrap();
    let (op, sub) = stack.intent("jp", 200 * GIB, "residential").await.unwrap();
    wait_events(stack, "deployed", &op, 1, Duration::from_secs(120)).await;
    (op, sub)
}

#[tokio::test]
async fn ops_list_finds_the_stuck_operation_show_hides_secrets_and_abandon_follows_the_fail_safe_rules() {
    let stack = Stack::builder().env("svc-verifier", "PN_DEADLINE_MS", "600000").start().await.unwrap();
    // An activated operation first (the node registers: Center says done).
    let (done_op, _) = stack.intent("de", 100 * GIB, "residential").await.unwrap();
    let v = stack.wait_status(&done_op, &["done", "failed"], Duration::from_secs(120)).await.unwrap();
    assert_eq!(v["status"], "done", "{v}");
    wait_events(&stack, "verified", &done_op, 1, Duration::from_secs(120)).await;
    // Then one whose node never registers.
    let (op, sub) = stuck_in_verify(&stack).await;

    // Not stuck under the verifier's own deadline (10 minutes)...
    let l = pnctl_json(&stack, &["ops", "list", "--stuck", "--json"]).await;
    assert!(!l["operations"].as_array().unwrap().iter().any(|o| o["operationId"] == op.as_str()), "{l}");
    // ...stuck once the verify stage's deadline is short: held by the verifier past it.
    let row = testkit::eventually("the operation listed as stuck", Duration::from_secs(30), || async {
        let l = pnctl_json(&stack, &["ops", "list", "--stuck", "--deadline", "verify=2s", "--json"]).await;
        l["operations"].as_array()?.iter().find(|o| o["operationId"] == op.as_str()).cloned()
    })
    .await
    .unwrap();
    assert_eq!((row["stage"].as_str(), row["lastEvent"].as_str(), row["stuck"].as_bool()), (Some("verify"), Some("deployed"), Some(true)), "{row}");
    assert_eq!(row["deadlineMs"], 2000, "{row}");
    // The verified one is neither stuck nor listed as held.
    let l = pnctl_json(&stack, &["ops", "list", "--deadline", "verify=2s", "--json"]).await;
    assert!(!l["operations"].as_array().unwrap().iter().any(|o| o["operationId"] == done_op.as_str()), "{l}");
    // The verifier holds it parked between its rounds: `--parked` from the services' state.
    let parked = testkit::eventually("the operation listed as parked by the verifier", Duration::from_secs(30), || async {
        let l = pnctl_json(&stack, &["ops", "list", "--parked", "--json"]).await;
        l["operations"].as_array()?.iter().find(|o| o["operationId"] == op.as_str()).cloned()
    })
    .await
    .unwrap();
    let held = parked["held"].as_array().unwrap();
    assert!(held.iter().any(|h| h["service"] == "svc-verifier" && h["stage"] == "verify" && h["state"] == "parked"), "{parked}");
    // The table says it too.
    let (ok, table, err) = pnctl(&stack, &["ops", "list", "--stuck", "--deadline", "verify=2s"]).await;
    assert!(ok && table.contains(&op) && table.contains("STUCK"), "{table}{err}");

    // `ops show`: every event, each stage's record, no secret.
    let (ok, shown, err) = pnctl(&stack, &["ops", "show", &op]).await;
    assert!(ok, "{shown}{err}");
    for s in ["pn.op.claimed.", "pn.op.instance.", "pn.op.deployed.", "stages:", "verify", "held by svc-verifier: parked"] {
        assert!(shown.contains(s), "ops show lacks {s:?}:\n{shown}");
    }
    let sj = pnctl_json(&stack, &["ops", "show", &op, "--json"]).await;
    let evs = sj["events"].as_array().unwrap();
    assert!(evs.len() >= 3, "{sj}");
    assert!(evs.iter().all(|e| e["subject"].as_str().unwrap().ends_with(&op) && e["at"].is_string()), "{sj}");
    assert_eq!(sj["stages"]["verify"]["held"][0]["state"], "parked", "{sj}");
    // The claim's sealed token shows as its size only.
    let claimed = evs.iter().find(|e| e["event"] == "claimed").unwrap();
    assert!(claimed["body"]["op"]["sealedClaimToken"].as_str().unwrap().starts_with("<sealed, "), "{claimed}");
    assert_eq!(sj["center"]["status"], "in_progress", "{sj}");
    let secrets = stack.known_secrets().await.unwrap();
    for s in &secrets {
        assert!(!shown.contains(s.as_str()) && !sj.to_string().contains(s.as_str()), "ops show printed a secret");
    }

    // `ops abandon` of the activated operation: refused, nothing changes.
    let (ok, out, err) = pnctl(&stack, &["ops", "abandon", &done_op, "--reason", "operator test"]).await;
    assert!(!ok, "an activated operation must not be abandoned: {out}{err}");
    assert!(err.contains("activated") && err.contains("refused"), "{err}");
    assert_eq!(stack.operation(&done_op).await.unwrap()["status"], "done");
    assert!(on_subject(&stack, &proto::subjects::op_event("failed", &done_op)).await.is_empty(), "no failure published for it");

    // `ops abandon` of the stuck one: failed at Center through the claimer, its VPS reaped.
    let a = pnctl_json(&stack, &["ops", "abandon", &op, "--reason", "node never registers", "--json"]).await;
    assert_eq!((a["decision"].as_str(), a["center"].as_str()), (Some("abandoned"), Some("failed")), "{a}");
    let o = stack.operation(&op).await.unwrap();
    assert_eq!(o["status"], "failed", "{o}");
    assert!(o["error"].as_str().unwrap_or("").contains("abandoned by the operator: node never registers"), "{o}");
    let failed = on_subject(&stack, &proto::subjects::op_event("failed", &op)).await;
    assert_eq!(failed.len(), 1);
    let Ok(proto::Body::Failed(f)) = proto::Event::from_bytes(&failed[0].1) else { panic!("not an OpFailed") };
    assert_eq!((f.stage.as_str(), f.attempt), ("abandon", 1), "{f:?}");
    testkit::eventually("the abandoned operation's VPS reaped", Duration::from_secs(60), || async {
        let inst = stack.items("/admin/instances").await.ok()?;
        let i = inst.into_iter().rev().find(|i| i["name"] == format!("pn-{sub}"))?;
        (i["status"] == "deleted").then_some(())
    })
    .await
    .unwrap();
    // Shown as failed now, no longer stuck.
    let sj = pnctl_json(&stack, &["ops", "show", &op, "--json"]).await;
    assert_eq!(sj["stage"], "failed", "{sj}");
    assert!(sj["error"].as_str().unwrap().starts_with("abandon: "), "{sj}");
    let l = pnctl_json(&stack, &["ops", "list", "--stuck", "--deadline", "verify=2s", "--json"]).await;
    assert!(!l["operations"].as_array().unwrap().iter().any(|o| o["operationId"] == op.as_str()), "{l}");
    // An unknown operation: a clear error.
    let (ok, _, err) = pnctl(&stack, &["ops", "abandon", "op-nobody-knows", "--reason", "x"]).await;
    assert!(!ok && err.contains("no claim"), "{err}");
    no_secret_leaked(&stack).await;
}

#[test]
fn completions_print_for_bash_zsh_and_fish() {
    for (shell, marker) in [("bash", "complete -F"), ("zsh", "#compdef pnctl"), ("fish", "complete -c pnctl")] {
        let out = Command::new(testkit::bin("pnctl").unwrap()).args(["completions", shell]).output().unwrap();
        assert!(out.status.success(), "{shell}: {}", String::from_utf8_lossy(&out.stderr));
        let s = String::from_utf8_lossy(&out.stdout);
        assert!(s.contains(marker) && s.contains("abandon") && s.contains("stuck"), "{shell}:\n{}", &s[..s.len().min(400)]);
    }
    let out = Command::new(testkit::bin("pnctl").unwrap()).args(["completions", "tcsh"]).output().unwrap();
    assert!(!out.status.success());
}

/// A replay published at once (well within JetStream's dedup window) reaches the stage and its
/// outcome is published again, under a msg id of its own.
async fn replayed(stack: &Stack, stage: &str, event: &str, op: &str) -> Vec<(String, Vec<u8>)> {
    let before = on_subject(stack, &proto::subjects::op_event(event, op)).await;
    assert!(!before.is_empty());
    let r = pnctl_json(stack, &["replay", stage, op, "--json"]).await;
    assert_eq!(r["subject"], format!("pn.replay.{stage}"), "{r}");
    let after = wait_events(stack, event, op, before.len() + 1, Duration::from_secs(60)).await;
    let (id, _) = after.last().unwrap();
    assert!(id.starts_with(&format!("{}.", op)) && id.contains(".replay."), "the replay's own msg id: {id}");
    assert_ne!(id, &before[0].0);
    after
}

#[tokio::test]
async fn a_claim_replay_is_processed_within_the_dedup_window_by_any_claimer_replica() {
    let mut stack = Stack::builder().env("svc-verifier", "PN_DEADLINE_MS", "600000").start().await.unwrap();
    let (op, _) = stuck_in_verify(&stack).await;
    // Served by the replica that claimed it.
    let after = replayed(&stack, "claim", "claimed", &op).await;
    assert_eq!(after[0].1, after[1].1, "the same claim, sealed token included");
    // A second replica with its own, empty state serves it from PN_OPS.
    stack.kill("svc-claimer");
    stack.spawn("svc-claimer#2").unwrap();
    stack.wait_ready("svc-claimer#2").await.unwrap();
    let after = replayed(&stack, "claim", "claimed", &op).await;
    assert_eq!(after.len(), 3);
    assert_eq!(after[0].1, after[2].1);
    assert!(stack.log_tail("svc-claimer#2", 200).contains("PN_OPS"), "served from PN_OPS");
    // The stages downstream stay idempotent: still one instance, one VPS.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(stack.items("/admin/instances").await.unwrap().len(), 1);
    no_secret_leaked(&stack).await;
}

#[tokio::test]
async fn a_cloud_replay_is_processed_within_the_dedup_window() {
    let stack = Stack::builder().env("svc-verifier", "PN_DEADLINE_MS", "600000").start().await.unwrap();
    let (op, _) = stuck_in_verify(&stack).await;
    replayed(&stack, "cloud", "instance", &op).await;
    assert_eq!(stack.items("/admin/instances").await.unwrap().len(), 1, "the replay adopted the VPS");
    no_secret_leaked(&stack).await;
}

#[tokio::test]
async fn a_deploy_replay_is_processed_within_the_dedup_window() {
    let stack = Stack::builder().env("svc-verifier", "PN_DEADLINE_MS", "600000").start().await.unwrap();
    let (op, _) = stuck_in_verify(&stack).await;
    replayed(&stack, "deploy", "deployed", &op).await;
    let inst = stack.items("/admin/instances").await.unwrap();
    assert_eq!(inst.len(), 1, "{inst:?}");
    assert!(inst[0]["upRuns"].as_u64().unwrap_or(0) >= 2, "the replay ran up -d again: {}", inst[0]);
    no_secret_leaked(&stack).await;
}

#[tokio::test]
async fn a_verify_replay_is_processed_within_the_dedup_window() {
    let stack = Stack::builder().start().await.unwrap();
    let (op, _) = stack.intent("de", 100 * GIB, "residential").await.unwrap();
    wait_events(&stack, "verified", &op, 1, Duration::from_secs(120)).await;
    replayed(&stack, "verify", "verified", &op).await;
    no_secret_leaked(&stack).await;
}

/// `pn.replay.meter` is no longer accepted: pnctl refuses the stage, and the server refuses
/// the operator's publish (the meter's ledger is the record; `pnctl ledger` reads it).
#[tokio::test]
async fn a_meter_replay_is_refused() {
    let nats = testkit::Nats::start().unwrap();
    let harness = kit::bus::Bus::connect(&nats.url(), "test", Duration::from_secs(10)).await.unwrap();
    harness.apply_streams_with(1).await.unwrap();
    let op = kit::nats_auth::OPERATOR;
    let client = async_nats::ConnectOptions::new()
        .user_and_password(op.into(), nats.password(op).unwrap())
        .connect(nats.plain_url())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    let r = tokio::time::timeout(Duration::from_secs(5), async { js.publish("pn.replay.meter", "op-1".into()).await?.await }).await;
    assert!(!matches!(r, Ok(Ok(_))), "the server must refuse pn.replay.meter from the operator: {r:?}");
    // The operator still replays the pipeline's stages.
    js.publish("pn.replay.deploy", "op-1".into()).await.unwrap().await.unwrap();
    let out = Command::new(testkit::bin("pnctl").unwrap())
        .args(["--nats-url", &nats.plain_url(), "replay", "meter", "op-1"])
        .env("PN_NATS_USER", op)
        .env("PN_NATS_PASSWORD", nats.password(op).unwrap())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("claim, cloud, deploy, verify"));
}
