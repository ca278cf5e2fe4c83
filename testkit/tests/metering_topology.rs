//! Metering in production's topology (issue #17), on real parts: the nodes' sidecars post to
//! Center's host (`pn-ingress`, the dev stack's Traefik), Center (center-sim) answers and keeps
//! its own ledger, and the router copies every `POST /slave/usage` to the real svc-meter.
//!
//! - Center's ledger advances while the meter is stopped (SIGSTOP) and while it is dead
//!   (SIGKILL); the meter catches up with the node's next report.
//! - Parity: after traffic, a reboot, a meter restart and a Center outage, Center's
//!   `trafficUsedBytes` and the meter's `usedBytes` agree within one report per node.
//! - The router mirrors only `POST /slave/usage`, headers and body unchanged, and never waits
//!   for the mirror (a hung mirror, a full queue).
//! - Center's own ledger and its own cut-off (≥ 95 %: node hidden, device auth 402) with no
//!   meter at all.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kit::center::{Center, ClientConfig, McpCenter};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use testkit::stack::Stack;
use testkit::{Proc, eventually, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const GIB: u64 = 1 << 30;
const PATIENCE: Duration = Duration::from_secs(60);
/// The most one report can carry without injected traffic: the sim's sidecar adds 0.5–8 KB of
/// background chatter each way per report. "Within one report" is within this.
const ONE_REPORT: u64 = 16_000;

// ---------- helpers ----------

fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap()
}

fn signal(pid: u32, sig: Signal) {
    kill(Pid::from_raw(pid as i32), sig).unwrap();
}

/// Center's view of every registered node (`GET /admin/nodes`), by name.
async fn center_nodes(stack: &Stack) -> BTreeMap<String, Value> {
    stack.items("/admin/nodes").await.unwrap().into_iter().map(|n| (n["name"].as_str().unwrap_or("").to_string(), n)).collect()
}

async fn center_used(stack: &Stack, node: &str) -> u64 {
    center_nodes(stack).await.get(node).and_then(|n| n["trafficUsedBytes"].as_u64()).unwrap_or(0)
}

/// The meter's ledger of `node` (`usedBytes`), when the meter answers.
async fn meter_used(stack: &Stack, node: &str) -> Option<u64> {
    let r = stack.meter_internal(reqwest::Method::GET, &format!("/v1/nodes/{node}/usage")).timeout(Duration::from_secs(2)).send().await.ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.json::<Value>().await.ok()?["usedBytes"].as_u64()
}

async fn traffic(stack: &Stack, node: &str, bytes: u64) {
    stack.admin_send(reqwest::Method::POST, &format!("/admin/nodes/{node}/traffic"), json!({"bytes": bytes})).await.unwrap();
}

/// Queues `n` intents and waits until every node is registered at Center and known to the
/// meter with a report past its baseline; returns the node names.
async fn provision(stack: &Stack, n: usize) -> Vec<String> {
    let mut ops = Vec::new();
    for i in 0..n {
        ops.push(stack.intent(["sg", "jp", "de"][i % 3], 500 * GIB, "residential").await.unwrap());
    }
    let mut names = Vec::new();
    for (op, sub) in &ops {
        let v = stack.wait_status(op, &["done", "failed"], Duration::from_secs(120)).await.unwrap();
        assert_eq!(v["status"], "done", "operation {op}: {v}");
        names.push(format!("pn-{sub}"));
    }
    for name in &names {
        eventually(&format!("{name} metered"), PATIENCE, || async { meter_used(stack, name).await.filter(|u| *u > 0) }).await.unwrap();
    }
    names
}

/// Waits until Center's and the meter's ledgers agree within one report for every node;
/// returns `(center, meter)` per node at that moment.
async fn parity(stack: &Stack, nodes: &[String], what: &str) -> Vec<(u64, u64)> {
    parity_from(stack, nodes, what, &[]).await
}

