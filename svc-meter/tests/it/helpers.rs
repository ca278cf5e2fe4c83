//! Test helpers: the real `svc-meter` binary in a testkit stack (real nats-server, real
//! center-sim), synthetic deployments published on PN_OPS, and readers for PN_METER.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Result, bail};
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use futures::StreamExt;
use kit::bus::{Bus, Meta};
use proto::{Body, Event, Instance, NodeDeployed, Operation, Stage, subjects};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use testkit::Nats;
use testkit::stack::Stack;

// ---------- the meter in a stack ----------

/// The real `svc-meter` binary in a testkit stack: a real nats-server and the real center-sim
/// (Center's MCP tools, its own `/slave/usage` ledger behind `pn-ingress`, which mirrors the
/// reports to the meter, its admin API).
pub struct Meter {
    pub stack: Stack,
    pub bus: Bus,
    pub http: reqwest::Client,
}

impl Meter {
    /// Starts the stack with only svc-meter; `env` overrides its `PN_*` settings.
    pub async fn start(env: &[(&str, &str)]) -> Result<Meter> {
        let mut b = Stack::builder()
            .only(&["svc-meter"])
            .env("svc-meter", "PN_MIN_REPORT_INTERVAL_MS", "0")
            .env("svc-meter", "PN_CENTER_TIMEOUT_MS", "2000")
            .env("svc-meter", "RUST_LOG", "info,svc_meter=debug");
        for (k, v) in env {
            b = b.env("svc-meter", k, v);
        }
        let stack = b.start().await?;
        let bus = bus(&stack.nats).await?;
        let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build()?;
        let m = Meter { stack, bus, http };
        m.wait_ingest().await?;
        Ok(m)
    }

    pub fn url(&self) -> &str {
        &self.stack.meter_url
    }

    /// `/readyz` (ops) answers before the ledger is loaded; wait for the ingest port too.
    async fn wait_ingest(&self) -> Result<()> {
        let url = format!("{}/healthz", self.url());
        testkit::eventually("svc-meter ingest answers", Duration::from_secs(30), || {
            let (http, url) = (self.http.clone(), url.clone());
            async move { http.get(&url).send().await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
        })
        .await
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.stack.log_path("svc-meter")).unwrap_or_default()
    }

    /// SIGKILL (no graceful shutdown, no final flush).
    pub fn kill(&mut self) {
        self.stack.kill("svc-meter");
    }

    /// Starts again on the same data directory and port (after `kill`, or SIGKILLs first).
    pub async fn restart(&mut self) -> Result<()> {
        self.stack.restart("svc-meter").await?;
        self.wait_ingest().await
    }

