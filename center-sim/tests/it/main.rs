//! center-sim against its real binary: Center's tools through kit's MCP client, the nodes
//! through plain russh client calls (kit::ssh), the usage path through the real `pn-ingress`
//! in front of the sim, mirroring to a test HTTP receiver standing in for the meter. Run `cargo build -p center-sim` first (nextest builds it too).
//! `TEST_LOG=1` shows the simulator's log.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use base64::Engine;
use kit::center::{Center, ClientConfig, CloudInstance, CreateInstance, McpCenter, OpFilter};
use kit::secrecy::{ExposeSecret, SecretString};
use kit::ssh::{SshError, Target};
use serde_json::{Value, json};
use testkit::{Proc, eventually, free_port};

const PATIENCE: Duration = Duration::from_secs(20);
const CMD_TIMEOUT: Duration = Duration::from_secs(20);

struct TestSim {
    _proc: Proc,
    _stdout: BufReader<ChildStdout>,
    /// `pn-ingress` in front of the sim (claims hand out its URL), when a mirror was given.
    _ingress: Option<(Proc, BufReader<ChildStdout>)>,
    url: String,
    token: String,
    dir: tempfile::TempDir,
    admin_pem: String,
    fresh: u16,
    hardened: u16,
    http: reqwest::Client,
}

/// Starts the real binary on a free port, with its own data dir, admin key, SSH ports and
/// loopback range, and fast timings. With `meter_url`, the real `pn-ingress` runs in front of
/// it (mirroring `/slave/usage` there) and the claims hand out the ingress's URL.
fn spawn_sim(meter_url: Option<&str>) -> TestSim {
    kit::init_crypto();
    let dir = tempfile::tempdir().unwrap();
    let (admin_pem, admin_pub) = kit::ssh::generate_ed25519().unwrap();
    let pub_path = dir.path().join("admin.pub");
    std::fs::write(&pub_path, format!("{admin_pub}\n")).unwrap();
    let (fresh, hardened) = (free_port(), free_port());
    let ip_start = format!("127.{}.{}.1", 2 + rand::random::<u8>() % 250, 1 + rand::random::<u8>() % 250);
    let token = testkit::rand_hex(16);
    let mut cmd = Command::new(testkit::bin("center-sim").unwrap());
    cmd.args(["--listen", "127.0.0.1:0", "--ip-start", &ip_start, "--seed", "7"])
        .arg("--data-dir")
        .arg(dir.path().join("nodes"))
        .arg("--admin-public-key-file")
        .arg(&pub_path)
        .args(["--ssh-port-fresh", &fresh.to_string(), "--ssh-port-hardened", &hardened.to_string()])
        .env("PN_CENTER_TOKEN", &token)
        .env("PN_LOG_FORMAT", "json")
        .env("RUST_LOG", "debug,russh=info,hyper=info,reqwest=info")
        .stdout(Stdio::piped())
        .stderr(if std::env::var_os("TEST_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::from(std::fs::File::create(dir.path().join("sim.log")).unwrap())
        });
    let ingress_port = free_port();
    if meter_url.is_some() {
        cmd.args(["--public-url", &format!("http://127.0.0.1:{ingress_port}")]);
    }
    let mut child = cmd.spawn().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let proc = Proc { child, name: "center-sim".into() };
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let url = line.trim().strip_prefix("center-sim listening on ").unwrap_or_else(|| panic!("first line: {line:?}")).to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let ingress = meter_url.map(|m| {
        let mut child = Command::new(testkit::bin("pn-ingress").unwrap())
            .args(["--listen", &format!("127.0.0.1:{ingress_port}"), "--upstream", &url, "--mirror", m])
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(dir.path().join("ingress.log")).unwrap()))
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), format!("pn-ingress listening on http://127.0.0.1:{ingress_port}"));
        (Proc { child, name: "pn-ingress".into() }, out)
    });
    TestSim { _proc: proc, _stdout: stdout, _ingress: ingress, url, token, dir, admin_pem, fresh, hardened, http: reqwest::Client::new() }
}

impl TestSim {
    fn center_with(&self, attempts: usize) -> Arc<McpCenter> {
        let mut cfg = ClientConfig::new(&self.url, Duration::from_secs(10));
        cfg.attempts = attempts;
        cfg.min_backoff = Duration::from_millis(10);
        cfg.max_backoff = Duration::from_millis(50);
        McpCenter::new(cfg, SecretString::from(self.token.clone())).unwrap()
    }

    fn center(&self) -> Arc<McpCenter> {
        self.center_with(3)
    }

    async fn get(&self, path: &str) -> Value {
        let r = self.http.get(format!("{}{path}", self.url)).send().await.unwrap();
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().await.unwrap()
    }

    async fn send(&self, method: reqwest::Method, path: &str, body: Value) -> (u16, Value) {
        let r = self.http.request(method, format!("{}{path}", self.url)).json(&body).send().await.unwrap();
        let code = r.status().as_u16();
        (code, r.json().await.unwrap_or(Value::Null))
    }

    async fn faults(&self, patch: Value) {
        let (code, v) = self.send(reqwest::Method::PUT, "/admin/faults", patch).await;
        assert_eq!(code, 200, "{v}");
    }