/// [`parity`] once Center's ledger of node `i` holds at least `center_min[i]` (the traffic just
/// pushed has been reported), so that an agreement on the values before it does not count.
async fn parity_from(stack: &Stack, nodes: &[String], what: &str, center_min: &[u64]) -> Vec<(u64, u64)> {
    let last: Mutex<Vec<(u64, u64)>> = Mutex::default();
    let r = eventually(&format!("parity {what}"), PATIENCE, || async {
        let mut v = Vec::new();
        for n in nodes {
            // The meter first, then Center: reports keep coming, and a reading that straddles
            // one is off by that one report at most.
            let m = meter_used(stack, n).await?;
            let c = center_used(stack, n).await;
            v.push((c, m));
        }
        *last.lock().unwrap() = v.clone();
        let reached = v.iter().zip(center_min).all(|((c, _), min)| c >= min);
        (reached && v.iter().all(|(c, m)| c.abs_diff(*m) <= ONE_REPORT)).then_some(v)
    })
    .await;
    r.unwrap_or_else(|e| panic!("{e}: last (center, meter) per node {:?}", last.lock().unwrap()))
}

/// Waits until Center's ledger of every node reached `want[i]`.
async fn center_reaches(stack: &Stack, nodes: &[String], want: &[u64], what: &str) {
    eventually(what, PATIENCE, || async {
        let all = center_nodes(stack).await;
        nodes.iter().zip(want).all(|(n, w)| all.get(n).and_then(|v| v["trafficUsedBytes"].as_u64()).unwrap_or(0) >= *w).then_some(())
    })
    .await
    .unwrap();
}

async fn all_center_used(stack: &Stack, nodes: &[String]) -> Vec<u64> {
    let all = center_nodes(stack).await;
    nodes.iter().map(|n| all.get(n).and_then(|v| v["trafficUsedBytes"].as_u64()).unwrap_or(0)).collect()
}

async fn usage_reports(stack: &Stack, nodes: &[String]) -> u64 {
    let all = center_nodes(stack).await;
    nodes.iter().filter_map(|n| all.get(n).and_then(|v| v["usageReports"].as_u64())).sum()
}

