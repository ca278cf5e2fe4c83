//! Issue #18's rule on the ops listeners: the two mutating operator routes — svc-claimer's
//! `POST /v1/ops/<op>/abandon` and svc-cloud's `POST /v1/reap/<op>/confirm` — need the
//! operator token (`PN_OPS_TOKEN`, `Authorization: Bearer …`); without it (or with a wrong one)
//! they answer 401 and nothing happens, the read-only GETs stay open, and the token is never
//! logged. Real nats-server, center-sim, the service binaries and the real `pnctl`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use testkit::stack::Stack;

const GIB: u64 = 1 << 30;

fn ops_url(stack: &Stack, svc: &str) -> String {
    format!("http://{}", stack.procs[svc].name)
}

async fn instance_of(stack: &Stack, sub: &str) -> Option<Value> {
    let inst = stack.items("/admin/instances").await.ok()?;
    inst.into_iter().rev().find(|i| i["name"] == format!("pn-{sub}"))
}

/// Runs the real `pnctl` with `env`: (success, stdout, stderr).
async fn pnctl(args: Vec<String>, env: Vec<(&'static str, String)>) -> (bool, String, String) {
    tokio::task::spawn_blocking(move || {
        let out = Command::new(testkit::bin("pnctl").unwrap()).args(&args).env_remove("RUST_LOG").env_remove("PN_OPS_TOKEN").envs(env).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
    })
    .await
    .unwrap()
}

/// Whether `pn.op.deployed.<op>` is in PN_OPS.
async fn deployed(stack: &Stack, op: &str) -> bool {
    let subject = proto::subjects::op_event("deployed", op);
    let Ok(bus) = kit::bus::Bus::connect(&stack.nats.url(), "test", Duration::from_secs(10)).await else { return false };
    let Ok(mut s) = bus.js.get_stream(proto::subjects::OPS_STREAM).await else { return false };
    let Ok(info) = s.info().await else { return false };
    let (first, last) = (info.state.first_sequence.max(1), info.state.last_sequence);
    for seq in first..=last {
        if let Ok(m) = s.get_raw_message(seq).await
            && m.subject.as_str() == subject
        {
            return true;
        }
    }
    false
}

/// POSTs `path` on `base` with `auth` as the Authorization header (if any): (status, body).
async fn post(base: &str, path: &str, auth: Option<String>, body: Value) -> (u16, String) {
    let mut r = reqwest::Client::new().post(format!("{base}{path}")).json(&body).timeout(Duration::from_secs(120));
    if let Some(a) = auth {
        r = r.header("Authorization", a);
    }
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn abandon_and_reap_confirm_need_the_operator_token() {
    let stack = Stack::builder()
        .env("svc-verifier", "PN_DEADLINE_MS", "600000")
        .env("svc-cloud", "PN_REAP_GRACE_MS", "8000")
        // The re-check would delete the kept VPS by itself once Center answers; the operator does.
        .env("svc-cloud", "PN_REAP_RECHECK_MS", "600000")
        .start()
        .await
        .unwrap();
    let claimer = ops_url(&stack, "svc-claimer");
    let cloud = ops_url(&stack, "svc-cloud");
    let wrong = format!("{}0", &stack.ops_token[1..]);
    let bad_auths = || {
        vec![
            None,
            Some(format!("Bearer {wrong}")),
            Some(format!("Bearer {}", &stack.ops_token[..stack.ops_token.len() - 1])),
            Some(stack.ops_token.clone()),
            Some(format!("Basic {}", stack.ops_token)),
        ]
    };

    // An operation whose node never registers: held by the verifier, in flight at Center.
    stack.faults(json!({"neverRegister": true})).await.unwrap();
    let (op, sub) = stack.intent("jp", 200 * GIB, "residential").await.unwrap();
    testkit::eventually("the node deployed", Duration::from_secs(120), || async { deployed(&stack, &op).await.then_some(()) }).await.unwrap();
    assert_eq!(instance_of(&stack, &sub).await.unwrap()["status"], "running");

    // Abandon without the token: 401, and the operation is not failed.
    for auth in bad_auths() {
        let (status, body) = post(&claimer, &format!("/v1/ops/{op}/abandon"), auth.clone(), json!({"reason": "no token"})).await;
        assert_eq!(status, 401, "{auth:?}: {body}");
        assert!(body.contains("operator token") && !body.contains(&stack.ops_token), "{body}");
    }
    let (ok, out, err) = pnctl(
        vec!["--data-dir".into(), stack.dir.path().join("no-stack").display().to_string(), "ops".into(), "abandon".into(), op.clone(), "--reason".into(), "x".into(), "--claimer-url".into(), claimer.clone()],
        vec![],
    )
    .await;
    assert!(!ok && err.contains("operator token"), "{out} {err}");
    // The read-only routes stay open.
    for url in [format!("{claimer}/v1/ops/held"), format!("{claimer}/readyz"), format!("{cloud}/v1/reap/pending"), format!("{cloud}/metrics")] {
        let r = reqwest::get(&url).await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{url}");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let o = stack.operation(&op).await.unwrap();
    assert_ne!(o["status"], "failed", "a refused abandon must change nothing: {o}");
    assert_eq!(instance_of(&stack, &sub).await.unwrap()["status"], "running");

    // With the token (pnctl reads PN_OPS_TOKEN): abandoned, failed at Center.
    let (ok, out, err) = pnctl(
        vec![
            "--data-dir".into(),
            stack.dir.path().join("no-stack").display().to_string(),
            "ops".into(),
            "abandon".into(),
            op.clone(),
            "--reason".into(),
            "operator token test".into(),
            "--claimer-url".into(),
            claimer.clone(),
            "--json".into(),
        ],
        vec![("PN_OPS_TOKEN", stack.ops_token.clone())],
    )
    .await;
    assert!(ok, "{out} {err}");
    let a: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!((a["decision"].as_str(), a["center"].as_str()), (Some("abandoned"), Some("failed")), "{a}");
    // Center goes down before the reap grace ends: the reaper cannot prove the VPS dead and
    // keeps it for an operator.
    stack.faults(json!({"centerErrorRate": 1.0})).await.unwrap();
    testkit::eventually("the reap pending", Duration::from_secs(90), || async {
        let p: Value = reqwest::get(format!("{cloud}/v1/reap/pending")).await.ok()?.json().await.ok()?;
        p.as_array()?.iter().any(|i| i["operationId"] == op.as_str()).then_some(())
    })
    .await
    .unwrap();
    stack.faults(json!({"centerErrorRate": 0.0})).await.unwrap();

    // Confirm without the token: 401, the VPS stays.
    for auth in bad_auths() {
        let (status, body) = post(&cloud, &format!("/v1/reap/{op}/confirm"), auth.clone(), json!({})).await;
        assert_eq!(status, 401, "{auth:?}: {body}");
        assert!(!body.contains(&stack.ops_token), "{body}");
    }
    let (ok, out, err) = pnctl(vec!["--data-dir".into(), stack.dir.path().join("no-stack").display().to_string(), "reap".into(), "--confirm".into(), op.clone(), "--cloud-url".into(), cloud.clone()], vec![]).await;
    assert!(!ok && err.contains("operator token"), "{out} {err}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(instance_of(&stack, &sub).await.unwrap()["status"], "running", "a refused confirm must delete nothing");
    let p: Value = reqwest::get(format!("{cloud}/v1/reap/pending")).await.unwrap().json().await.unwrap();
    assert!(p.as_array().unwrap().iter().any(|i| i["operationId"] == op.as_str()), "still pending: {p}");

    // With the token from the stack's secrets (what `pnctl up` writes): deleted.
    let data = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(data.path().join("secrets")).unwrap();
    std::fs::copy(stack.dir.path().join("secrets/ops-token"), data.path().join("secrets/ops-token")).unwrap();
    let (ok, out, err) = pnctl(
        vec!["--data-dir".into(), data.path().display().to_string(), "reap".into(), "--confirm".into(), op.clone(), "--cloud-url".into(), cloud.clone(), "--json".into()],
        vec![],
    )
    .await;
    assert!(ok, "{out} {err}");
    let o: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(o["decision"], "deleted", "{o}");
    assert_eq!(instance_of(&stack, &sub).await.unwrap()["status"], "deleted");

    // The refusals were logged, the token (and the wrong one) never.
    let logs = stack.all_logs();
    assert!(logs.contains("missing or wrong operator token"), "the refusals are logged");
    assert!(!logs.contains(&wrong), "a presented token is never logged");
    let f = stack.secret_findings().await.unwrap();
    assert!(f.is_empty(), "secrets leaked: {f:?}");
}

/// A service without `PN_OPS_TOKEN` keeps its mutating routes shut (403), never open.
#[tokio::test]
async fn without_an_operator_token_the_mutating_routes_are_shut() {
    let stack = Stack::builder().only(&["svc-claimer", "svc-cloud"]).env("svc-cloud", "PN_OPS_TOKEN", "").env("svc-claimer", "PN_OPS_TOKEN", "").start().await.unwrap();
    for (svc, path) in [("svc-claimer", "/v1/ops/op-x/abandon"), ("svc-cloud", "/v1/reap/op-x/confirm")] {
        for auth in [None, Some(format!("Bearer {}", stack.ops_token))] {
            let (status, body) = post(&ops_url(&stack, svc), path, auth, json!({"reason": "r"})).await;
            assert_eq!(status, 403, "{svc}: {body}");
            assert!(body.contains("operator token not configured"), "{svc}: {body}");
        }
        let r = reqwest::get(format!("{}/readyz", ops_url(&stack, svc))).await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{svc}");
    }
    let f = stack.secret_findings().await.unwrap();
    assert!(f.is_empty(), "secrets leaked: {f:?}");
}
