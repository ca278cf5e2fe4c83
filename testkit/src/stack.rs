//! A whole Pnp stack for a test: a real nats-server, the real `center-sim` and the five real
//! service binaries, each a child process configured only by environment (as `pnctl up` and
//! the k8s manifests do), with per-test overrides. Killed on drop. Logs are kept per process
//! in the stack's directory so tests can scan them for secrets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use secrecy::ExposeSecret;
use serde_json::{Value, json};

use crate::{Nats, Proc, bin, free_port};

pub const SERVICES: [&str; 5] = ["svc-claimer", "svc-cloud", "svc-deployer", "svc-verifier", "svc-meter"];
/// The services that hold the seal key (the claim token and the node secret are sealed and
/// unsealed only there); the others start without `PN_SEAL_KEY`.
pub const SEAL_KEY_USERS: [&str; 2] = ["svc-claimer", "svc-deployer"];

pub struct StackBuilder {
    env: BTreeMap<String, BTreeMap<String, String>>,
    sim_args: Vec<String>,
    services: Vec<&'static str>,
}

impl Default for StackBuilder {
    fn default() -> Self {
        StackBuilder { env: BTreeMap::new(), sim_args: Vec::new(), services: SERVICES.to_vec() }
    }
}

impl StackBuilder {
    /// Sets `key=value` in `service`'s environment (overrides the defaults).
    pub fn env(mut self, service: &str, key: &str, value: &str) -> Self {
        self.env.entry(service.to_string()).or_default().insert(key.to_string(), value.to_string());
        self
    }

    pub fn sim_arg(mut self, arg: &str) -> Self {
        self.sim_args.push(arg.to_string());
        self
    }

    /// Starts only these services (center-sim and NATS always run).
    pub fn only(mut self, services: &[&'static str]) -> Self {
        self.services = services.to_vec();
        self
    }

    pub async fn start(self) -> Result<Stack> {
        Stack::start(self).await
    }
}

pub struct Stack {
    pub nats: Nats,
    pub sim: Proc,
    /// `pn-ingress` in front of center-sim: Center's public host as the nodes see it (every
    /// request to center-sim, `POST /slave/usage` also mirrored to the meter).
    pub ingress: Proc,
    /// The router's URL: the claims' `centerUrl`, so the nodes' `K2_CENTER_URL`.
    pub ingress_url: String,
    pub procs: BTreeMap<String, Proc>,
    pub dir: tempfile::TempDir,
    pub center_url: String,
    /// The meter's public listener: `/slave/usage`, `/v1/admission/<node>`, `/healthz`.
    pub meter_url: String,
    /// The meter's internal listener (the ledger, quota changes), with [`Stack::meter_internal_token`]:
    /// use [`Stack::meter_internal`].
    pub meter_internal_url: String,
    pub meter_internal_token: String,
    /// The operator token (`PN_OPS_TOKEN`) of svc-cloud's and svc-claimer's mutating ops
    /// routes (`kit::ops::OPS_TOKEN_USERS`); also in `<dir>/secrets/ops-token` (mode 600).
    pub ops_token: String,
    pub token: String,
    pub seal_key: String,
    pub fresh_port: u16,
    pub hardened_port: u16,
    env: BTreeMap<String, BTreeMap<String, String>>,
    http: reqwest::Client,
}

/// Where a stack process's log goes: `<dir>/logs/<name>.log`.
fn log_in(dir: &Path, name: &str) -> PathBuf {
    dir.join("logs").join(format!("{name}.log"))
}

impl Stack {
    pub fn builder() -> StackBuilder {
        StackBuilder::default()
    }