// ---------- the meter out of Center's path ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn centers_ledger_advances_with_the_meter_stopped_or_killed_and_the_meter_catches_up() {
    let mut stack = Stack::builder().start().await.unwrap();
    stack.faults(json!({"usageIntervalMs": 300})).await.unwrap();
    let nodes = provision(&stack, 2).await;
    parity(&stack, &nodes, "before anything").await;

    // 1. The meter stopped (SIGSTOP: its socket accepts, nothing answers).
    let pid = stack.pid("svc-meter").unwrap();
    signal(pid, Signal::SIGSTOP);
    let before = all_center_used(&stack, &nodes).await;
    let reports_before = usage_reports(&stack, &nodes).await;
    for n in &nodes {
        traffic(&stack, n, 3_000_000).await;
    }
    let want: Vec<u64> = before.iter().map(|b| b + 3_000_000).collect();
    center_reaches(&stack, &nodes, &want, "Center records the traffic while the meter is stopped").await;
    // …and keeps answering the nodes (each answered report is counted at Center).
    eventually("Center answers reports while the meter is stopped", PATIENCE, || async {
        (usage_reports(&stack, &nodes).await >= reports_before + 10).then_some(())
    })
    .await
    .unwrap();
    let stats = stack.ingress_stats().await.unwrap();
    assert!(stats["mirrorQueued"].as_u64().unwrap() > 0, "{stats}");
    let meter_while_stopped = {
        signal(pid, Signal::SIGCONT);
        // 2. Continued: the copies queued meanwhile land, and the next reports carry the rest.
        parity_from(&stack, &nodes, "after the meter was stopped", &want).await
    };
    for ((_, m), w) in meter_while_stopped.iter().zip(&want) {
        assert!(*m + ONE_REPORT >= *w, "the meter caught up: {m} vs Center's {w}");
    }

    // 3. The meter killed: refused copies, Center unaffected.
    let failed_before = stack.ingress_stats().await.unwrap()["mirrorFailed"].as_u64().unwrap();
    let meter_before: Vec<u64> = {
        let mut v = Vec::new();
        for n in &nodes {
            v.push(meter_used(&stack, n).await.unwrap());
        }
        v
    };
    stack.kill("svc-meter");
    let before = all_center_used(&stack, &nodes).await;
    for n in &nodes {
        traffic(&stack, n, 2_000_000).await;
    }
    let want: Vec<u64> = before.iter().map(|b| b + 2_000_000).collect();
    center_reaches(&stack, &nodes, &want, "Center records the traffic while the meter is dead").await;
    eventually("copies to the dead meter fail", PATIENCE, || async {
        (stack.ingress_stats().await.ok()?["mirrorFailed"].as_u64()? > failed_before).then_some(())
    })
    .await
    .unwrap();

    // 4. Back: its ledger (durable) catches up with the next report of each node.
    stack.restart("svc-meter").await.unwrap();
    let after = parity_from(&stack, &nodes, "after the meter was killed and restarted", &want).await;
    for (((_, m), b), w) in after.iter().zip(&meter_before).zip(&want) {
        assert!(*m >= b + 2_000_000, "the restarted meter counted the traffic of its downtime: {m} (was {b})");
        assert!(*m + ONE_REPORT >= *w, "…all of it: {m} vs Center's {w}");
    }
    let findings = stack.secret_findings().await.unwrap();
    assert!(findings.is_empty(), "secrets found: {findings:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn center_and_meter_agree_after_traffic_a_reboot_a_meter_restart_and_a_center_outage() {
    let mut stack = Stack::builder().start().await.unwrap();
    stack.faults(json!({"usageIntervalMs": 300})).await.unwrap();
    let nodes = provision(&stack, 2).await;

    // Traffic.
    let before = all_center_used(&stack, &nodes).await;
    let mut want = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        traffic(&stack, n, 5_000_000 + i as u64 * 1_000_000).await;
        want.push(before[i] + 5_000_000 + i as u64 * 1_000_000);
    }
    let p = parity_from(&stack, &nodes, "after traffic", &want).await;
    assert!(p.iter().all(|(c, _)| *c >= 5_000_000), "{p:?}");

    // A reboot: counters from 0, a new boot id: a new epoch in both ledgers.
    let (c0, _) = p[0];
    stack.admin_send(reqwest::Method::POST, &format!("/admin/nodes/{}/reboot", nodes[0]), json!({})).await.unwrap();
    eventually("re-registration after the reboot", PATIENCE, || async {
        (center_nodes(&stack).await.get(&nodes[0])?["registrations"].as_u64()? >= 2).then_some(())
    })
    .await
    .unwrap();
    traffic(&stack, &nodes[0], 1_500_000).await;
    let p = parity_from(&stack, &nodes, "after a reboot", &[c0 + 1_500_000]).await;
    assert!(p[0].0 >= c0 + 1_500_000, "the new epoch counts from 0 and adds up: {p:?} (was {c0})");

    // A meter restart (SIGKILL, traffic meanwhile, start again on its ledger).
    stack.kill("svc-meter");
    let want: Vec<u64> = all_center_used(&stack, &nodes).await.iter().map(|c| c + 2_500_000).collect();
    for n in &nodes {
        traffic(&stack, n, 2_500_000).await;
    }
    center_reaches(&stack, &nodes, &want, "Center records the traffic while the meter is down").await;
    stack.restart("svc-meter").await.unwrap();
    let before_restart = p.clone();
    let p = parity_from(&stack, &nodes, "after a meter restart", &want).await;
    for ((_, m), (_, m0)) in p.iter().zip(&before_restart) {
        assert!(*m >= m0 + 2_500_000, "the meter caught up with the next report: {m} (was {m0})");
    }

    // A short Center outage (its node ingress answers 503): the copies still reach the meter,
    // Center records nothing; then the node's next report brings Center up to date.
    stack.faults(json!({"slaveErrorRate": 1.0})).await.unwrap();
    let c_before = all_center_used(&stack, &nodes).await;
    let mut m_before = Vec::new();
    for n in &nodes {
        m_before.push(meter_used(&stack, n).await.unwrap());
        traffic(&stack, n, 4_000_000).await;
    }
    eventually("the meter records during Center's outage", PATIENCE, || async {
        for (n, m0) in nodes.iter().zip(&m_before) {
            if meter_used(&stack, n).await? < m0 + 4_000_000 {
                return None;
            }
        }
        Some(())
    })
    .await
    .unwrap();
    assert_eq!(all_center_used(&stack, &nodes).await, c_before, "Center recorded nothing while down");
    stack.faults(json!({"slaveErrorRate": 0.0})).await.unwrap();
    let want: Vec<u64> = c_before.iter().map(|c| c + 4_000_000).collect();
    let p = parity_from(&stack, &nodes, "after a Center outage", &want).await;
    for ((c, _), c0) in p.iter().zip(&c_before) {
        assert!(*c >= c0 + 4_000_000, "Center caught up with the next report: {c} (was {c0})");
    }

    // The whole run: every byte pushed is in both ledgers, within one report of each other.
    let nic: Vec<u64> = {
        let inst = stack.items("/admin/instances").await.unwrap();
        nodes.iter().map(|n| inst.iter().find(|i| i["name"] == n.as_str() && i["status"] != "deleted").unwrap()["trafficUsedBytes"].as_u64().unwrap()).collect()
    };
    for ((c, m), i) in p.iter().zip(&nic) {
        assert!(c.abs_diff(*m) <= ONE_REPORT, "{c} vs {m}");
        assert!(i.abs_diff(*c) <= ONE_REPORT, "get_cloud_instance's trafficUsedBytes is Center's ledger: {i} vs {c}");
    }
    let findings = stack.secret_findings().await.unwrap();
    assert!(findings.is_empty(), "secrets found: {findings:?}");
}

