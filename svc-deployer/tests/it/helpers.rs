//! Test support: the real deployer binary as a child process (configured only by `PN_*`
//! environment), a real nats-server, a real center-sim, and one method per thing a test does
//! to them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use async_nats::HeaderMap;
use async_nats::jetstream;
use kit::center::{Center, ClientConfig, CreateInstance, McpCenter};
use kit::seal::SealKey;
use prost::Message;
use proto::{Body, Event, Instance, InstanceReady, Operation, headers, subjects};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use testkit::{Nats, Proc, eventually, free_port, rand_hex};

pub const PATIENCE: Duration = Duration::from_secs(90);
pub const CENTER_TOKEN: &str = "test-center-token";

/// A generated admin keypair on disk.
pub struct AdminKey {
    pub private_path: PathBuf,
    pub public_path: PathBuf,
    pub public: String,
}

impl AdminKey {
    pub fn create(dir: &Path) -> Result<AdminKey> {
        let (pem, public) = kit::ssh::generate_ed25519()?;
        let private_path = dir.join("admin_ed25519");
        let public_path = dir.join("admin_ed25519.pub");
        write_private(&private_path, pem.as_bytes())?;
        std::fs::write(&public_path, format!("{public}\n"))?;
        Ok(AdminKey { private_path, public_path, public })
    }
}

pub fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, data)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// A test's seal key (what `PN_SEAL_KEY` holds in the stack).
pub struct Seal {
    pub hex: SecretString,
    pub key: SealKey,
}

impl Seal {
    pub fn new() -> Seal {
        let hex = SealKey::generate_hex();
        let key = SealKey::parse(&hex).expect("generated key parses");
        Seal { hex, key }
    }
}

/// The deployer binary, started with `env` on top of the common variables.
pub struct Deployer {
    pub proc: Proc,
    pub log: PathBuf,
    pub data_dir: PathBuf,
    /// Where its /metrics are served.
    pub ops_port: u16,
}

pub struct DeployerConfig {
    pub nats_url: String,
    pub data_dir: PathBuf,
    pub center_url: String,
    pub seal_hex: SecretString,
    pub env: BTreeMap<String, String>,
}

impl DeployerConfig {
    pub fn new(nats: &Nats, data_dir: &Path, center_url: &str, seal: &Seal) -> DeployerConfig {
        DeployerConfig {
            nats_url: nats.url(),
            data_dir: data_dir.to_path_buf(),
            center_url: center_url.to_string(),
            seal_hex: seal.hex.clone(),
            env: BTreeMap::new(),
        }
    }

    pub fn set(&mut self, k: &str, v: impl Into<String>) -> &mut Self {
        self.env.insert(k.to_string(), v.into());
        self
    }
}

impl Deployer {
    pub fn start(cfg: &DeployerConfig) -> Result<Deployer> {
        std::fs::create_dir_all(&cfg.data_dir)?;
        let log = cfg.data_dir.join(format!("deployer-{}.log", rand_hex(3)));
        let ops_port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_svc-deployer"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info,svc_deployer=debug")
            .env("PN_LOG_FORMAT", "json")
            .env("PN_NATS_URL", &cfg.nats_url)
            .env("PN_DATA_DIR", &cfg.data_dir)
            .env("PN_CENTER_URL", &cfg.center_url)
            .env("PN_CENTER_TOKEN", CENTER_TOKEN)
            .env("PN_SEAL_KEY", cfg.seal_hex.expose_secret())
            .env("PN_OPS_LISTEN", format!("127.0.0.1:{ops_port}"))
            .env("PN_SSH__RETRY_DELAY_MS", "200")
            .env("PN_SSH__CONNECT_TIMEOUT_MS", "3000")
            .env("PN_SSH__REACH_PATIENCE_MS", "30000");
        for (k, v) in &cfg.env {
            cmd.env(k, v);
        }
        let proc = Proc::spawn_logged("svc-deployer", &mut cmd, &log)?;
        Ok(Deployer { proc, log, data_dir: cfg.data_dir.clone(), ops_port })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The sum of a metric's samples on the deployer's /metrics (0 when absent).
    pub async fn metric(&self, name: &str) -> Result<f64> {
        kit::init_crypto();
        let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.ops_port)).await?.text().await?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    /// Fails (with the log) if the process exited.
    pub fn assert_alive(&mut self) {
        if let Ok(Some(st)) = self.proc.child.try_wait() {
            panic!("svc-deployer exited ({st}):\n{}", self.log_text());
        }
    }
}

/// A JetStream client for the test's side of the bus.
pub struct Bus {
    pub js: jetstream::Context,
}