    async fn intent(&self, sub: &str) -> String {
        let (code, v) = self
            .send(
                reqwest::Method::POST,
                "/admin/intents",
                json!({"subId": sub, "region": "sg", "trafficTotalBytes": 950u64 << 30, "ipType": "residential"}),
            )
            .await;
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["subId"], sub);
        v["operationId"].as_str().unwrap().to_string()
    }

    async fn op(&self, id: &str) -> Value {
        self.get(&format!("/admin/operations/{id}")).await
    }

    async fn violations(&self) -> Vec<Value> {
        self.get("/admin/violations").await["items"].as_array().unwrap().clone()
    }

    async fn instance_admin(&self, id: &str) -> Value {
        let all = self.get("/admin/instances").await;
        all["items"].as_array().unwrap().iter().find(|i| i["id"] == id).cloned().unwrap()
    }

    /// Creates an instance and waits until it runs with an address.
    async fn running_instance(&self, center: &McpCenter, name: &str) -> (CloudInstance, String) {
        let req = CreateInstance {
            account_name: "sim-lightsail".into(),
            region: "ap-southeast-1".into(),
            plan: "small_1tb".into(),
            image_id: "ubuntu-22-04".into(),
            name: name.into(),
        };
        let created = center.create_cloud_instance(&req).await.unwrap();
        assert_eq!(created.status, "pending");
        assert_eq!(created.ipv4, None);
        let inst = eventually("instance running", PATIENCE, || async {
            center.get_cloud_instance(&created.id).await.ok().filter(|i| i.status == "running" && i.ipv4.is_some())
        })
        .await
        .unwrap();
        let ip = inst.ipv4.clone().unwrap();
        (inst, ip)
    }

    fn target(&self, ip: &str, port: u16, pinned: Option<String>) -> Target {
        Target {
            host: ip.into(),
            port,
            user: "ubuntu".into(),
            key: Arc::new(kit::ssh::parse_private_key(&self.admin_pem).unwrap()),
            pinned,
            connect_timeout: Duration::from_secs(5),
        }
    }

    /// Connects to the fresh port and runs the prep; returns a session on the hardened port.
    async fn prepped(&self, ip: &str) -> kit::ssh::Session {
        let s = kit::ssh::connect(&self.target(ip, self.fresh, None)).await.unwrap();
        let out = s.exec("sudo bash -s", Some(b"#!/bin/bash\nset -e\necho provision\n"), CMD_TIMEOUT).await.unwrap();
        assert_eq!(out.status, 0, "{}", out.stderr_tail());
        let pinned = s.host_key.clone();
        s.close().await;
        kit::ssh::connect(&self.target(ip, self.hardened, Some(pinned))).await.unwrap()
    }
}

/// The node stack the deployer ships (compose checks its images against the sim's registry).
const STACK_COMPOSE: &str = include_str!("../../../deploy/node/docker-compose.yml");

async fn run(s: &kit::ssh::Session, cmd: &str, stdin: Option<&[u8]>) -> kit::ssh::Output {
    s.exec(cmd, stdin, CMD_TIMEOUT).await.unwrap()
}

fn env_file(secret: &str, claim: &str, center_url: &str, name: &str) -> String {
    format!(
        "K2_NODE_SECRET={secret}\nK2_PRIVATE_CLAIM={claim}\nK2_CENTER_URL={center_url}\nK2_DOMAIN=\nK2_VERSION=1.6.3\n\
         K2_NODE_TRAFFIC_LIMIT_GB=950\nK2_NODE_NAME={name}\nK2_NODE_REGION=sg\nK2_IP_TYPE=residential\n"
    )
}

// ---------- Center ----------