    /// Registers the node at Center (the sim) as its sidecar does, so that `update_node`
    /// finds it.
    pub async fn register_at_center(&self, n: &TestNode) -> Result<()> {
        let r = self
            .http
            .post(format!("{}/slave/register", self.stack.center_url))
            .header("authorization", n.auth())
            .json(&json!({"name": n.name, "region": "sg", "ipType": "residential"}))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("register at center-sim: {}", r.status());
        }
        Ok(())
    }

    /// The node's `hidden` flag at Center (the sim's admin view).
    pub async fn hidden_at_center(&self, node: &str) -> Option<bool> {
        let items = self.stack.items("/admin/nodes").await.ok()?;
        items.iter().find(|n| n["name"] == node).and_then(|n| n["hidden"].as_bool())
    }

    pub async fn post_raw(&self, auth: Option<&str>, body: impl Into<reqwest::Body>) -> Result<(u16, String)> {
        self.post_to(self.url(), auth, body).await
    }

    async fn post_to(&self, base: &str, auth: Option<&str>, body: impl Into<reqwest::Body>) -> Result<(u16, String)> {
        let mut req = self.http.post(format!("{base}/slave/usage")).header("content-type", "application/json").body(body);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = req.send().await?;
        let status = r.status().as_u16();
        Ok((status, r.text().await?))
    }

    pub async fn report(&self, node: &TestNode, rx: u64, tx: u64, boot: &str, at_s: i64) -> Result<(u16, Value)> {
        let body = json!({"rxBytes": rx, "txBytes": tx, "bootId": boot, "at": at(at_s)}).to_string();
        let (s, text) = self.post_raw(Some(&node.auth()), body).await?;
        Ok((s, serde_json::from_str(&text).unwrap_or(Value::String(text))))
    }

    /// A report that must be accepted.
    pub async fn ok(&self, node: &TestNode, rx: u64, tx: u64, boot: &str, at_s: i64) -> Result<Value> {
        let (s, v) = self.report(node, rx, tx, boot, at_s).await?;
        if s != 200 {
            bail!("report answered {s}: {v}");
        }
        Ok(v)
    }

    /// A report sent the way nodes send it: to Center's host (`pn-ingress`), which answers
    /// with Center's own answer and mirrors the report to the meter. Returns the meter's view
    /// of it once its copy is in the ledger: `{outcome, deltaBytes, usedBytes}`.
    pub async fn ok_via_center(&self, node: &TestNode, rx: u64, tx: u64, boot: &str, at_s: i64) -> Result<Value> {
        let body = json!({"rxBytes": rx, "txBytes": tx, "bootId": boot, "at": at(at_s)}).to_string();
        let (s, text) = self.post_to(&self.stack.ingress_url, Some(&node.auth()), body).await?;
        if s != 200 {
            bail!("report via Center's host answered {s}: {text}");
        }
        testkit::eventually("the mirrored report reaches the meter's ledger", Duration::from_secs(20), || async {
            let u = self.usage(&node.name).await.ok()?;
            let last = &u["lastReport"];
            (last["rxBytes"] == rx && last["txBytes"] == tx && last["bootId"] == boot)
                .then(|| json!({"outcome": last["outcome"], "deltaBytes": last["deltaBytes"], "usedBytes": u["usedBytes"]}))
        })
        .await
    }

    pub async fn get(&self, path: &str) -> Result<(u16, Value)> {
        let r = self.http.get(format!("{}{path}", self.url())).send().await?;
        let s = r.status().as_u16();
        let text = r.text().await?;
        Ok((s, serde_json::from_str(&text).unwrap_or(Value::String(text))))
    }

    pub async fn admission(&self, node: &str) -> Result<(u16, Value)> {
        self.get(&format!("/v1/admission/{node}")).await
    }

    /// GET on the meter's internal listener (the ledger), with its token.
    pub async fn internal_get(&self, path: &str) -> Result<(u16, Value)> {
        let r = self.stack.meter_internal(reqwest::Method::GET, path).send().await?;
        let s = r.status().as_u16();
        let text = r.text().await?;
        Ok((s, serde_json::from_str(&text).unwrap_or(Value::String(text))))
    }

    pub async fn usage(&self, node: &str) -> Result<Value> {
        let (s, v) = self.internal_get(&format!("/v1/nodes/{node}/usage")).await?;
        if s != 200 {
            bail!("usage of {node}: {s} {v}");
        }
        Ok(v)
    }

    pub async fn used(&self, node: &str) -> Result<u64> {
        Ok(self.usage(node).await?["usedBytes"].as_u64().unwrap_or(u64::MAX))
    }

    pub async fn set_quota(&self, node: &str, sold: u64) -> Result<(u16, Value)> {
        let r = self.stack.meter_internal(reqwest::Method::PUT, &format!("/v1/nodes/{node}/quota")).json(&json!({"soldBytes": sold})).send().await?;
        let s = r.status().as_u16();
        Ok((s, r.json().await.unwrap_or_default()))
    }

    /// Publishes the node's deployment and waits until the meter knows it.
    pub async fn deploy(&self, n: &TestNode, sold: u64) -> Result<()> {
        deploy(&self.bus, n, sold, kit::now_ms(), "lightsail", 1).await?;
        self.wait_known(&n.name).await
    }

    /// Waits until the meter knows `node` (its deployment was consumed).
    pub async fn wait_known(&self, node: &str) -> Result<()> {
        testkit::eventually(&format!("the meter learns {node}"), Duration::from_secs(20), || async move {
            self.admission(node).await.ok().filter(|(s, _)| *s != 404).map(|_| ())
        })
        .await
    }
}

