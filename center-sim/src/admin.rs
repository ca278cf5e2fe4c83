//! The admin API that tests and `pnctl` drive (JSON; lists are `{"items": […]}`): queue intents,
//! inspect operations, instances, nodes, violations and issued secrets, set faults, and act on
//! nodes (traffic, reboot, rekey). Open, but answers loopback callers only.
//!
//! Never: reachable from a non-loopback address.

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::center::Intent;
use crate::faults::Dice;
use crate::new_id;
use crate::node::new_host_key;
use crate::sim::Sim;

pub fn routes() -> Router<Sim> {
    Router::new()
        .route("/admin/intents", post(add_intent))
        .route("/admin/operations", get(list_operations))
        .route("/admin/operations/{id}", get(get_operation))
        .route("/admin/operations/{id}/revoke", post(revoke))
        .route("/admin/instances", get(list_instances))
        .route("/admin/instances/{id}/rekey", post(rekey))
        .route("/admin/nodes", get(list_nodes))
        .route("/admin/nodes/{name}/traffic", post(traffic))
        .route("/admin/nodes/{name}/reboot", post(reboot))
        .route("/admin/faults", get(get_faults).put(put_faults))
        .route("/admin/violations", get(violations))
        .route("/admin/secrets", get(secrets))
        .route("/admin/stats", get(stats))
        .layer(axum::middleware::from_fn(loopback_only))
}

async fn loopback_only(req: Request, next: Next) -> Response {
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    match peer {
        Some(p) if p.ip().is_loopback() => next.run(req).await,
        _ => err(StatusCode::FORBIDDEN, "the admin API answers loopback callers only"),
    }
}

fn err(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, Json(json!({"error": msg.into()}))).into_response()
}

fn parse_json<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, Box<Response>> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) { b"{}" } else { body };
    serde_json::from_slice(body).map_err(|e| Box::new(err(StatusCode::BAD_REQUEST, format!("bad JSON: {e}"))))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IntentBody {
    sub_id: Option<String>,
    region: String,
    traffic_total_bytes: u64,
    #[serde(default)]
    ip_type: Option<String>,
    #[serde(default)]
    domain: Option<String>,
}

async fn add_intent(State(sim): State<Sim>, body: Bytes) -> Response {
    let b: IntentBody = match parse_json(&body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    if b.region.trim().is_empty() {
        return err(StatusCode::BAD_REQUEST, "region is required");
    }
    if b.traffic_total_bytes == 0 {
        return err(StatusCode::BAD_REQUEST, "trafficTotalBytes must be positive");
    }
    let sub_id = b.sub_id.filter(|s| !s.trim().is_empty()).unwrap_or_else(|| hex::encode(rand::random::<[u8; 6]>()));
    if sub_id.len() > 64 || !sub_id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return err(StatusCode::BAD_REQUEST, "subId must be 1-64 of [A-Za-z0-9_-]");
    }
    let id = new_id("op");
    let intent = Intent {
        sub_id: sub_id.clone(),
        region: b.region,
        traffic_total_bytes: b.traffic_total_bytes,
        ip_type: b.ip_type.unwrap_or_else(|| "unknown".into()),
        domain: b.domain.unwrap_or_default(),
    };
    sim.st().ops.add(id.clone(), intent, kit::now_ms());
    tracing::info!(op = %id, sub = %sub_id, "intent queued");
    Json(json!({"operationId": id, "subId": sub_id})).into_response()
}

#[derive(Debug, Deserialize)]
struct OpQuery {
    status: Option<String>,
}

async fn list_operations(State(sim): State<Sim>, Query(q): Query<OpQuery>) -> Response {
    let st = sim.st_ticked();
    let status = q.status.as_deref().filter(|s| !s.is_empty());
    let items: Vec<_> = st.ops.list(None, status, None).into_iter().map(|o| o.to_admin()).collect();
    Json(json!({"items": items})).into_response()
}