#[tokio::test]
async fn a_claim_is_exclusive_done_is_rejected_and_an_unrenewed_lease_expires() {
    let sim = spawn_sim(None);
    let center = sim.center();
    let op_id = sim.intent("s-claim").await;

    let queued =
        center.list_node_operations(&OpFilter { action: Some("provision".into()), status: Some("queued".into()), id: None }).await.unwrap();
    assert!(queued.iter().any(|o| o.id == op_id && o.sub_id == "s-claim" && o.params.region == "sg"));

    let claimed = center.claim_node_operation(&op_id, "holder-a", 600).await.unwrap();
    assert_eq!(claimed.operation.status, "claimed");
    assert_eq!(claimed.operation.holder.as_deref(), Some("holder-a"));
    assert!(claimed.operation.lease_expires_at.is_some());
    let identity = claimed.identity.expect("a provision's claim carries the identity");
    let token = identity.claim_token.expose_secret().to_string();
    assert!(token.len() >= 32);
    assert_eq!(identity.center_url, sim.url);
    assert_eq!(identity.domain, "");

    let again = center.claim_node_operation(&op_id, "holder-b", 600).await.unwrap_err();
    assert!(again.is_conflict(), "{again}");
    let unknown = center.claim_node_operation("op-nope", "holder-b", 600).await.unwrap_err();
    assert!(unknown.is_conflict(), "unknown operation is 404, a conflict for the client: {unknown}");

    let done = center.update_node_operation(&op_id, "holder-a", "done", None, None).await.unwrap_err();
    assert!(matches!(done, kit::center::CenterError::Rejected { .. }), "{done}");
    let foreign = center.update_node_operation(&op_id, "holder-b", "in_progress", None, None).await.unwrap_err();
    assert!(foreign.is_conflict(), "{foreign}");
    let progressed = center
        .update_node_operation(&op_id, "holder-a", "in_progress", Some(json!({"instanceId": "i-1", "ipv4": "127.0.1.1"})), None)
        .await
        .unwrap();
    assert_eq!(progressed.status, "in_progress");
    assert_eq!(progressed.result, Some(json!({"instanceId": "i-1", "ipv4": "127.0.1.1"})));

    // The token is returned once and never again.
    let listed = center.call("list_node_operations", json!({"id": op_id})).await.unwrap();
    assert!(!listed.to_string().contains(&token));
    assert!(!sim.op(&op_id).await.to_string().contains(&token));

    center.update_node_operation(&op_id, "holder-a", "failed", None, Some("deploy failed: ssh unreachable")).await.unwrap();
    let twice = center.update_node_operation(&op_id, "holder-a", "failed", None, Some("again")).await.unwrap_err();
    assert!(twice.is_conflict(), "{twice}");
    let op = sim.op(&op_id).await;
    assert_eq!(op["status"], "failed");
    assert_eq!(op["terminalReports"], 1, "at most one terminal report");
    assert_eq!(op["claims"], 1);
    assert_eq!(op["progressReports"], 1);

    // A lease that is not renewed expires: the operation is queued again and the old token dies.
    let op2 = sim.intent("s-lease").await;
    let first = center.claim_node_operation(&op2, "holder-a", 1).await.unwrap();
    let t1 = first.identity.unwrap().claim_token.expose_secret().to_string();
    eventually("lease expiry requeues", PATIENCE, || async {
        let ops = center.list_node_operations(&OpFilter { id: Some(op2.clone()), ..OpFilter::default() }).await.ok()?;
        ops.into_iter().find(|o| o.status == "queued" && o.holder.is_none())
    })
    .await
    .unwrap();
    let late = center.update_node_operation(&op2, "holder-a", "in_progress", None, None).await.unwrap_err();
    assert!(late.is_conflict(), "the old holder lost the lease: {late}");
    let second = center.claim_node_operation(&op2, "holder-b", 600).await.unwrap();
    let t2 = second.identity.unwrap().claim_token.expose_secret().to_string();
    assert_ne!(t1, t2, "a new claim issues a new token");
    let op = sim.op(&op2).await;
    assert_eq!(op["claims"], 2);
    assert_eq!(op["leaseExpiries"], 1);
    assert_eq!(op["holder"], "holder-b");
}

#[tokio::test]
async fn the_sweep_fails_an_operation_whose_node_never_registers() {
    let sim = spawn_sim(None);
    let center = sim.center();
    sim.faults(json!({"operationTimeoutMs": 700})).await;
    let op_id = sim.intent("s-sweep").await;
    center.claim_node_operation(&op_id, "h", 600).await.unwrap();
    center.update_node_operation(&op_id, "h", "in_progress", None, None).await.unwrap();
    let op = eventually("sweep", PATIENCE, || async {
        let op = sim.op(&op_id).await;
        (op["status"] == "failed").then_some(op)
    })
    .await
    .unwrap();
    assert!(op["error"].as_str().unwrap().contains("did not register"), "{op}");
    assert_eq!(op["terminalReports"], 0, "the sweep is Center's, not a report");
    let late = center.update_node_operation(&op_id, "h", "failed", None, Some("x")).await.unwrap_err();
    assert!(late.is_conflict());
}

#[tokio::test]
async fn the_catalogue() {
    let sim = spawn_sim(None);
    let center = sim.center();
    let accounts = center.list_cloud_accounts().await.unwrap();
    assert_eq!(accounts.len(), 2);
    assert_eq!((accounts[1].account_name.as_str(), accounts[1].provider.as_str()), ("sim-vultr", "vultr"));
    assert_eq!(accounts[0].account_name, "sim-lightsail");
    assert_eq!(accounts[0].provider, "lightsail");
    assert_eq!(accounts[0].default_key_name.as_deref(), Some("pn-admin"));
    let regions = center.list_cloud_regions("sim-lightsail").await.unwrap();
    let ids: Vec<&str> = regions.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["ap-southeast-1", "ap-northeast-1", "eu-central-1", "us-west-2", "us-east-1", "sa-east-1"]);
    let plans = center.list_cloud_plans("sim-lightsail", "eu-central-1").await.unwrap();
    let small = plans.iter().find(|p| p.id == "small_1tb").unwrap();
    assert_eq!((small.transfer_bytes, small.price_monthly), (1 << 40, 5.0));
    let xl = plans.iter().find(|p| p.id == "xlarge_5tb").unwrap();
    assert_eq!((xl.transfer_bytes, xl.price_monthly), (5 << 40, 40.0));
    let sa = center.list_cloud_plans("sim-lightsail", "sa-east-1").await.unwrap();
    assert_eq!(sa.len(), 1);
    assert_eq!((sa[0].id.as_str(), sa[0].transfer_bytes, sa[0].price_monthly), ("nano_512g", 512 << 30, 3.5));
    let images = center.list_cloud_images("sim-lightsail", "ap-southeast-1").await.unwrap();
    let versions: Vec<(&str, &str)> = images.iter().map(|i| (i.os.as_str(), i.version.as_str())).collect();
    assert_eq!(versions, [("ubuntu", "20.04"), ("ubuntu", "22.04"), ("ubuntu", "24.04"), ("debian", "12")]);
    assert!(center.list_cloud_regions("nope").await.unwrap_err().is_conflict());

    // Names are not unique; deleted instances leave the list but stay visible to the admin API.
    let (a, ip_a) = sim.running_instance(&center, "pn-dup").await;
    let (b, ip_b) = sim.running_instance(&center, "pn-dup").await;
    assert_ne!(a.id, b.id);
    assert_ne!(ip_a, ip_b, "distinct loopback addresses");
    assert_eq!(center.list_cloud_instances(Some("pn-dup")).await.unwrap().len(), 2);
    center.delete_cloud_instance(&a.id).await.unwrap();
    center.delete_cloud_instance(&a.id).await.unwrap();
    let left = center.list_cloud_instances(Some("pn-dup")).await.unwrap();
    assert_eq!(left.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), [b.id.as_str()]);
    assert!(center.get_cloud_instance(&a.id).await.unwrap_err().is_conflict());
    let adm = sim.instance_admin(&a.id).await;
    assert_eq!(adm["status"], "deleted");
    assert!(adm["deletedAt"].is_string());
    assert!(sim.violations().await.iter().any(|v| v["kind"] == "duplicate_instance" && v["instanceId"] == b.id.as_str()));
    // A deleted instance's sshd is gone.
    assert!(kit::ssh::connect(&sim.target(&ip_a, sim.fresh, None)).await.is_err());
}

