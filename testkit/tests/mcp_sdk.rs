//! Interoperability with the official MCP Python SDK (PyPI `mcp`, installed into `.tools/venv`
//! by `scripts/bootstrap`), the implementation a real Center is most likely built on:
//! Pnp's Center client against the SDK's server (canned answers, tools that fail the SDK way),
//! and the SDK's client against center-sim.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kit::center::{Center, CenterError, ClientConfig, McpCenter, OpFilter};
use secrecy::SecretString;
use serde_json::{Value, json};
use testkit::stack::Stack;

fn python() -> PathBuf {
    let p = testkit::workspace_root().join(".tools/venv/bin/python");
    assert!(p.exists(), "{} missing: run scripts/bootstrap", p.display());
    let ok = Command::new(&p).args(["-c", "import mcp.server.mcpserver"]).status().unwrap().success();
    assert!(ok, "the MCP SDK (PyPI mcp) is not installed in .tools/venv: run scripts/bootstrap");
    p
}

fn script(name: &str) -> PathBuf {
    testkit::workspace_root().join("testkit/mcp").join(name)
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_client_speaks_to_the_sdk_server_and_keeps_its_errors() {
    let py = python();
    let port = testkit::free_port();
    let child = Command::new(&py).arg(script("sdk_center.py")).arg(port.to_string()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let _guard = Kill(child);
    testkit::wait_tcp(format!("127.0.0.1:{port}").parse().unwrap(), Duration::from_secs(30)).unwrap();
    let mut cfg = ClientConfig::new(&format!("http://127.0.0.1:{port}"), Duration::from_secs(10));
    cfg.attempts = 2;
    let center = McpCenter::new(cfg, SecretString::from("sdk-token-0123456789".to_string())).unwrap();

    // The normal path, through a session, over SSE answers; the SDK server 400s any in-session
    // request without MCP-Protocol-Version, so this also proves the header is sent.
    let f = OpFilter { action: Some("provision".into()), status: Some("queued".into()), id: None };
    let ops = center.list_node_operations(&f).await.unwrap();
    assert_eq!(ops.iter().map(|o| o.id.as_str()).collect::<Vec<_>>(), ["op-1", "op-2", "op-3"]);
    assert_eq!(ops[0].params.region, "sg");
    let one = center.list_node_operations(&OpFilter { id: Some("op-2".into()), ..f.clone() }).await.unwrap();
    assert_eq!(one.len(), 1);

    // A refused lease renewal, raised as ToolError: a conflict with its message, not "malformed".
    match center.update_node_operation("op-1", "h", "in_progress", None, None).await {
        Err(CenterError::Conflict { msg, .. }) => assert!(msg.contains("held by another holder"), "{msg}"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    match center.update_node_operation("op-1", "h", "done", None, None).await {
        Err(CenterError::Rejected { msg, .. }) => assert!(msg.contains("invalid status"), "{msg}"),
        other => panic!("expected a rejection, got {other:?}"),
    }
    // A transient error is retried (attempts = 2) and comes back transient with its message.
    match center.list_nodes(Some("pn-x")).await {
        Err(e @ CenterError::Transient { .. }) => assert!(e.to_string().contains("temporarily unavailable"), "{e}"),
        other => panic!("expected a transient error, got {other:?}"),
    }
    // An unexpected exception the SDK masks: permanent (never retried forever), with what it said.
    match center.get_cloud_instance("i-1").await {
        Err(CenterError::Permanent { msg, .. }) => assert!(msg.contains("Error executing tool get_cloud_instance"), "{msg}"),
        other => panic!("expected a permanent error, got {other:?}"),
    }

    // A restarted server forgets the session (404): the client starts a new one and goes on.
    drop(_guard);
    let child = Command::new(&py).arg(script("sdk_center.py")).arg(port.to_string()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let _guard = Kill(child);
    testkit::wait_tcp(format!("127.0.0.1:{port}").parse().unwrap(), Duration::from_secs(30)).unwrap();
    let again = testkit::eventually("a new session after the server restarted", Duration::from_secs(30), || async {
        center.list_node_operations(&f).await.ok()
    })
    .await
    .unwrap();
    assert_eq!(again.len(), 3);
}

#[tokio::test]
async fn the_sdk_client_speaks_to_center_sim() {
    let py = python();
    let stack = Stack::builder().only(&[]).start().await.unwrap();
    let (op, _) = stack.intent("sg", 1 << 30, "residential").await.unwrap();
    let out = Command::new(&py)
        .arg(script("sdk_client.py"))
        .arg(&stack.center_url)
        .env("PN_CENTER_TOKEN", &stack.token)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text} / {}", String::from_utf8_lossy(&out.stderr)));
    assert!(out.status.success() && v["error"].is_null(), "{v}");
    assert!(!text.contains(&stack.token), "the token was printed");
    assert_eq!(v["queued"], json!([op]), "{v}");
    let tools = v["tools"].as_object().unwrap();
    for t in ["list_node_operations", "claim_node_operation", "update_node_operation", "list_cloud_instances", "create_cloud_instance", "list_nodes"] {
        assert!(tools.contains_key(t), "{t} not listed: {v}");
    }
    // Real input schemas: the runbook's argument names, with what is required.
    assert_eq!(tools["claim_node_operation"]["required"], json!(["id", "holder"]), "{v}");
    assert!(tools["create_cloud_instance"]["properties"]["image_id"].is_object(), "{v}");
    assert!(tools["list_node_operations"]["properties"]["pageSize"].is_object(), "{v}");
    // Center-sim answers with a protocol version it implements.
    let version = v["protocolVersion"].as_str().unwrap_or("");
    assert!(kit::center::PROTOCOL_VERSIONS.contains(&version), "negotiated {version:?}");
}
