//! One trace per operation (issue 20, item 4): one operation through the whole pipeline on real
//! parts, every service exporting its spans over OTLP/HTTP JSON to a small receiver inside
//! this test. The trace id is read back from the services' logs (stdout) and from the exported
//! spans: one id — the operation's — across claimer, cloud, deployer and verifier, on the
//! lines inside the handlers, on the `handle` spans (each continuing the `traceparent` its
//! message carried) and on the Center, SSH and provider calls.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use testkit::stack::Stack;

const GIB: u64 = 1 << 30;
const STAGES: [(&str, &str); 4] = [("svc-claimer", "claim"), ("svc-cloud", "cloud"), ("svc-deployer", "deploy"), ("svc-verifier", "verify")];

/// One exported span, flattened from an OTLP `ExportTraceServiceRequest`.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    attrs: HashMap<String, String>,
}

impl Span {
    /// The consumer loop's span `handle` (kit::bus; it names the subject), not a service's own
    /// `#[instrument]`ed `handle` method inside it.
    fn is_loop_handle(&self) -> bool {
        self.name == "handle" && self.attrs.contains_key("subject")
    }
}

/// An OTLP/HTTP receiver (`POST /v1/traces`, JSON) that keeps what it was sent.
async fn receiver() -> (String, Arc<Mutex<Vec<Value>>>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let keep = got.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::extract::Json<Value>| {
            let keep = keep.clone();
            async move {
                keep.lock().unwrap().push(body.0);
                axum::Json(serde_json::json!({}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, got)
}

fn spans(bodies: &[Value]) -> Vec<Span> {
    let mut out = Vec::new();
    for b in bodies {
        for rs in b["resourceSpans"].as_array().into_iter().flatten() {
            let service = rs["resource"]["attributes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["key"] == "service.name")
                .and_then(|a| a["value"]["stringValue"].as_str())
                .unwrap_or("")
                .to_string();
            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                for s in ss["spans"].as_array().into_iter().flatten() {
                    let attrs = s["attributes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|a| (a["key"].as_str().unwrap_or("").to_string(), a["value"]["stringValue"].as_str().unwrap_or("").to_string()))
                        .collect();
                    out.push(Span {
                        service: service.clone(),
                        trace_id: s["traceId"].as_str().unwrap_or("").to_string(),
                        span_id: s["spanId"].as_str().unwrap_or("").to_string(),
                        parent: s["parentSpanId"].as_str().unwrap_or("").to_string(),
                        name: s["name"].as_str().unwrap_or("").to_string(),
                        attrs,
                    });
                }
            }
        }
    }
    out
}

/// Every span object of a JSON log line: its current `span` and the `spans` list.
fn line_spans(line: &Value) -> Vec<&Value> {
    let mut v: Vec<&Value> = line["spans"].as_array().map(|a| a.iter().collect()).unwrap_or_default();
    if line["span"].is_object() {
        v.push(&line["span"]);
    }
    v
}

#[tokio::test]
async fn one_operation_is_one_trace_across_every_stage_in_logs_and_exported_spans() {
    let (otlp, received) = receiver().await;
    let mut b = Stack::builder();
    for svc in ["svc-claimer", "svc-cloud", "svc-deployer", "svc-verifier", "svc-meter"] {
        b = b.env(svc, "OTEL_EXPORTER_OTLP_ENDPOINT", &otlp);
    }
    let stack = b.start().await.unwrap();
    let (op, _sub) = stack.intent("sg", 100 * GIB, "residential").await.unwrap();
    let v = stack.wait_status(&op, &["done", "failed"], Duration::from_secs(120)).await.unwrap();
    assert_eq!(v["status"], "done", "{v}");
    let trace = kit::trace::TraceId::for_operation(&op).to_string();

    // The exported spans. The last stage: the claimer handling pn.op.verified (after the
    // verifier published it); the exporters post at least every 500 ms.
    let verified = format!("pn.op.verified.{op}");
    let exported = testkit::eventually("the claimer's handling of pn.op.verified exported", Duration::from_secs(90), || async {
        let s = spans(&received.lock().unwrap());
        s.iter()
            .any(|s| s.service == "svc-claimer" && s.is_loop_handle() && s.attrs.get("subject") == Some(&verified) && s.trace_id == trace)
            .then_some(())
    })
    .await;
    exported.unwrap();
    // Let the last batches of every service arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = spans(&received.lock().unwrap());
    let mine: Vec<&Span> = all.iter().filter(|s| s.attrs.get("op").is_some_and(|o| *o == op)).collect();
    assert!(!mine.is_empty(), "no exported span names the operation");
    // Every exported span that names the operation is in its trace.
    for s in &mine {
        assert_eq!(s.trace_id, trace, "{s:?}");
    }
    let in_trace: Vec<&Span> = all.iter().filter(|s| s.trace_id == trace).collect();
    let by_id: HashMap<&str, &Span> = in_trace.iter().map(|s| (s.span_id.as_str(), *s)).collect();
    // Each stage handled the operation in a `handle` span of this trace.
    for (svc, stage) in STAGES {
        let handles: Vec<&&Span> = in_trace.iter().filter(|s| s.service == svc && s.is_loop_handle()).collect();
        if svc != "svc-claimer" {
            assert!(handles.iter().any(|s| s.attrs.get("stage").is_some_and(|x| x == stage)), "{svc}: no handle span of stage {stage}");
            // It continued the traceparent of the message it handled: its parent is a span of
            // the service that published that message, in this same trace.
            assert!(
                handles.iter().any(|h| by_id.get(h.parent.as_str()).is_some_and(|p| p.service != svc)),
                "{svc}: no handle span whose parent is the publisher's span: {handles:?}"
            );
        }
    }
    // The claim itself: the claimer's span `claim` starts the trace, and the claimer's reports
    // (pn.op.instance → in_progress) are handled in it too.
    assert!(in_trace.iter().any(|s| s.service == "svc-claimer" && s.name == "claim"), "no claim span");
    assert!(in_trace.iter().any(|s| s.service == "svc-claimer" && s.is_loop_handle()), "the claimer handled no report in the trace");
    // Center, SSH and provider calls are spans of the trace, under a stage's span.
    let names: BTreeSet<(&str, &str)> = in_trace.iter().map(|s| (s.service.as_str(), s.name.as_str())).collect();
    for want in [
        ("svc-claimer", "center.call"),
        ("svc-cloud", "center.call"),
        ("svc-cloud", "provider.create"),
        ("svc-deployer", "provider.get"),
        ("svc-deployer", "ssh.connect"),
        ("svc-deployer", "ssh.exec"),
        ("svc-verifier", "ssh.exec"),
        ("svc-verifier", "center.call"),
    ] {
        assert!(names.contains(&want), "missing {want:?} in the trace; have {names:?}");
        // Under a span of the same service in the trace (the handler's, or the claim's).
        assert!(
            in_trace.iter().any(|s| (s.service.as_str(), s.name.as_str()) == want
                && by_id.get(s.parent.as_str()).is_some_and(|p| p.service == want.0)),
            "{want:?}: none has a parent span of its service in the trace"
        );
    }
    let claim = in_trace.iter().find(|s| s.name == "center.call" && s.attrs.get("tool").is_some_and(|t| t == "claim_node_operation"));
    assert!(claim.is_some(), "claim_node_operation is not in the trace");

    // The logs (stdout, JSON): every line inside a span of this operation carries its trace id,
    // one id across the four stages, on lines inside the handlers.
    let mut per_service: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for (svc, _) in STAGES {
        let text = std::fs::read_to_string(stack.log_path(svc)).unwrap();
        let (mut lines, mut in_handle) = (0, 0);
        for l in text.lines() {
            let Ok(line) = serde_json::from_str::<Value>(l) else { continue };
            let sp = line_spans(&line);
            if !sp.iter().any(|s| s["op"] == op.as_str()) {
                continue;
            }
            let ids: BTreeSet<&str> = sp.iter().filter_map(|s| s["trace_id"].as_str()).collect();
            assert_eq!(ids, BTreeSet::from([trace.as_str()]), "{svc}: {l}");
            lines += 1;
            if sp.iter().any(|s| s["name"] == "handle" && s["subject"].is_string()) {
                in_handle += 1;
            }
        }
        per_service.insert(svc, (lines, in_handle));
    }
    for (svc, _) in STAGES {
        let (lines, in_handle) = per_service[svc];
        assert!(lines > 0 && in_handle > 0, "{svc}: no log line of the operation inside a handler: {per_service:?}\n{}", stack.log_tail(svc, 8));
    }
    // A line logged inside an exported span kind (Center call) names the trace as its own
    // field: the exported attributes hold no secret either (scanned below with the logs).
    let exported_text = serde_json::to_string(&*received.lock().unwrap()).unwrap();
    let secrets = stack.known_secrets().await.unwrap();
    for (i, s) in secrets.iter().enumerate() {
        assert!(!exported_text.contains(s.as_str()), "secret #{i} in an exported span");
    }
    assert_eq!(stack.secret_findings().await.unwrap(), Vec::<String>::new());
}