    async fn start(b: StackBuilder) -> Result<Stack> {
        kit::init_crypto();
        let dir = tempfile::tempdir()?;
        let nats = Nats::start()?;
        let secrets = dir.path().join("secrets");
        std::fs::create_dir_all(&secrets)?;
        let token = crate::rand_hex(16);
        let seal_key = kit::seal::SealKey::generate_hex().expose_secret().to_string();
        let (pem, public) = kit::ssh::generate_ed25519().map_err(|e| anyhow::anyhow!("{e}"))?;
        write_600(&secrets.join("ssh-admin-key"), &pem)?;
        std::fs::write(secrets.join("ssh-admin-key.pub"), &public)?;
        let meter_port = free_port();
        let meter_url = format!("http://127.0.0.1:{meter_port}");
        let meter_internal_url = format!("http://127.0.0.1:{}", free_port());
        let meter_internal_token = crate::rand_hex(24);
        let ops_token = crate::rand_hex(24);
        write_600(&secrets.join("ops-token"), &ops_token)?;
        let fresh_port = free_port();
        let hardened_port = free_port();
        let ingress_port = free_port();
        let ingress_url = format!("http://127.0.0.1:{ingress_port}");
        let ip_start = format!("127.{}.{}.1", 10 + rand::random::<u8>() % 240, rand::random::<u8>() % 250);
        let mut cmd = Command::new(bin("center-sim")?);
        cmd.args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("sim"))
            .args(["--public-url", &ingress_url, "--admin-public-key-file"])
            .arg(secrets.join("ssh-admin-key.pub"))
            .args(["--ssh-port-fresh", &fresh_port.to_string(), "--ssh-port-hardened", &hardened_port.to_string()])
            .args(["--ip-start", &ip_start, "--seed", "7"])
            .args(&b.sim_args)
            .env("PN_CENTER_TOKEN", &token)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
        let (sim, first) = Proc::spawn_announced("center-sim", &mut cmd, &log_in(dir.path(), "center-sim"), Duration::from_secs(20))?;
        let center_url = first.rsplit(' ').next().unwrap_or_default().trim().to_string();
        if !center_url.starts_with("http://") {
            bail!("center-sim's first line is not its address: {first}");
        }
        let ingress = spawn_ingress(dir.path(), ingress_port, &center_url, &meter_url)?;
        let mut stack = Stack {
            nats,
            sim,
            ingress,
            ingress_url,
            procs: BTreeMap::new(),
            dir,
            center_url,
            meter_url,
            meter_internal_url,
            meter_internal_token,
            ops_token,
            token,
            seal_key,
            fresh_port,
            hardened_port,
            env: b.env,
            http: reqwest::Client::new(),
        };
        for s in &b.services {
            stack.spawn(s)?;
        }
        for s in &b.services {
            stack.wait_ready(s).await?;
        }
        Ok(stack)
    }

    /// The router's counters (`GET /_pn_ingress/stats`): `forwarded`, `mirrorQueued`,
    /// `mirrorOk`, `mirrorDropped`, `mirrorFailed`, …
    pub async fn ingress_stats(&self) -> Result<Value> {
        let r = self.http.get(format!("{}/_pn_ingress/stats", self.ingress_url)).send().await?;
        Ok(r.json().await?)
    }

