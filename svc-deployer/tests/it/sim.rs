//! The deployer against center-sim's nodes (real SSH protocol, emulated hosts), driven the way
//! the pipeline drives it: an `InstanceReady` on a real nats-server.

use std::time::Duration;

use proto::subjects;
use secrecy::ExposeSecret;
use serde_json::json;
use testkit::{Nats, eventually, rand_hex};

use crate::helpers::*;

struct Stack {
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
    nats: Nats,
    bus: Bus,
    sim: Sim,
    seal: Seal,
    admin: AdminKey,
}

impl Stack {
    async fn start() -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let admin = AdminKey::create(&path).unwrap();
        let nats = Nats::start().unwrap();
        let bus = Bus::connect(&nats).await.unwrap();
        let sim = Sim::start(&path, &admin).await.unwrap();
        Stack { _dir: dir, dir: path, nats, bus, sim, seal: Seal::new(), admin }
    }

    fn config(&self) -> DeployerConfig {
        let mut c = DeployerConfig::new(&self.nats, &self.dir.join("data"), &self.sim.url, &self.seal);
        c.set("PN_SSH__ADMIN_KEYS", format!("sim-lightsail={}", self.admin.private_path.display()))
            .set("PN_SSH__FRESH_PORT", self.sim.fresh_port.to_string())
            .set("PN_SSH__HARDENED_PORT", self.sim.hardened_port.to_string());
        c
    }

    fn deployer(&self) -> Deployer {
        Deployer::start(&self.config()).unwrap()
    }

    /// Checks every place a secret must not be in plaintext.
    fn assert_no_leaks(&self, deployer: &Deployer, secrets: &[&str]) {
        let log = deployer.log_text();
        for s in secrets {
            assert!(!log.contains(s), "a secret is in the deployer's log");
        }
        let sled = files_containing(&deployer.data_dir.join("svc-deployer"), secrets);
        assert!(sled.is_empty(), "plaintext secret in the deployer's state: {sled:?}");
        let js = files_containing(&self.nats.store, secrets);
        assert!(js.is_empty(), "plaintext secret in the NATS store: {js:?}");
    }
}

fn sub() -> String {
    format!("it{}", rand_hex(4))
}