// ---------- the router ----------

/// One request a capture server saw.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    target: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

/// A plain HTTP/1.1 server recording every request (keep-alive), answering 200 `ok` — or,
/// with `hang`, reading requests and never answering.
async fn capture(hang: bool) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let s2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = l.accept().await else { return };
            let seen = s2.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    // Head.
                    let end = loop {
                        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break p;
                        }
                        let mut chunk = [0u8; 4096];
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    buf.drain(..end + 4);
                    let mut lines = head.split("\r\n");
                    let first: Vec<&str> = lines.next().unwrap_or("").split(' ').collect();
                    let headers: BTreeMap<String, String> = lines
                        .filter_map(|l| l.split_once(':'))
                        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                        .collect();
                    let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
                    while buf.len() < len {
                        let mut chunk = [0u8; 4096];
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body: Vec<u8> = buf.drain(..len).collect();
                    seen.lock().unwrap().push(Seen {
                        method: first.first().unwrap_or(&"").to_string(),
                        target: first.get(1).unwrap_or(&"").to_string(),
                        headers,
                        body,
                    });
                    if hang {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        return;
                    }
                    if sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, seen)
}

/// A `pn-ingress` started by the test.
struct Router {
    _proc: Proc,
    _out: BufReader<ChildStdout>,
    url: String,
}

fn router(upstream: &str, mirror: &str, extra: &[&str]) -> Router {
    let port = free_port();
    let mut child = Command::new(testkit::bin("pn-ingress").unwrap())
        .args(["--listen", &format!("127.0.0.1:{port}"), "--upstream", upstream, "--mirror", mirror])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let url = format!("http://127.0.0.1:{port}");
    assert_eq!(line.trim(), format!("pn-ingress listening on {url}"));
    Router { _proc: Proc { child, name: "pn-ingress".into() }, _out: out, url }
}

async fn stats(url: &str) -> Value {
    http().get(format!("{url}/_pn_ingress/stats")).send().await.unwrap().json().await.unwrap()
}