/// RFC 3339 for `s` seconds after 2026-01-01.
pub fn at(s: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(1_767_225_600 + s).unwrap();
    t.format(&time::format_description::well_known::Rfc3339).unwrap()
}

// ---------- nodes and NATS ----------

#[derive(Debug, Clone)]
pub struct TestNode {
    pub name: String,
    pub ip: Ipv4Addr,
    pub secret: String,
    pub op: String,
}

impl TestNode {
    pub fn new() -> TestNode {
        let id = testkit::rand_hex(4);
        let b: [u8; 3] = rand::random();
        TestNode {
            name: format!("pn-t{id}"),
            ip: Ipv4Addr::new(10, b[0], b[1], b[2].max(1)),
            secret: testkit::rand_hex(32),
            op: format!("op-{id}"),
        }
    }

    pub fn auth(&self) -> String {
        svc_meter::auth::basic_header(self.ip, &self.secret)
    }
}

pub async fn bus(nats: &Nats) -> Result<Bus> {
    let b = Bus::connect(&nats.url(), "svc-meter-it", Duration::from_secs(10)).await?;
    b.ensure_streams().await?;
    Ok(b)
}

/// Publishes `pn.op.deployed.<op>` as the deployer would.
pub async fn deploy(bus: &Bus, n: &TestNode, sold: u64, deployed_at_ms: i64, provider: &str, attempt: u32) -> Result<()> {
    let ev = NodeDeployed {
        op: Some(Operation { operation_id: n.op.clone(), sub_id: format!("sub-{}", n.name), claim_attempt: attempt, ..Default::default() }),
        instance: Some(Instance { ipv4: n.ip.to_string(), provider: provider.into(), name: n.name.clone(), ..Default::default() }),
        node_name: n.name.clone(),
        node_secret_sha256: Sha256::digest(n.secret.as_bytes()).to_vec(),
        sold_bytes: sold,
        deployed_at_ms,
        private_node: true,
        ..Default::default()
    };
    let meta = Meta::outcome(&n.op, "sub", Stage::Deploy, attempt);
    bus.publish(subjects::op_event(subjects::DEPLOYED, &n.op), Body::Deployed(ev), &meta).await?;
    Ok(())
}

/// The last message on `subject` in PN_METER, decoded.
pub async fn last(bus: &Bus, subject: &str) -> Option<Body> {
    let stream = bus.js.get_stream(subjects::METER_STREAM).await.ok()?;
    let m = stream.get_last_raw_message_by_subject(subject).await.ok()?;
    Event::from_bytes(&m.payload).ok()
}

/// Every message on `subject` in PN_METER, in order, with its `Nats-Msg-Id`.
pub async fn all(bus: &Bus, subject: &str) -> Result<Vec<(String, Body)>> {
    let stream = bus.js.get_stream(subjects::METER_STREAM).await?;
    let consumer = stream
        .create_consumer(pull::Config {
            filter_subject: subject.to_string(),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::None,
            ..Default::default()
        })
        .await?;
    let mut out = Vec::new();
    let mut batch = consumer.fetch().max_messages(10_000).expires(Duration::from_millis(500)).messages().await?;
    while let Some(m) = batch.next().await {
        let m = m.map_err(|e| anyhow::anyhow!("{e}"))?;
        let id = m.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")).map(|v| v.to_string()).unwrap_or_default();
        out.push((id, Event::from_bytes(&m.payload).map_err(|e| anyhow::anyhow!("{e}"))?));
    }
    Ok(out)
}

pub fn usage_of(b: &Body) -> Option<&proto::UsageRecorded> {
    match b {
        Body::Usage(u) => Some(u),
        _ => None,
    }
}

pub fn quota_of(b: &Body) -> Option<&proto::QuotaChanged> {
    match b {
        Body::Quota(q) => Some(q),
        _ => None,
    }
}