#[tokio::test(flavor = "multi_thread")]
async fn full_deploy_brings_the_node_to_done() {
    let s = Stack::start().await;
    let mut d = s.deployer();
    let sub = sub();
    let (ir, claim) = s.sim.ready_instance(&s.seal, &sub).await.unwrap();
    let op = ir.op.clone().unwrap();
    let inst = ir.instance.clone().unwrap();
    s.bus.publish_instance(&ir, &format!("{}.cloud.1", op.operation_id)).await.unwrap();

    let nd = s.bus.wait_deployed(&op.operation_id, PATIENCE).await.unwrap_or_else(|e| panic!("{e}\n{}", d.log_text()));
    d.assert_alive();
    let node = format!("pn-{sub}");
    let nd_op = nd.op.clone().unwrap();
    assert!(nd_op.sealed_claim_token.is_empty(), "NodeDeployed must not carry the claim");
    assert_eq!(nd_op.operation_id, op.operation_id);
    assert_eq!(nd.node_name, node);
    assert_eq!(nd.sold_bytes, 950u64 << 30);
    assert!(nd.private_node);
    assert_eq!(nd.ssh_port, u32::from(s.sim.hardened_port));
    assert_eq!(nd.instance.as_ref().map(|i| i.instance_id.as_str()), Some(inst.instance_id.as_str()));

    // The node's disk: every runbook variable, the claim, a 32-byte hex secret whose hash
    // was published; the stack files as shipped.
    let env = s.sim.node_env(&node).unwrap();
    let secret = env.get("K2_NODE_SECRET").cloned().unwrap_or_default();
    assert_eq!(secret.len(), 64);
    assert!(secret.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(nd.node_secret_sha256, sha256_hex_text(&secret));
    assert_eq!(env.get("K2_PRIVATE_CLAIM").map(String::as_str), Some(claim.expose_secret()));
    assert_eq!(env.get("K2_CENTER_URL"), Some(&s.sim.url));
    assert_eq!(env.get("K2_DOMAIN").map(String::as_str), Some(""));
    assert_eq!(env.get("K2_VERSION").map(String::as_str), Some(svc_deployer::settings::DEFAULT_K2_VERSION));
    assert_eq!(env.get("K2_NODE_TRAFFIC_LIMIT_GB").map(String::as_str), Some("950"));
    assert_eq!(env.get("K2_NODE_NAME"), Some(&node));
    assert_eq!(env.get("K2_NODE_REGION").map(String::as_str), Some("sg"));
    assert_eq!(env.get("K2_IP_TYPE").map(String::as_str), Some("residential"));
    assert_eq!(s.sim.node_file(&node, "docker-compose.yml").unwrap(), svc_deployer::stack::DOCKER_COMPOSE_YML.as_bytes());
    assert_eq!(s.sim.node_file(&node, "users").unwrap(), b"");
    assert_eq!(s.sim.node_file(&node, "auto-update.sh").unwrap(), svc_deployer::stack::AUTO_UPDATE_SH.as_bytes());
    assert_eq!(s.sim.node_file(&node, "k2s-crash-monitor.sh").unwrap(), svc_deployer::stack::CRASH_MONITOR_SH.as_bytes());

    let i = s.sim.instance(&inst.instance_id).await.unwrap();
    assert_eq!(i["prepRuns"], 1);
    assert_eq!(i["hardened"], true);
    assert_eq!(i["containersUp"], true);
    assert!(same_key(&nd.host_key, i["hostKey"].as_str().unwrap_or("")), "the published host key is the node's");

    // The sidecar registered with the claim: Center flipped the operation to done.
    eventually("operation done", PATIENCE, || async {
        let o = s.sim.operation(&op.operation_id).await.ok()?;
        (o["status"] == "done").then_some(())
    })
    .await
    .unwrap();
    assert_eq!(s.sim.violations().await.unwrap(), Vec::<serde_json::Value>::new());
    s.assert_no_leaks(&d, &[claim.expose_secret(), &secret]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_delivery_and_a_replay_keep_prep_and_secret() {
    let s = Stack::start().await;
    let mut d = s.deployer();
    let (ir, claim) = s.sim.ready_instance(&s.seal, &sub()).await.unwrap();
    let op = ir.op.clone().unwrap();
    let inst = ir.instance.clone().unwrap();
    let node = inst.name.clone();
    s.bus.publish_instance(&ir, &format!("{}.cloud.1", op.operation_id)).await.unwrap();
    let first = s.bus.wait_deployed(&op.operation_id, PATIENCE).await.unwrap_or_else(|e| panic!("{e}\n{}", d.log_text()));
    let secret = s.sim.node_env(&node).unwrap()["K2_NODE_SECRET"].clone();

    // The same event again (a redelivery, a duplicate publish past the dedup window).
    let seq = s.bus.publish_instance(&ir, &format!("{}.cloud.1.again", op.operation_id)).await.unwrap();
    s.bus.wait_acked(subjects::OPS_STREAM, "svc-deployer-instance", seq, PATIENCE).await.unwrap();
    let i = s.sim.instance(&inst.instance_id).await.unwrap();
    assert_eq!(i["prepRuns"], 1, "a second delivery must not re-run the OS prep");
    assert_eq!(i["upRuns"], 1, "a recorded outcome is re-published, not re-deployed");
    assert_eq!(s.sim.node_env(&node).unwrap()["K2_NODE_SECRET"], secret);
    let again = s.bus.wait_deployed(&op.operation_id, PATIENCE).await.unwrap();
    assert_eq!(again.node_secret_sha256, first.node_secret_sha256);

    // A replay re-runs the idempotent steps (pull + up -d again) — still no second prep,
    // still the same secret.
    let seq = s.bus.publish_replay(&op.operation_id).await.unwrap();
    s.bus.wait_acked(subjects::REPLAY_STREAM, "svc-deployer-replay", seq, PATIENCE).await.unwrap();
    let i = s.sim.instance(&inst.instance_id).await.unwrap();
    assert_eq!(i["upRuns"], 2, "the replay ran up -d again");
    assert_eq!(i["prepRuns"], 1, "a replay must not re-run a recorded prep");
    assert_eq!(s.sim.node_env(&node).unwrap()["K2_NODE_SECRET"], secret);
    assert_eq!(s.bus.last(subjects::FAILED, &op.operation_id).await, None);
    d.assert_alive();
    assert_eq!(s.sim.violations().await.unwrap(), Vec::<serde_json::Value>::new());
    s.assert_no_leaks(&d, &[claim.expose_secret(), &secret]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deployer_killed_mid_prep_finishes_after_restart() {
    let s = Stack::start().await;
    // Long enough that the kill lands while the prep runs on the node.
    s.sim.faults(json!({"prepDelayMs": 6_000})).await.unwrap();
    let mut cfg = s.config();
    // A short AckWait so the unacked message comes back soon after the kill.
    cfg.set("PN_ACK_WAIT_MS", "2000");
    let mut d = Deployer::start(&cfg).unwrap();
    let (ir, claim) = s.sim.ready_instance(&s.seal, &sub()).await.unwrap();
    let op = ir.op.clone().unwrap();
    let inst = ir.instance.clone().unwrap();
    s.bus.publish_instance(&ir, &format!("{}.cloud.1", op.operation_id)).await.unwrap();

    eventually("the prep to start", PATIENCE, || async {
        let i = s.sim.instance(&inst.instance_id).await.ok()?;
        (i["prepRuns"].as_u64() >= Some(1)).then_some(())
    })
    .await
    .unwrap();
    d.proc.kill(); // SIGKILL, mid-prep
    let first_log = d.log_text();

    let mut d = Deployer::start(&cfg).unwrap();
    let nd = s.bus.wait_deployed(&op.operation_id, PATIENCE).await.unwrap_or_else(|e| panic!("{e}\n{first_log}\n---\n{}", d.log_text()));
    d.assert_alive();
    let env = s.sim.node_env(&inst.name).unwrap();
    assert_eq!(nd.node_secret_sha256, sha256_hex_text(&env["K2_NODE_SECRET"]));
    let i = s.sim.instance(&inst.instance_id).await.unwrap();
    assert_eq!(i["hardened"], true);
    assert_eq!(i["containersUp"], true);
    // The prep runs detached on the node: it outlived the deployer, and the restarted one
    // found it running (its start was recorded before the kill) instead of starting another.
    assert_eq!(i["prepRuns"], 1, "{i}");
    eventually("operation done", PATIENCE, || async {
        let o = s.sim.operation(&op.operation_id).await.ok()?;
        (o["status"] == "done").then_some(())
    })
    .await
    .unwrap();
    assert_eq!(s.sim.violations().await.unwrap(), Vec::<serde_json::Value>::new());
    s.assert_no_leaks(&d, &[claim.expose_secret(), &env["K2_NODE_SECRET"]]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_host_key_fails_as_man_in_the_middle() {
    let s = Stack::start().await;
    let mut d = s.deployer();
    let (ir, claim) = s.sim.ready_instance(&s.seal, &sub()).await.unwrap();
    let op = ir.op.clone().unwrap();
    let inst = ir.instance.clone().unwrap();
    s.bus.publish_instance(&ir, &format!("{}.cloud.1", op.operation_id)).await.unwrap();
    s.bus.wait_deployed(&op.operation_id, PATIENCE).await.unwrap_or_else(|e| panic!("{e}\n{}", d.log_text()));

    s.sim.rekey(&inst.instance_id).await.unwrap();
    s.bus.publish_replay(&op.operation_id).await.unwrap();
    let f = s.bus.wait_failed(&op.operation_id, PATIENCE).await.unwrap_or_else(|e| panic!("{e}\n{}", d.log_text()));
    assert_eq!(f.stage, "deploy");
    assert!(f.reason.contains("host key changed") && f.reason.contains("man-in-the-middle"), "{}", f.reason);
    assert_eq!(f.operation_id, op.operation_id);
    assert_eq!(f.sub_id, op.sub_id);
    assert_eq!(f.instance_id, inst.instance_id);
    assert_eq!(f.holder, op.holder);
    let i = s.sim.instance(&inst.instance_id).await.unwrap();
    assert_eq!(i["upRuns"], 1, "nothing may run on an impostor");
    d.assert_alive();
    let secret = s.sim.node_env(&inst.name).unwrap()["K2_NODE_SECRET"].clone();
    assert!(!f.reason.contains(&secret) && !f.reason.contains(claim.expose_secret()));
    s.assert_no_leaks(&d, &[claim.expose_secret(), &secret]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flaky_link_still_deploys() {
    let s = Stack::start().await;
    s.sim.faults(json!({"sshDropRate": 0.3, "seed": 7})).await.unwrap();
    let mut d = s.deployer();
    let (ir, claim) = s.sim.ready_instance(&s.seal, &sub()).await.unwrap();
    let op = ir.op.clone().unwrap();
    let inst = ir.instance.clone().unwrap();
    s.bus.publish_instance(&ir, &format!("{}.cloud.1", op.operation_id)).await.unwrap();
    let nd = s.bus.wait_deployed(&op.operation_id, Duration::from_secs(180)).await.unwrap_or_else(|e| panic!("{e}\n{}", d.log_text()));
    d.assert_alive();
    let env = s.sim.node_env(&inst.name).unwrap();
    assert_eq!(nd.node_secret_sha256, sha256_hex_text(&env["K2_NODE_SECRET"]));
    assert_eq!(env.get("K2_PRIVATE_CLAIM").map(String::as_str), Some(claim.expose_secret()));
    assert_eq!(s.bus.last(subjects::FAILED, &op.operation_id).await, None);
    eventually("operation done", PATIENCE, || async {
        let o = s.sim.operation(&op.operation_id).await.ok()?;
        (o["status"] == "done").then_some(())
    })
    .await
    .unwrap();
    assert_eq!(s.sim.violations().await.unwrap(), Vec::<serde_json::Value>::new());
    // The faults did bite (the seeded dice make this deterministic): steps were retried.
    assert!(d.log_text().contains("step failed; retrying"), "no drop happened; the test proves nothing");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_account_without_a_key_fails_at_once_and_unknown_replays_are_dropped() {
    let s = Stack::start().await;
    let mut d = s.deployer();
    let (mut ir, _claim) = s.sim.ready_instance(&s.seal, &sub()).await.unwrap();
    if let Some(i) = ir.instance.as_mut() {
        i.account = "hetzner-main".into();
    }
    let op = ir.op.clone().unwrap();
    let inst = ir.instance.clone().unwrap();

    let unknown = format!("op-{}", rand_hex(6));
    let seq = s.bus.publish_replay(&unknown).await.unwrap();
    s.bus.publish_instance(&ir, &format!("{}.cloud.1", op.operation_id)).await.unwrap();

    let f = s.bus.wait_failed(&op.operation_id, PATIENCE).await.unwrap_or_else(|e| panic!("{e}\n{}", d.log_text()));
    assert_eq!(f.stage, "deploy");
    assert!(f.reason.contains("hetzner-main") && f.reason.contains("no admin SSH key"), "{}", f.reason);
    assert_eq!(f.instance_id, inst.instance_id);
    let i = s.sim.instance(&inst.instance_id).await.unwrap();
    assert_eq!(i["prepRuns"], 0, "nothing was tried on the node");

    s.bus.wait_acked(subjects::REPLAY_STREAM, "svc-deployer-replay", seq, PATIENCE).await.unwrap();
    assert_eq!(s.bus.count(subjects::FAILED, &unknown).await, 0, "an unknown replay is dropped, not failed");
    d.assert_alive();
}

/// A slow prep parks the operation (no session or handler held: the deployer's metrics count
/// the parks) and it is picked up again when the prep ends; the prep ran once.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_prep_parks_the_operation_and_resumes_it() {
    let s = Stack::start().await;
    s.sim.faults(json!({"prepDelayMs": 3_000})).await.unwrap();
    let mut cfg = s.config();
    cfg.set("PN_SSH__PREP_INLINE_WAIT_MS", "300").set("PN_SSH__PREP_POLL_MS", "200");
    let mut d = Deployer::start(&cfg).unwrap();
    let (ir, claim) = s.sim.ready_instance(&s.seal, &sub()).await.unwrap();
    let op = ir.op.clone().unwrap();
    let inst = ir.instance.clone().unwrap();
    s.bus.publish_instance(&ir, &format!("{}.cloud.1", op.operation_id)).await.unwrap();
    let nd = s.bus.wait_deployed(&op.operation_id, PATIENCE).await.unwrap_or_else(|e| panic!("{e}\n{}", d.log_text()));
    d.assert_alive();
    let i = s.sim.instance(&inst.instance_id).await.unwrap();
    assert_eq!(i["prepRuns"], 1, "{i}");
    assert_eq!(i["containersUp"], true);
    let parks = d.metric("pn_handler_parks_total").await.unwrap();
    assert!(parks >= 1.0, "the operation never parked ({parks})");
    let env = s.sim.node_env(&inst.name).unwrap();
    assert_eq!(nd.node_secret_sha256, sha256_hex_text(&env["K2_NODE_SECRET"]));
    s.assert_no_leaks(&d, &[claim.expose_secret(), &env["K2_NODE_SECRET"]]);
}

/// A prep that keeps failing is started `step_attempts` times, then the operation fails with
/// the node's exit status and output tail; nothing is deployed.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_prep_is_retried_then_fails_with_its_tail() {
    let s = Stack::start().await;
    s.sim.faults(json!({"prepFailRate": 1.0})).await.unwrap();
    let mut cfg = s.config();
    cfg.set("PN_SSH__STEP_ATTEMPTS", "3").set("PN_SSH__RETRY_DELAY_MS", "100");
    let _d = Deployer::start(&cfg).unwrap();
    let (ir, _claim) = s.sim.ready_instance(&s.seal, &sub()).await.unwrap();
    let op = ir.op.clone().unwrap();
    let inst = ir.instance.clone().unwrap();
    s.bus.publish_instance(&ir, &format!("{}.cloud.1", op.operation_id)).await.unwrap();
    let f = s.bus.wait_failed(&op.operation_id, PATIENCE).await.unwrap();
    assert!(f.reason.contains("step `prep` exited 100 after 3 tries"), "{}", f.reason);
    assert!(f.reason.contains("dpkg"), "the node's output tail is in the reason: {}", f.reason);
    let i = s.sim.instance(&inst.instance_id).await.unwrap();
    assert_eq!(i["prepRuns"], 3, "{i}");
    assert_eq!(i["containersUp"], false);
    assert_eq!(s.bus.count(subjects::DEPLOYED, &op.operation_id).await, 0);
}

/// Issue #18: a forged `pn.op.instance` (copied from the stream, sealed token and all) that
/// names a foreign IPv4. Nothing was confirmed for the operation yet: it fails with the
/// provider's reason, and the foreign address never sees a connection. Once an operation's
/// instance is confirmed and deployed, forged events (its own instance id at another address,
/// an unknown instance, another subscription) are dropped: no failure, no connection, the
/// pinned host key kept (a replay still reaches the node over the pin).
#[tokio::test(flavor = "multi_thread")]
async fn forged_instance_events_move_no_secret_and_connect_nowhere() {
    let s = Stack::start().await;
    let trap = Trap::bind(&[s.sim.fresh_port, s.sim.hardened_port]).await.unwrap();
    let mut d = s.deployer();

    // A: nothing confirmed yet; the forged event names an instance nobody has, at the trap.
    let (ir_a, claim_a) = s.sim.ready_instance(&s.seal, &sub()).await.unwrap();
    let op_a = ir_a.op.clone().unwrap();
    let mut forged = ir_a.clone();
    if let Some(i) = forged.instance.as_mut() {
        i.instance_id = "i-forged-0001".into();
        i.ipv4 = trap.ip.clone();
    }
    s.bus.publish_instance(&forged, &format!("{}.cloud.1", op_a.operation_id)).await.unwrap();
    let f = s.bus.wait_failed(&op_a.operation_id, PATIENCE).await.unwrap_or_else(|e| panic!("{e}\n{}", d.log_text()));
    assert_eq!(f.stage, "deploy");
    assert!(f.reason.contains("does not confirm") && f.reason.contains("i-forged-0001") && f.reason.contains("nothing sent"), "{}", f.reason);
    // The real instance at A's real address, but the event says the trap: refused too.
    let mut forged_ip = ir_a.clone();
    if let Some(i) = forged_ip.instance.as_mut() {
        i.ipv4 = trap.ip.clone();
    }
    if let Some(o) = forged_ip.op.as_mut() {
        // Another claim attempt, so its failure is not deduplicated with the first one's.
        o.claim_attempt = 2;
    }
    let seq = s.bus.publish_instance(&forged_ip, &format!("{}.cloud.1.forged-ip", op_a.operation_id)).await.unwrap();
    s.bus.wait_acked(subjects::OPS_STREAM, "svc-deployer-instance", seq, PATIENCE).await.unwrap();
    let f = eventually("the second failure", PATIENCE, || async {
        match s.bus.last(subjects::FAILED, &op_a.operation_id).await {
            Some(proto::Body::Failed(f)) if f.attempt == 2 => Some(f),
            _ => None,
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", d.log_text()));
    assert!(f.reason.contains(&format!("not {}", trap.ip)), "{}", f.reason);
    let i = s.sim.instance(&ir_a.instance.as_ref().unwrap().instance_id).await.unwrap();
    assert_eq!((i["prepRuns"].as_u64(), i["upRuns"].as_u64()), (Some(0), Some(0)), "nothing ran anywhere: {i}");

    // B: deployed on its confirmed instance; then forged events for it.
    let (ir_b, claim_b) = s.sim.ready_instance(&s.seal, &sub()).await.unwrap();
    let op_b = ir_b.op.clone().unwrap();
    let inst_b = ir_b.instance.clone().unwrap();
    s.bus.publish_instance(&ir_b, &format!("{}.cloud.1", op_b.operation_id)).await.unwrap();
    s.bus.wait_deployed(&op_b.operation_id, PATIENCE).await.unwrap_or_else(|e| panic!("{e}\n{}", d.log_text()));
    let mut forgeries = Vec::new();
    for (k, (id, sub_id, attempt)) in [
        (inst_b.instance_id.clone(), op_b.sub_id.clone(), 1),
        ("i-forged-0002".to_string(), op_b.sub_id.clone(), 5),
        (ir_a.instance.as_ref().unwrap().instance_id.clone(), op_a.sub_id.clone(), 9),
    ]
    .into_iter()
    .enumerate()
    {
        let mut f = ir_b.clone();
        if let Some(i) = f.instance.as_mut() {
            i.instance_id = id;
            i.ipv4 = trap.ip.clone();
        }
        if let Some(o) = f.op.as_mut() {
            o.sub_id = sub_id;
            o.claim_attempt = attempt;
        }
        forgeries.push(s.bus.publish_instance(&f, &format!("{}.cloud.forged.{k}", op_b.operation_id)).await.unwrap());
    }
    for seq in forgeries {
        s.bus.wait_acked(subjects::OPS_STREAM, "svc-deployer-instance", seq, PATIENCE).await.unwrap();
    }
    assert_eq!(s.bus.count(subjects::FAILED, &op_b.operation_id).await, 0, "a forged event does not fail a confirmed operation:\n{}", d.log_text());
    // The pin and the confirmed input were kept: a replay runs on B's node again.
    let seq = s.bus.publish_replay(&op_b.operation_id).await.unwrap();
    s.bus.wait_acked(subjects::REPLAY_STREAM, "svc-deployer-replay", seq, PATIENCE).await.unwrap();
    let i = s.sim.instance(&inst_b.instance_id).await.unwrap();
    assert_eq!(i["upRuns"], 2, "the replay ran on B's own node: {i}");
    assert_eq!(s.bus.count(subjects::FAILED, &op_b.operation_id).await, 0, "{}", d.log_text());
    assert!(d.metric("pn_instance_checks_total").await.unwrap() >= 5.0);

    assert_eq!(trap.hits(), 0, "the deployer connected to the forged address");
    d.assert_alive();
    let secret = s.sim.node_env(&inst_b.name).unwrap()["K2_NODE_SECRET"].clone();
    s.assert_no_leaks(&d, &[claim_a.expose_secret(), claim_b.expose_secret(), &secret]);
}

/// svc-cloud replaced the instance (a new claim attempt adopted or created another
/// `pn-<subId>`): the provider confirms the new one, so the pin and the prep of the old one
/// are dropped and the node secret kept.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_instance_the_provider_confirms_replaces_the_pin() {
    use kit::center::{Center, CreateInstance};
    let s = Stack::start().await;
    let mut d = s.deployer();
    let (ir, claim) = s.sim.ready_instance(&s.seal, &sub()).await.unwrap();
    let op = ir.op.clone().unwrap();
    let inst = ir.instance.clone().unwrap();
    s.bus.publish_instance(&ir, &format!("{}.cloud.1", op.operation_id)).await.unwrap();
    let first = s.bus.wait_deployed(&op.operation_id, PATIENCE).await.unwrap_or_else(|e| panic!("{e}\n{}", d.log_text()));

    let created = s
        .sim
        .center
        .create_cloud_instance(&CreateInstance {
            account_name: "sim-lightsail".into(),
            region: "ap-southeast-1".into(),
            plan: "small_1tb".into(),
            image_id: "ubuntu-22-04".into(),
            name: inst.name.clone(),
        })
        .await
        .unwrap();
    let second = eventually("the second instance running", PATIENCE, || async {
        let i = s.sim.center.get_cloud_instance(&created.id).await.ok()?;
        (i.status == "running" && i.ipv4.is_some()).then_some(i)
    })
    .await
    .unwrap();
    let mut ir2 = ir.clone();
    if let Some(i) = ir2.instance.as_mut() {
        i.instance_id = second.id.clone();
        i.ipv4 = second.ipv4.clone().unwrap_or_default();
    }
    if let Some(o) = ir2.op.as_mut() {
        o.claim_attempt = 2;
    }
    s.bus.publish_instance(&ir2, &format!("{}.cloud.2", op.operation_id)).await.unwrap();
    let nd = eventually("deployed on the second instance", PATIENCE, || async {
        match s.bus.last(subjects::DEPLOYED, &op.operation_id).await {
            Some(proto::Body::Deployed(nd)) if nd.instance.as_ref().is_some_and(|i| i.instance_id == second.id) => Some(nd),
            _ => None,
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", d.log_text()));
    let i2 = s.sim.instance(&second.id).await.unwrap();
    assert!(same_key(&nd.host_key, i2["hostKey"].as_str().unwrap_or("")), "the new instance's key is pinned");
    assert!(!same_key(&nd.host_key, &first.host_key));
    assert_eq!(i2["prepRuns"], 1, "the new machine got its own prep");
    assert_eq!(nd.node_secret_sha256, first.node_secret_sha256, "the node secret stays the operation's");
    assert_eq!(s.bus.count(subjects::FAILED, &op.operation_id).await, 0);
    d.assert_alive();
    let secret = s.sim.node_env(&inst.name).unwrap()["K2_NODE_SECRET"].clone();
    s.assert_no_leaks(&d, &[claim.expose_secret(), &secret]);
}

/// Issue 18 item 5: after the prep root may not log in (`PermitRootLogin no`). On an image
/// that lets only root in (the sim's Vultr account), the deployer logs in as root for the
/// prep, then reaches the node as the admin the prep made (`kit::cloud::ADMIN_USER`), and the
/// node refuses root — key or not — on every port.
#[tokio::test(flavor = "multi_thread")]
async fn after_the_prep_root_is_refused_and_the_admin_gets_in() {
    let s = Stack::start().await;
    let mut cfg = s.config();
    cfg.set("PN_SSH__ADMIN_KEYS", format!("sim-vultr={}", s.admin.private_path.display()));
    let mut d = Deployer::start(&cfg).unwrap();
    let sub = sub();
    let (ir, _claim) = s.sim.ready_instance_on(&s.seal, &sub, "sim-vultr", "ubuntu-24-04").await.unwrap();
    let op = ir.op.clone().unwrap();
    let inst = ir.instance.clone().unwrap();
    let key = std::sync::Arc::new(kit::ssh::parse_private_key(&std::fs::read_to_string(&s.admin.private_path).unwrap()).unwrap());
    let target = |port: u16, user: &str| kit::ssh::Target {
        host: inst.ipv4.clone(),
        port,
        user: user.into(),
        key: key.clone(),
        pinned: None,
        connect_timeout: Duration::from_secs(5),
    };
    // Before the prep the image lets root in (and no admin user exists yet).
    let before = s.sim.instance(&inst.instance_id).await.unwrap();
    assert_eq!((before["loginUser"].as_str(), before["adminUser"].as_str()), (Some("root"), None));
    let r = kit::ssh::connect(&target(s.sim.fresh_port, "root")).await.expect("root before the prep");
    assert_eq!(r.exec("true", None, Duration::from_secs(10)).await.unwrap().status, 0);
    r.close().await;

    s.bus.publish_instance(&ir, &format!("{}.cloud.1", op.operation_id)).await.unwrap();
    let nd = s.bus.wait_deployed(&op.operation_id, PATIENCE).await.unwrap_or_else(|e| panic!("{e}\n{}", d.log_text()));
    d.assert_alive();
    assert_eq!(nd.ssh_user, kit::cloud::ADMIN_USER, "the verifier is told the admin, not root");
    let after = s.sim.instance(&inst.instance_id).await.unwrap();
    assert_eq!(after["adminUser"].as_str(), Some(kit::cloud::ADMIN_USER));
    for port in [s.sim.hardened_port, s.sim.fresh_port] {
        match kit::ssh::connect(&target(port, "root")).await {
            Err(kit::ssh::SshError::AuthRefused { .. }) => {}
            Err(e) if port == s.sim.fresh_port => assert!(!matches!(e, kit::ssh::SshError::HostKeyChanged { .. }), "{e}"),
            other => panic!("root on {port} after the prep: {:?}", other.map(|_| "got in")),
        }
    }
    assert!(s.sim.instance(&inst.instance_id).await.unwrap()["rootLoginsRefused"].as_u64().unwrap_or(0) >= 1);
    let a = kit::ssh::connect(&target(s.sim.hardened_port, kit::cloud::ADMIN_USER)).await.expect("the admin after the prep");
    let out = a.exec("sudo docker logs --tail 5 k2-sidecar", None, Duration::from_secs(10)).await.unwrap();
    assert_eq!(out.status, 0, "{}", out.stderr_tail());
    a.close().await;
    let log = d.log_text();
    assert!(log.contains("user=root") || log.contains("\"user\":\"root\""), "the prep ran as root");
}