impl Bus {
    pub async fn connect(nats: &Nats) -> Result<Bus> {
        let bus = kit::bus::Bus::connect(&nats.url(), "it", Duration::from_secs(10)).await?;
        bus.ensure_streams().await?;
        Ok(Bus { js: bus.js })
    }

    /// Publishes an `InstanceReady` with its own msg id (so a second delivery is not deduped).
    /// Returns the stream sequence.
    pub async fn publish_instance(&self, ir: &InstanceReady, msg_id: &str) -> Result<u64> {
        let op = ir.op.as_ref().context("op")?;
        let mut h = HeaderMap::new();
        h.insert(headers::MSG_ID, msg_id);
        h.insert(headers::OP, op.operation_id.as_str());
        let payload = Event::new(Body::Instance(ir.clone())).encode_to_vec();
        let ack = self
            .js
            .publish_with_headers(subjects::op_event(subjects::INSTANCE, &op.operation_id), h, payload.into())
            .await?
            .await?;
        Ok(ack.sequence)
    }

    pub async fn publish_replay(&self, op_id: &str) -> Result<u64> {
        let ack = self.js.publish(subjects::replay(proto::Stage::Deploy), op_id.to_string().into()).await?.await?;
        Ok(ack.sequence)
    }

    /// The last body on `pn.op.<event>.<op>`, if any.
    pub async fn last(&self, event: &str, op_id: &str) -> Option<Body> {
        let stream = self.js.get_stream(subjects::OPS_STREAM).await.ok()?;
        let msg = stream.get_last_raw_message_by_subject(&subjects::op_event(event, op_id)).await.ok()?;
        Event::from_bytes(&msg.payload).ok()
    }

    /// How many messages `pn.op.<event>.<op>` holds.
    pub async fn count(&self, event: &str, op_id: &str) -> u64 {
        let Ok(stream) = self.js.get_stream(subjects::OPS_STREAM).await else { return 0 };
        let subject = subjects::op_event(event, op_id);
        match stream.info_with_subjects(subject.clone()).await {
            Ok(mut subjects) => {
                use futures::TryStreamExt;
                let mut n = 0;
                while let Ok(Some((s, c))) = subjects.try_next().await {
                    if s == subject {
                        n += c as u64;
                    }
                }
                n
            }
            Err(_) => 0,
        }
    }

    pub async fn wait_deployed(&self, op_id: &str, patience: Duration) -> Result<proto::NodeDeployed> {
        eventually(&format!("pn.op.deployed.{op_id}"), patience, || async {
            match self.last(subjects::DEPLOYED, op_id).await {
                Some(Body::Deployed(d)) => Some(d),
                _ => None,
            }
        })
        .await
    }

    pub async fn wait_failed(&self, op_id: &str, patience: Duration) -> Result<proto::OpFailed> {
        eventually(&format!("pn.op.failed.{op_id}"), patience, || async {
            match self.last(subjects::FAILED, op_id).await {
                Some(Body::Failed(f)) => Some(f),
                _ => None,
            }
        })
        .await
    }

    /// Waits until `durable` on `stream` has acknowledged everything up to `seq`.
    pub async fn wait_acked(&self, stream: &str, durable: &str, seq: u64, patience: Duration) -> Result<()> {
        eventually(&format!("{durable} to ack #{seq}"), patience, || async {
            let s = self.js.get_stream(stream).await.ok()?;
            let mut c: jetstream::consumer::PullConsumer = s.get_consumer(durable).await.ok()?;
            let info = c.info().await.ok()?;
            (info.ack_floor.stream_sequence >= seq).then_some(())
        })
        .await
    }
}

/// A running center-sim with its own data dir, ports and admin key.
pub struct Sim {
    _proc: Proc,
    pub url: String,
    pub data_dir: PathBuf,
    pub fresh_port: u16,
    pub hardened_port: u16,
    pub http: reqwest::Client,
    pub center: Arc<McpCenter>,
}