async fn get_operation(State(sim): State<Sim>, Path(id): Path<String>) -> Response {
    let st = sim.st_ticked();
    match st.ops.get(&id) {
        Some(op) => Json(op.to_admin()).into_response(),
        None => err(StatusCode::NOT_FOUND, format!("operation {id} not found")),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct RevokeBody {
    /// Another agent that claims the operation at once.
    claim_by: Option<String>,
}

/// Center's operator takes a held operation's lease back: its token is revoked (a node that
/// registers with it is refused) and it is queued again — or, with `claimBy`, claimed at once
/// by that other agent (a lease lost to someone else).
async fn revoke(State(sim): State<Sim>, Path(id): Path<String>, body: Bytes) -> Response {
    let b: RevokeBody = match parse_json(&body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let claim_by = b.claim_by.filter(|h| !h.trim().is_empty()).map(|h| (h, format!("pnclaim_{}", hex::encode(rand::random::<[u8; 32]>()))));
    let mut st = sim.st_ticked();
    match st.ops.revoke(&id, claim_by.as_ref().map(|(h, t)| (h.as_str(), t.clone())), kit::now_ms()) {
        Ok(op) => {
            tracing::warn!(op = %id, claimed_by = ?claim_by.as_ref().map(|c| &c.0), "lease revoked by the operator");
            Json(json!({"operation": op})).into_response()
        }
        Err(e) => err(StatusCode::from_u16(e.code).unwrap_or(StatusCode::BAD_REQUEST), e.message),
    }
}

async fn list_instances(State(sim): State<Sim>) -> Response {
    let st = sim.st();
    let items: Vec<_> = st.cloud.ordered().into_iter().map(|i| i.to_admin()).collect();
    Json(json!({"items": items})).into_response()
}

async fn list_nodes(State(sim): State<Sim>) -> Response {
    let st = sim.st();
    let items: Vec<_> = st.nodes.values().map(|n| n.to_admin()).collect();
    Json(json!({"items": items})).into_response()
}

async fn get_faults(State(sim): State<Sim>) -> Response {
    Json(sim.st().faults.clone()).into_response()
}

async fn put_faults(State(sim): State<Sim>, body: Bytes) -> Response {
    let patch: Value = match parse_json(&body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let mut st = sim.st();
    match st.faults.merged(&patch) {
        Ok(next) => {
            if patch.get("seed").is_some() {
                st.dice = Dice::new(next.seed);
            }
            st.faults = next.clone();
            tracing::info!(faults = ?next, "faults changed");
            Json(next).into_response()
        }
        Err(e) => err(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct TrafficBody {
    /// Split evenly between rx and tx, so rx+tx advances by exactly this.
    bytes: u64,
    rx_bytes: u64,
    tx_bytes: u64,
}

/// The instance behind node `name`: the registered node's, else the newest live one so named.
fn node_instance(st: &crate::sim::State, name: &str) -> Option<String> {
    st.nodes
        .get(name)
        .and_then(|n| n.instance_id.clone())
        .filter(|id| st.cloud.instances.get(id).is_some_and(|i| i.live()))
        .or_else(|| st.cloud.live_by_name(name).map(|i| i.id.clone()))
}

async fn traffic(State(sim): State<Sim>, Path(name): Path<String>, body: Bytes) -> Response {
    let b: TrafficBody = match parse_json(&body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let mut st = sim.st();
    let Some(id) = node_instance(&st, &name) else { return err(StatusCode::NOT_FOUND, format!("node {name} not found")) };
    let Some(inst) = st.cloud.instances.get_mut(&id) else { return err(StatusCode::NOT_FOUND, "instance gone") };
    let nic = &mut inst.host.nic;
    nic.rx = nic.rx.saturating_add(b.bytes / 2).saturating_add(b.rx_bytes);
    nic.tx = nic.tx.saturating_add(b.bytes - b.bytes / 2).saturating_add(b.tx_bytes);
    let (rx, tx, boot_id) = (nic.rx, nic.tx, nic.boot_id.clone());
    if let Some(s) = &inst.host.sidecar {
        s.wake.notify_one();
    }
    Json(json!({"rxBytes": rx, "txBytes": tx, "bootId": boot_id})).into_response()
}

async fn reboot(State(sim): State<Sim>, Path(name): Path<String>) -> Response {
    let mut st = sim.st();
    let Some(id) = node_instance(&st, &name) else { return err(StatusCode::NOT_FOUND, format!("node {name} not found")) };
    let Some(inst) = st.cloud.instances.get_mut(&id) else { return err(StatusCode::NOT_FOUND, "instance gone") };
    inst.host.boot();
    if inst.host.containers_up {
        // restart: unless-stopped — the containers come back and the sidecar registers again.
        let env = inst.host.sidecar.as_ref().map(|s| s.env.clone()).unwrap_or_default();
        inst.host.stop_containers();
        inst.host.containers_up = true;
        inst.host.log_k2s("k2s starting");
        inst.host.log_k2s("server ready listen=:443");
        crate::node::sidecar::start(&sim, inst, env);
    }
    tracing::info!(instance = %id, node = %name, "node rebooted");
    Json(json!({"instanceId": id, "bootId": inst.host.nic.boot_id})).into_response()
}

async fn rekey(State(sim): State<Sim>, Path(id): Path<String>) -> Response {
    let mut st = sim.st();
    match st.cloud.instances.get_mut(&id).filter(|i| i.live()) {
        Some(inst) => {
            inst.host.host_key = new_host_key();
            tracing::warn!(instance = %id, "host key replaced (MITM drill)");
            Json(json!({"instanceId": id, "hostKey": inst.host.host_public_key()})).into_response()
        }
        None => err(StatusCode::NOT_FOUND, format!("instance {id} not found")),
    }
}

async fn violations(State(sim): State<Sim>) -> Response {
    Json(json!({"items": sim.st().violations})).into_response()
}

/// `{heldNow, heldPeak, leaseExpiries}`: operations held (claimed or in_progress) now and at
/// most at once since the start, and the leases that ran out.
async fn stats(State(sim): State<Sim>) -> Response {
    Json(sim.st_ticked().ops.stats()).into_response()
}

async fn secrets(State(sim): State<Sim>) -> Response {
    let st = sim.st();
    let mut claim_tokens: Vec<&String> = st.ops.tokens().collect();
    claim_tokens.sort();
    Json(json!({"claimTokens": claim_tokens, "nodeSecrets": st.node_secrets})).into_response()
}