// ---------- nodes ----------

type Seen = Arc<Mutex<Vec<(String, Value)>>>;

/// A stand-in meter: records every POST /slave/usage (Authorization header, JSON body).
async fn meter_receiver() -> (String, Seen) {
    async fn usage(State(seen): State<Seen>, headers: HeaderMap, body: axum::body::Bytes) -> axum::Json<Value> {
        let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        seen.lock().unwrap().push((auth, v));
        axum::Json(json!({"ok": true}))
    }
    let seen: Seen = Arc::default();
    let app = Router::new().route("/slave/usage", post(usage)).with_state(seen.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    (url, seen)
}

#[tokio::test]
async fn a_node_goes_from_prep_to_registered_private_and_metered() {
    let (meter_url, seen) = meter_receiver().await;
    let sim = spawn_sim(Some(&meter_url));
    sim.faults(json!({"bootDelayMs": 100, "prepDelayMs": 100, "registrationDelayMs": 50, "usageIntervalMs": 200})).await;
    let center = sim.center();
    let op_id = sim.intent("walk1").await;
    let claimed = center.claim_node_operation(&op_id, "claimer-1", 600).await.unwrap();
    let identity = claimed.identity.unwrap();
    let (inst, ip) = sim.running_instance(&center, "pn-walk1").await;
    center.update_node_operation(&op_id, "claimer-1", "in_progress", Some(json!({"instanceId": inst.id, "ipv4": ip})), None).await.unwrap();

    // Fresh host: the admin key only, on the fresh port.
    let fresh = kit::ssh::connect(&sim.target(&ip, sim.fresh, None)).await.unwrap();
    let host_key = fresh.host_key.clone();
    assert!(host_key.starts_with("ssh-ed25519 "));
    assert_eq!(run(&fresh, "true", None).await.status, 0);
    let mut stranger = sim.target(&ip, sim.fresh, None);
    let (other_pem, _) = kit::ssh::generate_ed25519().unwrap();
    stranger.key = Arc::new(kit::ssh::parse_private_key(&other_pem).unwrap());
    assert!(matches!(kit::ssh::connect(&stranger).await, Err(SshError::AuthRefused { .. })));
    let no_docker = run(&fresh, "sudo docker logs --tail 20 k2s 2>&1", None).await;
    assert_ne!(no_docker.status, 0, "docker is not installed before the prep");
    let unknown = run(&fresh, "uname -a", None).await;
    assert_eq!(unknown.status, 127);

    // The prep moves SSH to the hardened port.
    let prep = run(&fresh, "sudo bash -s", Some(b"#!/bin/bash\nset -euo pipefail\necho provisioning\n")).await;
    assert_eq!(prep.status, 0, "{}", prep.stderr_tail());
    assert!(prep.stdout_str().contains("[16/16]"));
    fresh.close().await;
    assert!(kit::ssh::connect(&sim.target(&ip, sim.fresh, None)).await.is_err(), "the fresh port refuses after the prep");
    let s = kit::ssh::connect(&sim.target(&ip, sim.hardened, Some(host_key.clone()))).await.unwrap();
    assert_eq!(s.host_key.split_whitespace().nth(1), host_key.split_whitespace().nth(1));

    // Files (secrets over stdin), then pull + up -d.
    let secret = testkit::rand_hex(32);
    let env = env_file(&secret, identity.claim_token.expose_secret(), &identity.center_url, "pn-walk1");
    assert_eq!(run(&s, "sudo mkdir -p /apps/kaitu-slave", None).await.status, 0);
    let tee = run(&s, "sudo tee /apps/kaitu-slave/.env > /dev/null", Some(env.as_bytes())).await;
    assert_eq!((tee.status, tee.stdout.len()), (0, 0));
    assert_eq!(run(&s, "sudo chmod 600 /apps/kaitu-slave/.env", None).await.status, 0);
    for (file, body) in
        [("docker-compose.yml", STACK_COMPOSE), ("users", ""), ("auto-update.sh", "#!/bin/sh\n")]
    {
        let out = run(&s, &format!("sudo tee /apps/kaitu-slave/{file} > /dev/null"), Some(body.as_bytes())).await;
        assert_eq!(out.status, 0, "{file}: {}", out.stderr_tail());
    }
    let disk = sim.dir.path().join("nodes/pn-walk1/.env");
    assert_eq!(std::fs::read_to_string(&disk).unwrap(), env);
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&disk).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let pull = run(&s, "cd /apps/kaitu-slave && sudo docker compose -f docker-compose.yml pull", None).await;
    assert_eq!(pull.status, 0, "{}", pull.stderr_tail());
    let up = run(&s, "cd /apps/kaitu-slave && sudo docker compose -f docker-compose.yml up -d", None).await;
    assert_eq!(up.status, 0, "{}", up.stderr_tail());

    // The sidecar registers with the claim: the operation is done, the node private.
    let op = eventually("operation done", PATIENCE, || async {
        let op = sim.op(&op_id).await;
        (op["status"] == "done").then_some(op)
    })
    .await
    .unwrap();
    assert_eq!(op["nodeName"], "pn-walk1");
    assert_eq!(op["claims"], 1);
    let nodes = center.list_nodes(Some("pn-walk1")).await.unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].class, "private");
    assert_eq!(nodes[0].ip_type, "residential");
    assert_eq!(nodes[0].ipv4, ip);
    assert_eq!(nodes[0].tunnels[0].domain, format!("{}.sslip.io", ip.replace('.', "-")));
    let adm_nodes = sim.get("/admin/nodes").await;
    assert_eq!(adm_nodes["items"][0]["subId"], "walk1");
    assert!(center.update_node("pn-walk1", true).await.unwrap().hidden);
    assert!(center.list_nodes(Some("pn-walk1")).await.unwrap()[0].hidden);
    assert!(center.update_node("pn-nope", true).await.unwrap_err().is_conflict());

    let k2s = run(&s, "sudo docker logs --tail 20 k2s 2>&1", None).await;
    assert!(k2s.stdout_str().contains("server ready listen=:443"), "{}", k2s.stdout_str());
    eventually("sidecar logs", PATIENCE, || async {
        let out = s.exec("sudo docker logs --tail 80 k2-sidecar 2>&1", None, CMD_TIMEOUT).await.ok()?;
        let text = out.stdout_str();
        (text.contains("Registration completed tunnels=1")
            && text.contains("DIAG: usage-reporter-start")
            && text.contains("DIAG: usage-reporter-cycle-ok"))
        .then_some(())
    })
    .await
    .unwrap();

    // Usage reaches the meter (the ingress's copy) with the node's credentials, unchanged.
    let want_auth = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{ip}:{secret}")));
    let first = eventually("a usage post", PATIENCE, || async { seen.lock().unwrap().first().cloned() }).await.unwrap();
    assert_eq!(first.0, want_auth);
    assert!(first.1["rxBytes"].as_u64().unwrap() > 0);
    assert!(first.1["bootId"].is_string() && first.1["at"].is_string());
    let (code, _) = sim.send(reqwest::Method::POST, "/admin/nodes/pn-walk1/traffic", json!({"bytes": 1_000_000_000u64})).await;
    assert_eq!(code, 200);
    eventually("the traffic is reported", PATIENCE, || async {
        let seen = seen.lock().unwrap();
        seen.iter().any(|(_, b)| b["rxBytes"].as_u64().unwrap_or(0) + b["txBytes"].as_u64().unwrap_or(0) >= 1_000_000_000).then_some(())
    })
    .await
    .unwrap();
    eventually("trafficUsedBytes advances", PATIENCE, || async {
        let i = center.get_cloud_instance(&inst.id).await.ok()?;
        (i.traffic_used_bytes >= 1_000_000_000).then_some(())
    })
    .await
    .unwrap();
    // Center's own ledger, in its admin view too (the first report was the baseline).
    let n = &sim.get("/admin/nodes").await["items"][0];
    assert!(n["trafficUsedBytes"].as_u64().unwrap() >= 1_000_000_000, "{n}");
    assert_eq!(n["quotaCutoff"], false, "1 GB of a large quota: {n}");

    // Re-running up -d is idempotent.
    let again = run(&s, "cd /apps/kaitu-slave && sudo docker compose -f docker-compose.yml up -d", None).await;
    assert_eq!(again.status, 0);
    let adm = sim.instance_admin(&inst.id).await;
    assert_eq!((adm["prepRuns"].as_u64(), adm["upRuns"].as_u64()), (Some(1), Some(2)));
    assert_eq!((adm["hardened"].as_bool(), adm["containersUp"].as_bool()), (Some(true), Some(true)));
    assert_eq!(adm["sshPort"].as_u64(), Some(u64::from(sim.hardened)));
    assert_eq!(sim.op(&op_id).await["status"], "done");

    // A clean walk breaks no guardrail; the sim knows the secrets for leak scans.
    assert_eq!(sim.violations().await, Vec::<Value>::new());
    let secrets = sim.get("/admin/secrets").await;
    assert!(secrets["claimTokens"].as_array().unwrap().iter().any(|t| t == identity.claim_token.expose_secret()));
    assert!(secrets["nodeSecrets"].as_array().unwrap().iter().any(|t| t == &secret));

    // Nothing secret in the simulator's own log.
    if std::env::var_os("TEST_LOG").is_none() {
        let log = std::fs::read_to_string(sim.dir.path().join("sim.log")).unwrap();
        assert!(log.contains("node registered"), "the log is captured");
        assert!(!log.contains(identity.claim_token.expose_secret()) && !log.contains(&secret), "a secret in the log");
    }

    // A rekeyed instance presents a different host key: the pinned client refuses it.
    s.close().await;
    let (code, rekeyed) = sim.send(reqwest::Method::POST, &format!("/admin/instances/{}/rekey", inst.id), json!({})).await;
    assert_eq!(code, 200);
    assert_ne!(rekeyed["hostKey"].as_str().unwrap().split_whitespace().nth(1), host_key.split_whitespace().nth(1));
    let mitm = kit::ssh::connect(&sim.target(&ip, sim.hardened, Some(host_key.clone()))).await;
    assert!(matches!(mitm, Err(SshError::HostKeyChanged { .. })), "{:?}", mitm.err());

    // A reboot resets the counters and re-registers; the operation stays done.
    let before = sim.instance_admin(&inst.id).await["bootId"].clone();
    let (code, _) = sim.send(reqwest::Method::POST, "/admin/nodes/pn-walk1/reboot", json!({})).await;
    assert_eq!(code, 200);
    assert_ne!(sim.instance_admin(&inst.id).await["bootId"], before);
    eventually("re-registration", PATIENCE, || async {
        let n = sim.get("/admin/nodes").await;
        (n["items"][0]["registrations"].as_u64() == Some(2)).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(sim.op(&op_id).await["status"], "done");
}

#[tokio::test]
async fn a_node_without_a_claim_is_shared_and_reports_nothing() {
    let (meter_url, seen) = meter_receiver().await;
    let sim = spawn_sim(Some(&meter_url));
    sim.faults(json!({"bootDelayMs": 50, "prepDelayMs": 50, "registrationDelayMs": 20, "usageIntervalMs": 100})).await;
    let center = sim.center();
    let (_, ip) = sim.running_instance(&center, "pn-shared1").await;
    let s = sim.prepped(&ip).await;
    let env = env_file(&testkit::rand_hex(32), "", &sim.url, "pn-shared1");
    assert_eq!(run(&s, "sudo tee /apps/kaitu-slave/.env > /dev/null", Some(env.as_bytes())).await.status, 0);
    assert_eq!(run(&s, "sudo tee /apps/kaitu-slave/docker-compose.yml > /dev/null", Some(STACK_COMPOSE.as_bytes())).await.status, 0);
    assert_eq!(run(&s, "cd /apps/kaitu-slave && sudo docker compose -f docker-compose.yml up -d", None).await.status, 0);
    eventually("reporter disabled", PATIENCE, || async {
        let out = s.exec("sudo docker logs --tail 30 k2-sidecar 2>&1", None, CMD_TIMEOUT).await.ok()?;
        out.stdout_str().contains("Usage reporter disabled (not a private node)").then_some(())
    })
    .await
    .unwrap();
    let nodes = center.list_nodes(Some("pn-shared1")).await.unwrap();
    assert_eq!(nodes[0].class, "shared");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(seen.lock().unwrap().is_empty(), "a shared node never posts usage");
}

#[tokio::test]
async fn guardrail_breaches_show_up_in_violations() {
    let sim = spawn_sim(None);
    sim.faults(json!({"bootDelayMs": 50, "prepDelayMs": 50})).await;
    let center = sim.center();
    let (inst, ip) = sim.running_instance(&center, "pn-guard").await;
    let s = sim.prepped(&ip).await;

    let outside = run(&s, "sudo tee /etc/ssh/sshd_config > /dev/null", Some(b"PermitRootLogin yes\n")).await;
    assert_eq!(outside.status, 1);
    let down = run(&s, "cd /apps/kaitu-slave && sudo docker compose -f docker-compose.yml down", None).await;
    let _ = down.status; // the compose file is missing; the attempt alone is the breach
    let leak = run(&s, "echo K2_NODE_SECRET=abcdef0123 | sudo tee -a /apps/kaitu-slave/.env", None).await;
    assert_eq!(leak.status, 127);

    // A .env carrying another subscription's claim.
    let other = sim.intent("someone-else").await;
    let claim = center.claim_node_operation(&other, "h", 600).await.unwrap().identity.unwrap();
    let env = env_file(&testkit::rand_hex(32), claim.claim_token.expose_secret(), &sim.url, "pn-guard");
    assert_eq!(run(&s, "sudo tee /apps/kaitu-slave/.env > /dev/null", Some(env.as_bytes())).await.status, 0);

    let v = sim.violations().await;
    let kinds: Vec<&str> = v.iter().map(|x| x["kind"].as_str().unwrap()).collect();
    for want in ["write_outside_deploy_dir", "down", "secret_on_command_line", "foreign_claim"] {
        assert!(kinds.contains(&want), "{want} missing in {kinds:?}");
    }
    assert!(v.iter().all(|x| x["instanceId"] == inst.id.as_str()));
    let text = serde_json::to_string(&v).unwrap();
    assert!(!text.contains("abcdef0123") && !text.contains(claim.claim_token.expose_secret()), "violations never quote a secret");
    assert!(!sim.dir.path().join("nodes/pn-guard/sshd_config").exists());
}

// ---------- faults ----------

#[tokio::test]
async fn fault_knobs_take_effect_and_are_deterministic_for_a_seed() {
    let sim = spawn_sim(None);
    let center = sim.center_with(1);

    sim.faults(json!({"centerErrorRate": 1.0})).await;
    for _ in 0..10 {
        let e = center.list_cloud_accounts().await.unwrap_err();
        assert!(e.is_transient(), "{e}");
    }
    sim.faults(json!({"centerErrorRate": 0.0})).await;
    for _ in 0..10 {
        center.list_cloud_accounts().await.unwrap();
    }

    async fn outcomes(center: &McpCenter) -> Vec<bool> {
        let mut v = Vec::new();
        for _ in 0..40 {
            v.push(center.list_cloud_accounts().await.is_ok());
        }
        v
    }
    sim.faults(json!({"centerErrorRate": 0.5, "seed": 42})).await;
    let a = outcomes(&center).await;
    sim.faults(json!({"seed": 42})).await;
    let b = outcomes(&center).await;
    assert_eq!(a, b, "same seed, same faults");
    assert!(a.contains(&true) && a.contains(&false), "{a:?}");
    sim.faults(json!({"centerErrorRate": 0.0})).await;

    sim.faults(json!({"createFailRate": 1.0})).await;
    let req = CreateInstance {
        account_name: "sim-lightsail".into(),
        region: "us-east-1".into(),
        plan: "medium_2tb".into(),
        image_id: "ubuntu-24-04".into(),
        name: "pn-f".into(),
    };
    let e = center.create_cloud_instance(&req).await.unwrap_err();
    assert!(e.is_transient() && e.to_string().contains("plan unavailable"), "{e}");
    sim.faults(json!({"createFailRate": 0.0, "claimConflictRate": 1.0})).await;
    let op = sim.intent("s-faults").await;
    assert!(center.claim_node_operation(&op, "h", 600).await.unwrap_err().is_conflict());
    sim.faults(json!({"claimConflictRate": 0.0})).await;
    center.claim_node_operation(&op, "h", 600).await.unwrap();

    // The cloud and node knobs.
    sim.faults(json!({"bootDelayMs": 20, "prepDelayMs": 20, "noIpRate": 1.0})).await;
    let req = CreateInstance { name: "pn-noip".into(), ..req };
    let created = center.create_cloud_instance(&req).await.unwrap();
    let noip = eventually("running without an address", PATIENCE, || async {
        center.get_cloud_instance(&created.id).await.ok().filter(|i| i.status == "running")
    })
    .await
    .unwrap();
    assert_eq!(noip.ipv4, None);
    sim.faults(json!({"noIpRate": 0.0, "sshDropRate": 1.0})).await;
    let (dropper, ip) = sim.running_instance(&center, "pn-drop").await;
    for _ in 0..3 {
        let e = kit::ssh::connect(&sim.target(&ip, sim.fresh, None)).await.err().expect("every connection drops");
        assert!(e.is_transient(), "{e}");
    }
    sim.faults(json!({"sshDropRate": 0.0, "prepFailRate": 1.0})).await;
    let s = kit::ssh::connect(&sim.target(&ip, sim.fresh, None)).await.unwrap();
    let prep = run(&s, "sudo bash -s", Some(b"echo prep\n")).await;
    assert_ne!(prep.status, 0);
    assert!(prep.stderr_tail().contains("dpkg"), "{}", prep.stderr_tail());
    sim.faults(json!({"prepFailRate": 0.0})).await;
    assert_eq!(run(&s, "sudo bash -s", Some(b"echo prep\n")).await.status, 0, "the prep is idempotent and succeeds now");
    let adm = sim.instance_admin(&dropper.id).await;
    assert_eq!((adm["prepRuns"].as_u64(), adm["hardened"].as_bool()), (Some(2), Some(true)));

    let (code, v) = sim.send(reqwest::Method::PUT, "/admin/faults", json!({"centerErrorRate": 2})).await;
    assert_eq!(code, 400, "{v}");
    let (code, v) = sim.send(reqwest::Method::PUT, "/admin/faults", json!({"noSuchKnob": 1})).await;
    assert_eq!(code, 400, "{v}");
    assert_eq!(sim.get("/admin/faults").await["claimConflictRate"], 0.0);
}

#[tokio::test]
async fn mcp_requires_the_bearer_token() {
    let sim = spawn_sim(None);
    let r = sim
        .http
        .post(format!("{}/mcp", sim.url))
        .bearer_auth("wrong")
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let bad = McpCenter::new(ClientConfig::new(&sim.url, Duration::from_secs(5)), SecretString::from("nope".to_string())).unwrap();
    assert!(!bad.list_cloud_accounts().await.unwrap_err().is_transient());
    let tools = sim.center().call("list_cloud_accounts", json!({})).await.unwrap();
    assert_eq!(tools["total"], 2);
}

// ---------- the cloud and the nodes (issue #19) ----------

/// The provider firewall (`providerFirewall`): only 22 until `open_cloud_instance_port`; a Pnp
/// prep (`keep-22`) leaves sshd on 22 too; the close-22 script over a session on the hardened
/// port closes 22, and over 22 while the hardened port never answered it is `closed_22_blind`
/// — and the node is locked out. `cloud-init status` says `error` on a broken instance that
/// the provider shows running.
#[tokio::test]
async fn the_provider_firewall_keep_22_close_22_and_cloud_init_status() {
    let sim = spawn_sim(None);
    sim.faults(json!({"bootDelayMs": 20, "prepDelayMs": 20, "providerFirewall": true})).await;
    let center = sim.center();
    let launcher: &[u8] = b"# pnp:prep-start v1 keep-22\nexit 0\n";
    let status: &[u8] = b"# pnp:prep-status v1\n";
    // Prep both instances with the Pnp launcher; returns a session on the fresh port.
    let prep = |ip: String| {
        let sim = &sim;
        async move {
            let s = kit::ssh::connect(&sim.target(&ip, sim.fresh, None)).await.unwrap();
            let ci = run(&s, "cloud-init status", None).await;
            assert_eq!((ci.status, ci.stdout_str().trim().to_string()), (0, "status: done".to_string()));
            assert!(run(&s, "sudo bash -s", Some(launcher)).await.stdout_str().contains("pnp-prep: started"));
            eventually("prep done", PATIENCE, || async { run(&s, "sudo bash -s", Some(status)).await.stdout_str().contains("done rc=0").then_some(()) })
                .await
                .unwrap();
            s
        }
    };

    // A: nothing opened. After the prep 22 still answers (keep-22), the hardened port is
    // refused by the firewall; closing 22 blind locks the node out and is a violation.
    let (a, ip_a) = sim.running_instance(&center, "pn-fw-a").await;
    let s = prep(ip_a.clone()).await;
    assert!(kit::ssh::connect(&sim.target(&ip_a, sim.hardened, None)).await.is_err(), "the firewall refuses the hardened port");
    let again = kit::ssh::connect(&sim.target(&ip_a, sim.fresh, None)).await.expect("22 kept after a Pnp prep");
    again.close().await;
    let adm = sim.instance_admin(&a.id).await;
    assert_eq!(adm["firewall"], json!(["22/tcp"]));
    assert!(adm["firewallRefused"].as_u64().unwrap() >= 1, "{adm}");
    assert_eq!(adm["sshPorts"].as_array().unwrap().len(), 2, "{adm}");
    let closed = run(&s, "sudo bash -s", Some(b"# pnp:close-22 v1\n")).await;
    assert_eq!((closed.status, closed.stdout_str().trim().to_string()), (0, "pnp-close-22: closed".to_string()));
    s.close().await;
    let v = sim.violations().await;
    assert!(v.iter().any(|x| x["kind"] == "closed_22_blind" && x["instanceId"] == a.id.as_str()), "{v:?}");
    assert!(kit::ssh::connect(&sim.target(&ip_a, sim.fresh, None)).await.is_err(), "22 closed");
    assert!(kit::ssh::connect(&sim.target(&ip_a, sim.hardened, None)).await.is_err(), "and 1022 shut: locked out");

    // B: 1022 opened through Center; 22 closed over the hardened session: no violation.
    let (b, ip_b) = sim.running_instance(&center, "pn-fw-b").await;
    let s = prep(ip_b.clone()).await;
    s.close().await;
    let ports = center.open_cloud_instance_port(&b.id, 1022, "tcp").await.unwrap();
    assert_eq!(ports, ["1022/tcp", "22/tcp"]);
    assert_eq!(center.open_cloud_instance_port(&b.id, 443, "udp").await.unwrap(), ["1022/tcp", "22/tcp", "443/udp"]);
    let h = kit::ssh::connect(&sim.target(&ip_b, sim.hardened, None)).await.expect("1022 answers once opened");
    let closed = run(&h, "sudo bash -s", Some(b"# pnp:close-22 v1\n")).await;
    assert_eq!(closed.stdout_str().trim(), "pnp-close-22: closed");
    assert_eq!(run(&h, "sudo bash -s", Some(b"# pnp:close-22 v1\n")).await.stdout_str().trim(), "pnp-close-22: already closed");
    h.close().await;
    assert!(kit::ssh::connect(&sim.target(&ip_b, sim.fresh, None)).await.is_err(), "22 closed");
    let adm = sim.instance_admin(&b.id).await;
    assert!(adm["hardenedLoginMs"].as_i64().unwrap() <= adm["port22ClosedMs"].as_i64().unwrap(), "{adm}");
    assert_eq!(adm["sshPorts"], json!([sim.hardened]));
    assert!(!sim.violations().await.iter().any(|x| x["instanceId"] == b.id.as_str()));
    assert!(center.open_cloud_instance_port("i-nope", 1022, "tcp").await.unwrap_err().is_conflict(), "unknown instance: 404");

    // Without the tool the call is an unknown tool.
    sim.faults(json!({"firewallTool": false})).await;
    assert!(center.open_cloud_instance_port(&b.id, 8443, "tcp").await.unwrap_err().is_unsupported());

    // A broken instance: running at the provider, `status: error` on the host.
    sim.faults(json!({"cloudInitErrorRate": 1.0, "providerFirewall": false})).await;
    let (c, ip_c) = sim.running_instance(&center, "pn-ci").await;
    assert_eq!(center.get_cloud_instance(&c.id).await.unwrap().status, "running");
    let s = kit::ssh::connect(&sim.target(&ip_c, sim.fresh, None)).await.unwrap();
    let ci = run(&s, "cloud-init status --long", None).await;
    assert_eq!((ci.status, ci.stdout_str().trim().to_string()), (1, "status: error".to_string()));
    assert_eq!(sim.instance_admin(&c.id).await["cloudInit"], "error");
}