impl Sim {
    pub async fn start(dir: &Path, admin: &AdminKey) -> Result<Sim> {
        kit::init_crypto();
        let bin = testkit::bin("center-sim").context("center-sim (run `cargo build -p center-sim`)")?;
        let data_dir = dir.join("sim");
        let (fresh_port, hardened_port) = (free_port(), free_port());
        // A /24 of its own per test, so parallel tests do not race for addresses.
        let ip_start = format!("127.{}.{}.1", 100 + rand::random::<u8>() % 100, rand::random::<u8>() % 250 + 1);
        let mut cmd = Command::new(bin);
        cmd.env("PN_CENTER_TOKEN", CENTER_TOKEN)
            .env("RUST_LOG", "info")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--admin-public-key-file")
            .arg(&admin.public_path)
            .arg("--ssh-port-fresh")
            .arg(fresh_port.to_string())
            .arg("--ssh-port-hardened")
            .arg(hardened_port.to_string())
            .arg("--ip-start")
            .arg(&ip_start);
        let (proc, first) = Proc::spawn_announced("center-sim", &mut cmd, &dir.join("center-sim.log"), Duration::from_secs(30))?;
        let url = first
            .strip_prefix("center-sim listening on ")
            .map(|s| s.trim().trim_end_matches('/').to_string())
            .with_context(|| format!("unexpected first line: {first}"))?;
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
        let center = McpCenter::new(ClientConfig::new(&url, Duration::from_secs(10)), SecretString::from(CENTER_TOKEN))?;
        Ok(Sim { _proc: proc, url, data_dir, fresh_port, hardened_port, http, center })
    }

    async fn json(&self, req: reqwest::RequestBuilder) -> Result<Value> {
        let resp = req.send().await?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("center-sim admin: HTTP {status}: {v}");
        }
        Ok(v)
    }

    pub async fn faults(&self, patch: Value) -> Result<Value> {
        self.json(self.http.put(format!("{}/admin/faults", self.url)).json(&patch)).await
    }

    pub async fn operation(&self, id: &str) -> Result<Value> {
        self.json(self.http.get(format!("{}/admin/operations/{id}", self.url))).await
    }

    pub async fn instance(&self, id: &str) -> Result<Value> {
        let v = self.json(self.http.get(format!("{}/admin/instances", self.url))).await?;
        v["items"].as_array().and_then(|a| a.iter().find(|i| i["id"] == id).cloned()).with_context(|| format!("instance {id} not listed"))
    }

    pub async fn rekey(&self, id: &str) -> Result<Value> {
        self.json(self.http.post(format!("{}/admin/instances/{id}/rekey", self.url))).await
    }

    pub async fn violations(&self) -> Result<Vec<Value>> {
        let v = self.json(self.http.get(format!("{}/admin/violations", self.url))).await?;
        Ok(v["items"].as_array().cloned().unwrap_or_default())
    }

    /// The node's `.env` as the sim stored it on the node's disk.
    pub fn node_file(&self, node: &str, file: &str) -> Result<Vec<u8>> {
        let p = self.data_dir.join(node).join(file);
        std::fs::read(&p).with_context(|| format!("read {}", p.display()))
    }

    pub fn node_env(&self, node: &str) -> Result<BTreeMap<String, String>> {
        let text = String::from_utf8(self.node_file(node, ".env")?)?;
        Ok(parse_env(&text))
    }

    /// Runbook steps 1–3 done by hand: queue an intent, claim it (one-time token), create the
    /// instance through the MCP tools and wait until it runs. Returns the `InstanceReady`
    /// svc-cloud would publish, and the plaintext claim token (for leak checks).
    pub async fn ready_instance(&self, seal: &Seal, sub_id: &str) -> Result<(InstanceReady, SecretString)> {
        self.ready_instance_on(seal, sub_id, "sim-lightsail", "ubuntu-22-04").await
    }

    /// As [`Sim::ready_instance`], in `account` with `image`.
    pub async fn ready_instance_on(&self, seal: &Seal, sub_id: &str, account: &str, image: &str) -> Result<(InstanceReady, SecretString)> {
        let v = self
            .json(self.http.post(format!("{}/admin/intents", self.url)).json(&json!({
                "subId": sub_id, "region": "sg", "trafficTotalBytes": 950u64 << 30, "ipType": "residential",
            })))
            .await?;
        let op_id = v["operationId"].as_str().context("operationId")?.to_string();
        let holder = "it-holder";
        let claimed = self.center.claim_node_operation(&op_id, holder, 600).await?;
        let identity = claimed.identity.context("claim without identity")?;
        let created = self
            .center
            .create_cloud_instance(&CreateInstance {
                account_name: account.into(),
                region: "ap-southeast-1".into(),
                plan: "small_1tb".into(),
                image_id: image.into(),
                name: format!("pn-{sub_id}"),
            })
            .await?;
        let inst = eventually("instance running with an ipv4", PATIENCE, || async {
            let i = self.center.get_cloud_instance(&created.id).await.ok()?;
            (i.status == "running" && i.ipv4.is_some()).then_some(i)
        })
        .await?;
        let p = &claimed.operation.params;
        let op = Operation {
            operation_id: op_id,
            sub_id: claimed.operation.sub_id.clone(),
            region: p.region.clone(),
            traffic_total_bytes: p.traffic_total_bytes,
            ip_type: p.ip_type.clone(),
            center_url: identity.center_url.clone(),
            domain: identity.domain.clone(),
            sealed_claim_token: seal.key.seal_str(&identity.claim_token),
            holder: holder.into(),
            claimed_at_ms: kit::now_ms(),
            claim_attempt: 1,
            queued_at_ms: 0,
        };
        let instance = Instance {
            instance_id: inst.id.clone(),
            name: inst.name.clone(),
            ipv4: inst.ipv4.clone().unwrap_or_default(),
            provider: "lightsail".into(),
            account: inst.account_name.clone(),
            provider_region: inst.region.clone(),
            plan: inst.plan.clone(),
            image: inst.image_id.clone(),
            adopted: false,
        };
        Ok((InstanceReady { op: Some(op), instance: Some(instance), ready_at_ms: kit::now_ms() }, identity.claim_token))
    }
}