    /// The environment a service starts with.
    pub fn service_env(&self, name: &str) -> BTreeMap<String, String> {
        let d = self.dir.path();
        let keys = format!("sim-lightsail={}", d.join("secrets/ssh-admin-key").display());
        // Each service connects as itself (kit::nats_auth), with the dev stack's permissions.
        let mut e: BTreeMap<String, String> = [
            ("PN_NATS_URL", self.nats.plain_url()),
            ("PN_NATS_USER", name.to_string()),
            ("PN_NATS_PASSWORD", self.nats.password(name).unwrap_or_default()),
            ("PN_CENTER_URL", self.center_url.clone()),
            ("PN_CENTER_TOKEN", self.token.clone()),
            ("PN_DATA_DIR", d.join("data").display().to_string()),
            ("PN_LOG_FORMAT", "json".into()),
            ("PN_ACK_WAIT_MS", "5000".into()),
            ("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into())),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        // The seal key only where something is sealed or unsealed.
        if SEAL_KEY_USERS.contains(&name) {
            e.insert("PN_SEAL_KEY".into(), self.seal_key.clone());
        }
        // The operator token only where a mutating ops route is.
        if kit::ops::OPS_TOKEN_USERS.contains(&name) {
            e.insert("PN_OPS_TOKEN".into(), self.ops_token.clone());
        }
        let extra: &[(&str, String)] = match name {
            "svc-claimer" => &[("PN_POLL_INTERVAL_MS", "200".into())],
            "svc-cloud" => &[
                ("PN_BOOT_POLL_MS", "100".into()),
                ("PN_CREATE_RETRY_PAUSE_MS", "300".into()),
                ("PN_REAP_GRACE_MS", "1000".into()),
                // An uncertain reap (Center down at reap time) is looked at again this soon.
                ("PN_REAP_RECHECK_MS", "2000".into()),
                ("PN_NO_IP_TIMEOUT_MS", "2000".into()),
            ],
            "svc-deployer" => &[
                ("PN_SSH__ADMIN_KEYS", keys.clone()),
                ("PN_SSH__FRESH_PORT", self.fresh_port.to_string()),
                ("PN_SSH__HARDENED_PORT", self.hardened_port.to_string()),
            ],
            "svc-verifier" => &[
                ("PN_SSH__ADMIN_KEYS", keys.clone()),
                ("PN_DEADLINE_MS", "60000".into()),
                ("PN_POLL_MIN_MS", "200".into()),
                ("PN_POLL_MAX_MS", "1000".into()),
            ],
            "svc-meter" => &[
                ("PN_LISTEN", self.meter_url.trim_start_matches("http://").to_string()),
                ("PN_INTERNAL_LISTEN", self.meter_internal_url.trim_start_matches("http://").to_string()),
                ("PN_INTERNAL_TOKEN", self.meter_internal_token.clone()),
                ("PN_USAGE_INTERVAL_MS", "1000".into()),
            ],
            _ => &[],
        };
        for (k, v) in extra {
            e.insert(k.to_string(), v.clone());
        }
        if let Some(over) = self.env.get(name) {
            e.extend(over.clone());
        }
        e
    }

    /// Starts (or restarts) a service binary with a fresh ops port.
    /// `svc-claimer#2` runs a second replica of `svc-claimer` with its own state directory.
    pub fn spawn(&mut self, name: &str) -> Result<()> {
        let (binary, replica) = name.split_once('#').unwrap_or((name, ""));
        let mut env = self.service_env(binary);
        if let Some(over) = self.env.get(name) {
            env.extend(over.clone());
        }
        env.insert("PN_OPS_LISTEN".into(), format!("127.0.0.1:{}", free_port()));
        if !replica.is_empty() {
            env.insert("PN_DATA_DIR".into(), self.dir.path().join(format!("data-{replica}")).display().to_string());
        }
        let mut cmd = Command::new(bin(binary)?);
        cmd.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default()).envs(&env);
        let mut proc = Proc::spawn_logged(name, &mut cmd, &log_in(self.dir.path(), name))?;
        proc.name = env.get("PN_OPS_LISTEN").cloned().unwrap_or_default();
        self.procs.insert(name.to_string(), proc);
        Ok(())
    }

    /// Waits until the service's /readyz answers 200 (or its process died: an error with its log).
    pub async fn wait_ready(&mut self, name: &str) -> Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut respawns = 0;
        loop {
            let Some(p) = self.procs.get_mut(name) else { bail!("{name} not started") };
            if let Ok(Some(st)) = p.child.try_wait() {
                let tail = self.log_tail(name, 20);
                // free_port's pick can be taken by another test's process before the service
                // binds it; `spawn` picks a fresh ops port, so start it again (a harness race,
                // not the service's fault).
                if respawns < 3 && tail.contains("ops listen") && tail.contains("Address already in use") {
                    respawns += 1;
                    self.spawn(name)?;
                    continue;
                }
                bail!("{name} exited ({st}) during start:\n{tail}");
            }
            let url = format!("http://{}/readyz", p.name);
            if let Ok(r) = self.http.get(&url).timeout(Duration::from_secs(1)).send().await
                && r.status().is_success() {
                    return Ok(());
                }
            if std::time::Instant::now() > deadline {
                bail!("{name} not ready after 30s:\n{}", self.log_tail(name, 20));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        log_in(self.dir.path(), name)
    }

    pub fn log_tail(&self, name: &str, n: usize) -> String {
        let s = std::fs::read_to_string(self.log_path(name)).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// SIGKILL a service (no chance to flush or ack).
    pub fn kill(&mut self, name: &str) {
        if let Some(mut p) = self.procs.remove(name) {
            p.kill();
        }
    }

    /// SIGKILL then start again.
    pub async fn restart(&mut self, name: &str) -> Result<()> {
        self.kill(name);
        self.spawn(name)?;
        self.wait_ready(name).await
    }

    pub fn pid(&self, name: &str) -> Option<u32> {
        self.procs.get(name).map(Proc::pid)
    }

    // ---------- the simulator's admin API ----------

    pub async fn admin_get(&self, path: &str) -> Result<Value> {
        let r = self.http.get(format!("{}{path}", self.center_url)).send().await?;
        let st = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        if !st.is_success() {
            bail!("GET {path}: {st} {v}");
        }
        Ok(v)
    }

    pub async fn admin_send(&self, method: reqwest::Method, path: &str, body: Value) -> Result<Value> {
        let r = self.http.request(method, format!("{}{path}", self.center_url)).json(&body).send().await?;
        let st = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        if !st.is_success() {
            bail!("{path}: {st} {v}");
        }
        Ok(v)
    }

    /// Enqueues an intent; returns (operationId, subId).
    pub async fn intent(&self, region: &str, traffic_total_bytes: u64, ip_type: &str) -> Result<(String, String)> {
        let v = self
            .admin_send(reqwest::Method::POST, "/admin/intents", json!({"region": region, "trafficTotalBytes": traffic_total_bytes, "ipType": ip_type}))
            .await?;
        let op = v["operationId"].as_str().context("operationId")?.to_string();
        let sub = v["subId"].as_str().unwrap_or_default().to_string();
        Ok((op, sub))
    }

    pub async fn faults(&self, f: Value) -> Result<Value> {
        self.admin_send(reqwest::Method::PUT, "/admin/faults", f).await
    }

    pub async fn operation(&self, id: &str) -> Result<Value> {
        self.admin_get(&format!("/admin/operations/{id}")).await
    }

    pub async fn items(&self, path: &str) -> Result<Vec<Value>> {
        let v = self.admin_get(path).await?;
        Ok(v["items"].as_array().cloned().unwrap_or_default())
    }

    /// Waits until the operation's status is one of `want`; returns the operation.
    pub async fn wait_status(&self, id: &str, want: &[&str], patience: Duration) -> Result<Value> {
        crate::eventually(&format!("operation {id} in {want:?}"), patience, || async {
            let v = self.operation(id).await.ok()?;
            want.contains(&v["status"].as_str().unwrap_or("")).then_some(v)
        })
        .await
    }

    /// A request to the meter's internal API (`path` like `/v1/nodes/<node>/usage`), with its
    /// token.
    pub fn meter_internal(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.meter_internal_url)).bearer_auth(&self.meter_internal_token)
    }

    /// The meter's ledger view of `node` (`GET /v1/nodes/<node>/usage` on the internal
    /// listener): the JSON on 200, an error otherwise.
    pub async fn meter_usage(&self, node: &str) -> Result<Value> {
        let r = self.meter_internal(reqwest::Method::GET, &format!("/v1/nodes/{node}/usage")).send().await?;
        let st = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        if !st.is_success() {
            bail!("GET /v1/nodes/{node}/usage: {st} {v}");
        }
        Ok(v)
    }

    /// Every log file's text, for secret scans.
    pub fn all_logs(&self) -> String {
        let mut s = String::new();
        if let Ok(rd) = std::fs::read_dir(self.dir.path().join("logs")) {
            for e in rd.flatten() {
                s.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
        s
    }
}

/// Starts `pn-ingress` on `port` in front of `upstream`, mirroring `/slave/usage` to `mirror`,
/// and waits for its address line.
fn spawn_ingress(dir: &Path, port: u16, upstream: &str, mirror: &str) -> Result<Proc> {
    let mut cmd = Command::new(bin("pn-ingress")?);
    cmd.args(["--listen", &format!("127.0.0.1:{port}"), "--upstream", upstream, "--mirror", mirror])
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .env("PN_LOG_FORMAT", "json");
    let (proc, first) = Proc::spawn_announced("pn-ingress", &mut cmd, &log_in(dir, "pn-ingress"), Duration::from_secs(20))?;
    if !first.starts_with("pn-ingress listening on http://") {
        bail!("pn-ingress's first line is not its address: {first}");
    }
    Ok(proc)
}

fn write_600(path: &Path, content: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(path)?;
    std::io::Write::write_all(&mut f, content.as_bytes())?;
    Ok(())
}

impl Stack {
    /// Every event PN_OPS holds, decoded, by operation id, oldest first (undecodable ones
    /// skipped).
    pub async fn events_by_op(&self) -> Result<std::collections::HashMap<String, Vec<proto::Body>>> {
        let bus = kit::bus::Bus::connect(&self.nats.url(), "test", Duration::from_secs(5)).await?;
        let mut s = bus.js.get_stream(proto::subjects::OPS_STREAM).await.context("PN_OPS")?;
        let last = s.info().await.context("PN_OPS info")?.state.last_sequence;
        let mut out: std::collections::HashMap<String, Vec<proto::Body>> = Default::default();
        for seq in 1..=last {
            if let Ok(m) = s.get_raw_message(seq).await
                && let Ok(b) = proto::Event::from_bytes(&m.payload)
            {
                let op = proto::subjects::op_id_of(&m.subject).unwrap_or("").to_string();
                out.entry(op).or_default().push(b);
            }
        }
        Ok(out)
    }

    /// Every event PN_OPS holds for `op`, decoded, oldest first.
    pub async fn events_of(&self, op: &str) -> Result<Vec<proto::Body>> {
        Ok(self.events_by_op().await?.remove(op).unwrap_or_default())
    }

    /// The event names of `evs` (`claimed`, `instance`, …), in order.
    pub fn kinds(evs: &[proto::Body]) -> Vec<&'static str> {
        evs.iter().map(proto::Body::event_name).collect()
    }
}

impl Stack {
    /// The claim tokens and node secrets the simulator handed out or received.
    pub async fn known_secrets(&self) -> Result<Vec<String>> {
        let v = self.admin_get("/admin/secrets").await?;
        let mut out = Vec::new();
        for k in ["claimTokens", "nodeSecrets"] {
            for s in v[k].as_array().cloned().unwrap_or_default() {
                if let Some(s) = s.as_str().filter(|s| s.len() >= 8) {
                    out.push(s.to_string());
                }
            }
        }
        out.push(self.token.clone());
        out.push(self.seal_key.clone());
        out.push(self.meter_internal_token.clone());
        out.push(self.ops_token.clone());
        // Every deployment identity's NATS password (the services', the operator's); the
        // harness's own (`TEST_USER`) travels in test URLs on purpose.
        for i in kit::nats_auth::all() {
            out.extend(self.nats.password(&i.user));
        }
        Ok(out)
    }

    /// Where any known secret appears in plaintext: every log file, every message of every
    /// stream (headers and bodies), every file of every service's state directory and of the
    /// NATS store. Returns one line per finding (without the secret itself).
    pub async fn secret_findings(&self) -> Result<Vec<String>> {
        let secrets = self.known_secrets().await?;
        let mut findings = Vec::new();
        let mut check = |what: &str, hay: &[u8]| {
            for (i, s) in secrets.iter().enumerate() {
                if hay.windows(s.len()).any(|w| w == s.as_bytes()) {
                    findings.push(format!("secret #{i} found in {what}"));
                }
            }
        };
        if let Ok(rd) = std::fs::read_dir(self.dir.path().join("logs")) {
            for e in rd.flatten() {
                check(&format!("log {}", e.path().display()), &std::fs::read(e.path()).unwrap_or_default());
            }
        }
        let client = async_nats_connect(&self.nats.url()).await?;
        for stream in [proto::subjects::OPS_STREAM, proto::subjects::METER_STREAM, proto::subjects::REPLAY_STREAM] {
            for (seq, bytes) in stream_dump(&client, stream).await? {
                check(&format!("{stream} message {seq}"), &bytes);
            }
        }
        for root in [self.dir.path().join("data"), self.nats.store.clone()] {
            for f in walk(&root) {
                check(&format!("file {}", f.display()), &std::fs::read(&f).unwrap_or_default());
            }
        }
        Ok(findings)
    }
}

async fn async_nats_connect(url: &str) -> Result<kit::bus::Bus> {
    Ok(kit::bus::Bus::connect(url, "testkit-scan", Duration::from_secs(5)).await?)
}

/// Every message of a stream as bytes (headers rendered, then payload).
pub async fn stream_dump(bus: &kit::bus::Bus, stream: &str) -> Result<Vec<(u64, Vec<u8>)>> {
    let mut s = bus.js.get_stream(stream).await?;
    let info = s.info().await?;
    let mut out = Vec::new();
    for seq in info.state.first_sequence..=info.state.last_sequence {
        if seq == 0 {
            continue;
        }
        if let Ok(m) = s.get_raw_message(seq).await {
            let mut bytes = format!("{} {:?}", m.subject, m.headers).into_bytes();
            bytes.extend_from_slice(&m.payload);
            out.push((seq, bytes));
        }
    }
    Ok(out)
}

/// Every file below `root`.
pub fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p);
                }
            }
        }
    }
    out
}

/// Samples every process's `/proc/*/cmdline` until `stop` is set; returns the distinct command
/// lines seen (secrets are issued during the run, so they are matched afterwards).
pub fn sample_cmdlines(stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> std::thread::JoinHandle<std::collections::HashSet<Vec<u8>>> {
    std::thread::spawn(move || {
        let mut seen = std::collections::HashSet::new();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(rd) = std::fs::read_dir("/proc") {
                for e in rd.flatten() {
                    if let Ok(b) = std::fs::read(e.path().join("cmdline"))
                        && !b.is_empty() {
                            seen.insert(b);
                        }
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        seen
    })
}

/// Findings of `secrets` in sampled command lines.
pub fn cmdline_findings(seen: &std::collections::HashSet<Vec<u8>>, secrets: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for b in seen {
        for (i, s) in secrets.iter().enumerate() {
            if b.windows(s.len()).any(|w| w == s.as_bytes()) {
                out.push(format!("secret #{i} on a command line: {}", String::from_utf8_lossy(b).split('\0').next().unwrap_or("")));
            }
        }
    }
    out
}
