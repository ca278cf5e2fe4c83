//! Center's node-facing ingress: `POST /slave/register` (a sidecar announces itself; a valid
//! claim makes the node private, binds the owner and sets the operation `done`) and
//! `POST /slave/usage` (forwarded as is — body and Basic credentials — to `--meter-url`, like
//! Center's ingress in front of the meter).
//!
//! Never: echo a credential or a claim in an answer or a log line.

use std::net::Ipv4Addr;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::center::ClaimCheck;
use crate::sim::{NodeRec, Sim};

const MAX_BODY: usize = 64 * 1024;

pub fn routes() -> Router<Sim> {
    Router::new().route("/slave/register", post(register)).route("/slave/usage", post(usage))
}

/// `Authorization: Basic base64(ipv4:secret)`.
fn basic(headers: &HeaderMap) -> Option<(Ipv4Addr, String)> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let b64 = v.strip_prefix("Basic ").or_else(|| v.strip_prefix("basic "))?;
    let raw = base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()?;
    let s = String::from_utf8(raw).ok()?;
    let (ip, secret) = s.split_once(':')?;
    let ip: Ipv4Addr = ip.parse().ok()?;
    (!secret.is_empty()).then(|| (ip, secret.to_string()))
}

fn err(code: StatusCode, msg: &str) -> Response {
    (code, axum::Json(json!({"error": msg}))).into_response()
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RegisterBody {
    pub name: String,
    pub region: String,
    #[serde(alias = "ip_type")]
    pub ip_type: String,
    #[serde(alias = "private_claim")]
    pub private_claim: String,
    pub domain: String,
}

async fn register(State(sim): State<Sim>, headers: HeaderMap, body: Bytes) -> Response {
    let Some((ip, secret)) = basic(&headers) else {
        return err(StatusCode::UNAUTHORIZED, "Basic ipv4:secret credentials required");
    };
    if body.len() > MAX_BODY {
        return err(StatusCode::PAYLOAD_TOO_LARGE, "body too large");
    }
    let Ok(b) = serde_json::from_slice::<RegisterBody>(&body) else {
        return err(StatusCode::BAD_REQUEST, "malformed registration");
    };
    match sim.register_node(ip, &secret, b) {
        Ok(node) => (StatusCode::OK, axum::Json(json!({"data": {"node": node}}))).into_response(),
        Err((code, msg)) => err(code, msg),
    }
}

/// Center's normalization of `ipType`.
fn normalize_ip_type(t: &str) -> &'static str {
    match t {
        "residential" => "residential",
        "non_residential" => "non_residential",
        _ => "unknown",
    }
}

impl Sim {
    fn register_node(&self, ip: Ipv4Addr, secret: &str, b: RegisterBody) -> Result<kit::center::Node, (StatusCode, &'static str)> {
        let name = b.name.trim().to_string();
        if name.is_empty() || name.len() > 255 {
            return Err((StatusCode::BAD_REQUEST, "name is required"));
        }
        let now = kit::now_ms();
        let mut guard = self.st_ticked();
        let st = &mut *guard;
        let (class, owner, op_id) = if b.private_claim.is_empty() {
            ("shared", None, None)
        } else {
            match st.ops.register_claim(&b.private_claim, &name, now) {
                ClaimCheck::Accepted { op_id, sub_id, activated } => {
                    if activated {
                        tracing::info!(op = %op_id, node = %name, "node registered with its claim: operation done");
                    }
                    ("private", Some(sub_id), Some(op_id))
                }
                ClaimCheck::Refused(why) => {
                    tracing::info!(node = %name, %ip, why, "registration refused");
                    return Err((StatusCode::FORBIDDEN, why));
                }
            }
        };
        st.learn_node_secret(secret);
        let instance_id = st.cloud.live_by_ip(ip).map(|i| i.id.clone());
        let domain =
            if b.domain.trim().is_empty() { format!("{}.sslip.io", ip.to_string().replace('.', "-")) } else { b.domain.trim().to_string() };
        let prev = st.nodes.get(&name);
        let rec = NodeRec {
            name: name.clone(),
            ipv4: ip.to_string(),
            region: b.region,
            class: class.into(),
            ip_type: normalize_ip_type(&b.ip_type).into(),
            hidden: prev.is_some_and(|p| p.hidden),
            domain,
            owner_sub_id: owner,
            operation_id: op_id,
            instance_id,
            registered_ms: now,
            registrations: prev.map(|p| p.registrations).unwrap_or(0) + 1,
            usage_reports: prev.map(|p| p.usage_reports).unwrap_or(0),
            secret: secret.to_string(),
        };
        let wire = rec.to_wire();
        st.nodes.insert(name.clone(), rec);
        tracing::info!(node = %name, %ip, class, "node registered");
        Ok(wire)
    }

    /// Counts a usage report the meter accepted towards the instance's `trafficUsedBytes`.
    fn record_usage(&self, headers: &HeaderMap, body: &[u8]) {
        let Some((ip, secret)) = basic(headers) else { return };
        let Ok(v) = serde_json::from_slice::<Value>(body) else { return };
        let num = |a: &str, b: &str| v.get(a).or_else(|| v.get(b)).and_then(Value::as_u64).unwrap_or(0);
        let total = num("rxBytes", "rx_bytes").saturating_add(num("txBytes", "tx_bytes"));
        let boot = v.get("bootId").or_else(|| v.get("boot_id")).and_then(Value::as_str).unwrap_or("").to_string();
        let mut guard = self.st();
        let st = &mut *guard;
        let ip_s = ip.to_string();
        let Some(node) = st.nodes.values_mut().find(|n| n.ipv4 == ip_s && n.secret == secret) else { return };
        node.usage_reports += 1;
        let inst_id = node.instance_id.clone();
        let inst = match inst_id {
            Some(id) => st.cloud.instances.get_mut(&id),
            None => st.cloud.instances.values_mut().find(|i| i.live() && i.ipv4 == Some(ip)),
        };
        if let Some(inst) = inst {
            inst.traffic_used_bytes = inst.host.usage.observe(&boot, total);
        }
    }
}

async fn usage(State(sim): State<Sim>, headers: HeaderMap, body: Bytes) -> Response {
    if body.len() > MAX_BODY {
        return err(StatusCode::PAYLOAD_TOO_LARGE, "body too large");
    }
    let (status, answer) = match &sim.cfg.meter_url {
        Some(meter) => {
            let mut req = sim
                .http
                .post(format!("{}/slave/usage", meter.trim_end_matches('/')))
                .header(header::CONTENT_TYPE.as_str(), "application/json")
                .body(body.to_vec());
            if let Some(a) = headers.get(header::AUTHORIZATION).and_then(|a| a.to_str().ok()) {
                req = req.header(header::AUTHORIZATION.as_str(), a);
            }
            match req.send().await {
                Ok(r) => {
                    let code = StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
                    (code, r.bytes().await.map(|b| b.to_vec()).unwrap_or_default())
                }
                Err(_) => (StatusCode::BAD_GATEWAY, br#"{"error":"meter unreachable"}"#.to_vec()),
            }
        }
        None => (StatusCode::ACCEPTED, br#"{"accepted":true}"#.to_vec()),
    };
    if status.is_success() {
        sim.record_usage(&headers, &body);
    }
    (status, [(header::CONTENT_TYPE, "application/json")], answer).into_response()
}