/// `KEY=VALUE` lines of a `.env`.
pub fn parse_env(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

pub fn sha256_hex_text(s: &str) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes()).to_vec()
}

/// Every file under `dir` whose bytes contain one of `needles` (plaintext leak scan).
pub fn files_containing(dir: &Path, needles: &[&str]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p)
                && needles.iter().any(|n| !n.is_empty() && bytes.windows(n.len()).any(|w| w == n.as_bytes()))
            {
                hits.push(p);
            }
        }
    }
    hits
}

/// Same host key (algorithm and key material; comments ignored).
pub fn same_key(a: &str, b: &str) -> bool {
    let t = |s: &str| s.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
    !t(a).is_empty() && t(a) == t(b)
}

/// A stand-in for the Hetzner Cloud API's `GET /v1/servers/<id>` (the only call the deployer
/// makes with `PN_PROVIDER=hetzner`), answering for `servers` (id, name, IPv4) with the
/// documented shape; unknown ids get the documented 404. Returns the API's base URL.
pub async fn hetzner_stub(token: &str, servers: Vec<(String, String, String)>) -> Result<String> {
    use axum::extract::{Path as UrlPath, State};
    use axum::http::{HeaderMap, StatusCode};
    type S = Arc<(String, Vec<(String, String, String)>)>;
    async fn get_server(State(s): State<S>, h: HeaderMap, UrlPath(id): UrlPath<String>) -> (StatusCode, axum::Json<Value>) {
        if h.get("authorization").and_then(|v| v.to_str().ok()) != Some(&format!("Bearer {}", s.0)) {
            return (StatusCode::UNAUTHORIZED, axum::Json(json!({"error": {"code": "unauthorized", "message": "unable to authenticate"}})));
        }
        match s.1.iter().find(|(i, _, _)| *i == id) {
            Some((i, name, ip)) => (
                StatusCode::OK,
                axum::Json(json!({"server": {
                    "id": i.parse::<u64>().unwrap_or(0), "name": name, "status": "running",
                    "public_net": {"ipv4": {"ip": ip, "blocked": false}, "ipv6": null},
                    "server_type": {"name": "cx22"}, "datacenter": {"location": {"name": "fsn1"}},
                    "image": {"name": "ubuntu-24.04"}, "labels": {"managed-by": "pnp"}
                }})),
            ),
            None => (StatusCode::NOT_FOUND, axum::Json(json!({"error": {"code": "not_found", "message": "server not found"}}))),
        }
    }
    let app = axum::Router::new().route("/v1/servers/{id}", axum::routing::get(get_server)).with_state(Arc::new((token.to_string(), servers)));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    Ok(format!("http://{addr}/v1"))
}

/// A foreign host: plain TCP listeners on a loopback address no instance has, on the given
/// ports, counting every connection that arrives (none may: the deployer must not connect to
/// an address the provider did not confirm).
pub struct Trap {
    pub ip: String,
    pub hits: Arc<std::sync::atomic::AtomicUsize>,
}

impl Trap {
    pub async fn bind(ports: &[u16]) -> Result<Trap> {
        for _ in 0..50 {
            let ip = format!("127.250.{}.{}", rand::random::<u8>(), 1 + rand::random::<u8>() % 250);
            let mut listeners = Vec::new();
            for p in ports {
                match tokio::net::TcpListener::bind((ip.as_str(), *p)).await {
                    Ok(l) => listeners.push(l),
                    Err(_) => break,
                }
            }
            if listeners.len() != ports.len() {
                continue;
            }
            let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            for l in listeners {
                let hits = hits.clone();
                tokio::spawn(async move {
                    while let Ok((_conn, _)) = l.accept().await {
                        hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                });
            }
            return Ok(Trap { ip, hits });
        }
        bail!("no free loopback address for the trap")
    }

    pub fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }
}