/// `Basic base64(ip:secret)`, as reqwest (and the sim's sidecar) writes it.
fn basic(ip: &str, secret: &str) -> String {
    let req = reqwest::Client::new().get("http://127.0.0.1/").basic_auth(ip, Some(secret)).build().unwrap();
    req.headers()["authorization"].to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_mirrors_only_slave_usage_unchanged_and_never_waits_for_the_mirror() {
    let stack = Stack::builder().only(&[]).start().await.unwrap();
    let (mirror_url, seen) = capture(false).await;
    // The capture speaks HTTP/1.1 only (it reads the copy's bytes); the router's default to the
    // meter is h2c, the same copy framed differently.
    let r = router(&stack.center_url, &mirror_url, &["--mirror-protocol", "http1"]);
    let h = http();
    let secret = testkit::rand_hex(32);
    let auth = basic("10.77.0.9", &secret);

    // Registration goes to Center only (its answer comes back), not to the mirror.
    let res = h
        .post(format!("{}/slave/register", r.url))
        .header("authorization", &auth)
        .json(&json!({"name": "pn-router-probe", "region": "sg"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap()["data"]["node"]["name"], "pn-router-probe");

    // A report: Center's answer to the node, a byte-identical copy to the mirror.
    let body = br#"{"rxBytes": 1000, "txBytes": 2000, "bootId": "b-1", "at": "2026-01-01T00:00:00Z"}"#.to_vec();
    let res = h
        .post(format!("{}/slave/usage", r.url))
        .header("authorization", &auth)
        .header("content-type", "application/json")
        .header("x-probe", "kept")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let answer: Value = res.json().await.unwrap();
    assert_eq!(answer["data"]["usage"]["outcome"], "baseline", "Center's own answer: {answer}");
    let copies = eventually("the copy", PATIENCE, || async {
        let s = seen.lock().unwrap().clone();
        (!s.is_empty()).then_some(s)
    })
    .await
    .unwrap();
    assert_eq!(copies.len(), 1, "{copies:?}");
    let c = &copies[0];
    assert_eq!((c.method.as_str(), c.target.as_str()), ("POST", "/slave/usage"));
    assert_eq!(c.headers.get("authorization"), Some(&auth), "Authorization reaches the meter unchanged");
    assert_eq!(c.headers.get("x-probe").map(String::as_str), Some("kept"));
    assert_eq!(c.headers.get("x-forwarded-for").map(String::as_str), Some("127.0.0.1"), "the node's address, as from Traefik");
    assert_eq!(c.body, body, "the body reaches the meter unchanged");

    // A query string does not change the path: still mirrored, with it.
    let res = h.post(format!("{}/slave/usage?probe=1", r.url)).header("authorization", &auth).body(body.clone()).send().await.unwrap();
    assert_eq!(res.status(), 200);
    eventually("the second copy", PATIENCE, || async { (seen.lock().unwrap().len() == 2).then_some(()) }).await.unwrap();
    assert_eq!(seen.lock().unwrap()[1].target, "/slave/usage?probe=1");

    // Everything else reaches Center only, with Center's own status.
    let direct = |path: &str| format!("{}{path}", stack.center_url);
    let via = |path: &str| format!("{}{path}", r.url);
    for (method, path) in [
        (reqwest::Method::GET, "/slave/usage"),
        (reqwest::Method::PUT, "/slave/usage"),
        (reqwest::Method::POST, "/slave/usage/more"),
        (reqwest::Method::POST, "/slave/usagex"),
        (reqwest::Method::POST, "/slave/register"),
        (reqwest::Method::POST, "/api/device-auth"),
        (reqwest::Method::POST, "/mcp"),
        (reqwest::Method::GET, "/admin/nodes"),
        (reqwest::Method::GET, "/healthz"),
        (reqwest::Method::GET, "/nowhere"),
    ] {
        let a = h.request(method.clone(), direct(path)).header("authorization", &auth).body(body.clone()).send().await.unwrap();
        let b = h.request(method.clone(), via(path)).header("authorization", &auth).body(body.clone()).send().await.unwrap();
        assert_eq!(a.status(), b.status(), "{method} {path}: the router answers what Center answers");
        let (ta, tb) = (a.text().await.unwrap(), b.text().await.unwrap());
        if path == "/admin/nodes" || path == "/healthz" {
            assert_eq!(ta, tb, "{path}: Center's body");
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let paths: Vec<String> = seen.lock().unwrap().iter().map(|s| format!("{} {}", s.method, s.target)).collect();
    assert_eq!(paths, vec!["POST /slave/usage", "POST /slave/usage?probe=1"], "only POST /slave/usage is mirrored");
    let st = stats(&r.url).await;
    assert_eq!(st["mirrorQueued"], 2, "{st}");
    assert_eq!(st["mirrorOk"], 2, "{st}");
    assert!(st["forwarded"].as_u64().unwrap() >= 13, "{st}");

    // A mirror that never answers, one worker, a queue of one: every report is still answered
    // by Center (a client waiting on the mirror would time out: 20 s against a 10-minute
    // mirror timeout), the copies beyond the queue are dropped and counted.
    let (hung_url, hung_seen) = capture(true).await;
    let hr = router(&stack.center_url, &hung_url, &["--mirror-protocol", "http1", "--mirror-concurrency", "1", "--mirror-queue", "1", "--mirror-timeout-ms", "600000"]);
    for i in 0..6u64 {
        let b = format!(r#"{{"rxBytes": {}, "txBytes": 2000, "bootId": "b-1", "at": "2026-01-01T00:00:0{i}Z"}}"#, 2000 + i);
        let res = h.post(format!("{}/slave/usage", hr.url)).header("authorization", &auth).body(b).send().await.unwrap();
        assert_eq!(res.status(), 200, "report {i}: Center answers whatever the mirror does");
    }
    let st = stats(&hr.url).await;
    assert_eq!(st["mirrorQueued"].as_u64().unwrap() + st["mirrorDropped"].as_u64().unwrap(), 6, "{st}");
    assert!(st["mirrorDropped"].as_u64().unwrap() >= 4, "one in flight, one queued, the rest dropped: {st}");
    assert_eq!(st["mirrorOk"], 0, "{st}");
    eventually("the hung mirror got the first copy", PATIENCE, || async { (!hung_seen.lock().unwrap().is_empty()).then_some(()) }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hung_seen.lock().unwrap().len(), 1, "the one worker is stuck on the first copy");
    // Center recorded every one of them.
    let n = &center_nodes(&stack).await["pn-router-probe"];
    assert_eq!(n["usageReports"], 2 + 6, "{n}");

    // The stack's own router mirrors to a meter that is not running (only(&[])): refused
    // copies are counted, Center's answers are unaffected.
    let res = h.post(format!("{}/slave/usage", stack.ingress_url)).header("authorization", &auth).body(body.clone()).send().await.unwrap();
    assert_eq!(res.status(), 200);
    eventually("a refused copy is counted", PATIENCE, || async {
        (stack.ingress_stats().await.ok()?["mirrorFailed"].as_u64()? >= 1).then_some(())
    })
    .await
    .unwrap();
}

// ---------- Center's own ledger ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn center_keeps_its_own_ledger_and_cuts_the_node_off_at_95_percent_with_no_meter() {
    // No meter at all: the router's copies go nowhere; Center does everything itself.
    let stack = Stack::builder().only(&[]).start().await.unwrap();
    let h = http();
    let (op, sub) = stack.intent("sg", 1_000_000, "residential").await.unwrap();
    let mut cfg = ClientConfig::new(&stack.center_url, Duration::from_secs(10));
    cfg.attempts = 1;
    let center = McpCenter::new(cfg, SecretString::from(stack.token.clone())).unwrap();
    let claimed = center.claim_node_operation(&op, "metering-test", 600).await.unwrap();
    let identity = claimed.identity.unwrap();
    assert_eq!(identity.center_url, stack.ingress_url, "the claim hands the nodes the router's URL");
    let name = format!("pn-{sub}");
    let (ip, secret) = ("10.88.0.7", testkit::rand_hex(32));
    let auth = basic(ip, &secret);
    let res = h
        .post(format!("{}/slave/register", identity.center_url))
        .header("authorization", &auth)
        .json(&json!({"name": name, "region": "sg", "privateClaim": identity.claim_token.expose_secret()}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(stack.operation(&op).await.unwrap()["status"], "done");

    let mut at = 0;
    let mut report = |rx: u64, tx: u64, boot: &str, auth: String| {
        at += 1;
        let body = json!({"rxBytes": rx, "txBytes": tx, "bootId": boot, "at": format!("2026-01-01T00:00:{at:02}Z")});
        let (h, url) = (h.clone(), format!("{}/slave/usage", identity.center_url));
        async move {
            let r = h.post(url).header("authorization", auth).json(&body).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let usage = |v: &Value| v["data"]["usage"].clone();
    let device_auth = |node: String| {
        let h = h.clone();
        let url = format!("{}/api/device-auth", stack.ingress_url);
        async move { h.post(url).json(&json!({"node": node})).send().await.unwrap().status().as_u16() }
    };

    let (s, v) = report(1000, 1000, "b1", auth.clone()).await;
    assert_eq!((s, usage(&v)["outcome"].as_str(), usage(&v)["trafficUsedBytes"].as_u64()), (200, Some("baseline"), Some(0)), "{v}");
    let (_, v) = report(301_000, 201_000, "b1", auth.clone()).await;
    assert_eq!((usage(&v)["trafficUsedBytes"].as_u64(), usage(&v)["state"].as_str()), (Some(500_000), Some("ok")), "{v}");
    let (_, v) = report(301_000, 201_000, "b1", auth.clone()).await;
    assert_eq!((usage(&v)["outcome"].as_str(), usage(&v)["trafficUsedBytes"].as_u64()), (Some("repeat"), Some(500_000)), "a repeat counts once");
    let (_, v) = report(600_000, 351_000, "b1", auth.clone()).await;
    assert_eq!((usage(&v)["trafficUsedBytes"].as_u64(), usage(&v)["state"].as_str()), (Some(949_000), Some("warn")), "{v}");
    assert_eq!(device_auth(name.clone()).await, 200, "below 95 %: devices are admitted");
    assert!(!center.list_nodes(Some(&name)).await.unwrap()[0].hidden);

    // 95 %: Center's own cut-off.
    let (_, v) = report(600_500, 351_500, "b1", auth.clone()).await;
    assert_eq!((usage(&v)["trafficUsedBytes"].as_u64(), usage(&v)["state"].as_str()), (Some(950_000), Some("cutoff")), "{v}");
    assert_eq!(device_auth(name.clone()).await, 402, "new device auth is refused at the cut-off");
    assert!(center.list_nodes(Some(&name)).await.unwrap()[0].hidden, "the node is hidden");
    let n = &center_nodes(&stack).await[&name];
    assert_eq!((n["trafficUsedBytes"].as_u64(), n["quotaCutoff"].as_bool()), (Some(950_000), Some(true)), "{n}");
    // Traffic past the cut-off is still recorded (it happened); a reboot is a new epoch.
    let (_, v) = report(700_000, 400_000, "b1", auth.clone()).await;
    assert_eq!(usage(&v)["trafficUsedBytes"], 1_098_000);
    let (_, v) = report(10_000, 5_000, "b2", auth.clone()).await;
    assert_eq!((usage(&v)["outcome"].as_str(), usage(&v)["trafficUsedBytes"].as_u64()), (Some("new_epoch"), Some(1_113_000)));
    let (_, v) = report(700_000, 400_000, "b1", auth.clone()).await;
    assert_eq!(usage(&v)["outcome"], "stale", "a late report of the previous boot counts nothing");

    // Hostile input: a typed answer, nothing recorded.
    assert_eq!(report(1, 1, "b2", basic(ip, "wrong")).await.0, 401, "wrong secret");
    assert_eq!(report(1, 1, "b2", basic("10.88.0.8", &secret)).await.0, 401, "unknown address");
    let raw = |auth: Option<String>, body: &'static str| {
        let (h, url) = (h.clone(), format!("{}/slave/usage", stack.ingress_url));
        async move {
            let mut r = h.post(url).body(body);
            if let Some(a) = auth {
                r = r.header("authorization", a);
            }
            r.send().await.unwrap().status().as_u16()
        }
    };
    assert_eq!(raw(None, r#"{"rxBytes":1,"txBytes":1}"#).await, 401);
    assert_eq!(raw(Some(auth.clone()), "not json").await, 400);
    assert_eq!(raw(Some(auth.clone()), r#"{"rxBytes":-5,"txBytes":1}"#).await, 400);
    assert_eq!(center_used(&stack, &name).await, 1_113_000, "nothing refused was recorded");

    // Center's node ingress down (slaveErrorRate): 503, nothing recorded; back up, recorded.
    stack.faults(json!({"slaveErrorRate": 1.0})).await.unwrap();
    assert_eq!(report(20_000, 5_000, "b2", auth.clone()).await.0, 503);
    stack.faults(json!({"slaveErrorRate": 0.0})).await.unwrap();
    assert_eq!(center_used(&stack, &name).await, 1_113_000);
    let (s, v) = report(20_000, 5_000, "b2", auth.clone()).await;
    assert_eq!((s, usage(&v)["trafficUsedBytes"].as_u64()), (200, Some(1_123_000)), "the next report carries the outage's bytes");

    // The router tried to copy every report to the (absent) meter; none of that reached Center.
    let st = stack.ingress_stats().await.unwrap();
    assert!(st["mirrorQueued"].as_u64().unwrap() >= 10, "{st}");
    assert_eq!(st["mirrorOk"], 0, "{st}");
}

// ---------- the bench measures through the router ----------

#[test]
fn bench_meter_measures_the_meter_through_the_router() {
    // A tiny run: the shape and the path, not the speed.
    let out = Command::new(testkit::bin("pnctl").unwrap())
        .args(["bench", "meter", "--json", "--nodes", "20", "--connections", "8", "--duration", "1s", "--warmup", "300ms"])
        .env("PN_NATS_SERVER", testkit::nats_server_path().unwrap())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pnctl bench meter failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(r["mode"], "router", "{r}");
    for k in ["reportsPerSec", "noopPerSec", "centerAnsweredPerSec"] {
        assert!(r[k].as_f64().unwrap() > 0.0, "{k}: {r}");
    }
    assert!(r["mirroredShare"].as_f64().unwrap() > 0.0, "the meter recorded copies: {r}");
    assert_eq!(r["errors"], 0, "Center answered every report: {r}");
    for p in ["pn-ingress", "center-sim", "svc-meter", "generator"] {
        assert!(r["cpuMsPerReport"][p].as_f64().is_some(), "{p}: {r}");
    }
}
