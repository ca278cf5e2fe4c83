//! MCP over streamable HTTP at `POST /mcp`: JSON-RPC 2.0 (`initialize` with an
//! `Mcp-Session-Id`, `notifications/*` → 202, `ping`, `tools/list`, `tools/call`), bearer auth,
//! and the tools with Center's semantics. A tool answers `{"data": …}` or
//! `{"error": {"code": 409|404|422|400|503, "message": …}}` as the text content of the result.
//! Fault injection (latency, transient errors, claim conflicts) happens here, before any effect.
//!
//! Never: return a claim token except in `claim_node_operation`'s answer.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use secrecy::ExposeSecret;
use serde::Serialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use crate::center::{DEFAULT_LEASE_SECONDS, MAX_LEASE_SECONDS};
use crate::cloud::{self, CreateArgs};
use crate::sim::{Sim, Violation};

/// A tool's error envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolError {
    pub code: u16,
    pub message: String,
}

impl ToolError {
    pub fn new(code: u16, message: impl Into<String>) -> ToolError {
        ToolError { code, message: message.into() }
    }
    pub fn bad_request(m: impl Into<String>) -> ToolError {
        ToolError::new(400, m)
    }
    pub fn not_found(m: impl Into<String>) -> ToolError {
        ToolError::new(404, m)
    }
    pub fn conflict(m: impl Into<String>) -> ToolError {
        ToolError::new(409, m)
    }
    pub fn rejected(m: impl Into<String>) -> ToolError {
        ToolError::new(422, m)
    }
    pub fn unavailable(m: impl Into<String>) -> ToolError {
        ToolError::new(503, m)
    }
}

type ToolResult = Result<Value, ToolError>;

/// MCP protocol versions this server implements, newest first. `initialize` answers the
/// client's version when it is one of these, else the newest (the client then decides).
const PROTOCOL_VERSIONS: [&str; 2] = ["2025-06-18", "2025-03-26"];
const PROTOCOL_VERSION: &str = PROTOCOL_VERSIONS[0];
const DEFAULT_PAGE_SIZE: u64 = 20;
const MAX_PAGE_SIZE: u64 = 100;
const MAX_SESSIONS: usize = 10_000;

fn authorized(sim: &Sim, headers: &HeaderMap) -> bool {
    let Some(v) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else { return false };
    let Some(tok) = v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")) else { return false };
    let want = sim.center_token.expose_secret().as_bytes();
    tok.trim().as_bytes().ct_eq(want).into()
}

fn rpc_result(id: &Value, result: Value) -> Response {
    axum::Json(json!({"jsonrpc": "2.0", "id": id, "result": result})).into_response()
}

fn rpc_error(status: StatusCode, id: &Value, code: i64, message: &str) -> Response {
    (status, axum::Json(json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}}))).into_response()
}

/// `POST /mcp`.
pub async fn handle(State(sim): State<Sim>, headers: HeaderMap, body: Bytes) -> Response {
    if !authorized(&sim, &headers) {
        return (StatusCode::UNAUTHORIZED, axum::Json(json!({"error": "unauthorized"}))).into_response();
    }
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return rpc_error(StatusCode::BAD_REQUEST, &Value::Null, -32700, "parse error");
    };
    let Some(method) = req.get("method").and_then(Value::as_str) else {
        return rpc_error(StatusCode::BAD_REQUEST, &Value::Null, -32600, "invalid request");
    };
    let id = req.get("id").cloned();
    let params = req.get("params").cloned().unwrap_or(Value::Null);
    let Some(id) = id else {
        // A notification: nothing to answer.
        return StatusCode::ACCEPTED.into_response();
    };
    if method == "initialize" {
        let sid = hex::encode(rand::random::<[u8; 16]>());
        {
            let mut st = sim.st();
            if st.sessions.len() >= MAX_SESSIONS {
                // Forgotten sessions get 404; MCP clients then initialize again.
                st.sessions.clear();
            }
            st.sessions.insert(sid.clone());
        }
        let asked = params.get("protocolVersion").and_then(Value::as_str).unwrap_or("");
        let version = PROTOCOL_VERSIONS.iter().find(|v| **v == asked).copied().unwrap_or(PROTOCOL_VERSION).to_string();
        let mut resp = rpc_result(
            &id,
            json!({
                "protocolVersion": version,
                "capabilities": {"tools": {"listChanged": false}},
                "serverInfo": {"name": "center-sim", "version": env!("CARGO_PKG_VERSION")},
            }),
        );
        if let Ok(v) = HeaderValue::from_str(&sid) {
            resp.headers_mut().insert("mcp-session-id", v);
        }
        return resp;
    }
    if let Some(sid) = headers.get("mcp-session-id").and_then(|v| v.to_str().ok())
        && !sim.st().sessions.contains(sid)
    {
        return rpc_error(StatusCode::NOT_FOUND, &id, -32001, "session not found");
    }
    // Transport spec 2025-06-18: after initialize the client sends the negotiated version; an
    // invalid or unsupported one is 400 (a missing one means 2025-03-26, which we implement).
    if let Some(v) = headers.get("mcp-protocol-version") {
        let v = v.to_str().unwrap_or("");
        if !PROTOCOL_VERSIONS.contains(&v) {
            return rpc_error(StatusCode::BAD_REQUEST, &id, -32600, "unsupported MCP-Protocol-Version");
        }
    }
    match method {
        "ping" => rpc_result(&id, json!({})),
        "tools/list" => rpc_result(&id, json!({"tools": tool_list()})),
        "tools/call" => {
            let Some(name) = params.get("name").and_then(Value::as_str) else {
                return rpc_error(StatusCode::OK, &id, -32602, "missing tool name");
            };
            if !TOOLS.iter().any(|(n, _)| *n == name) {
                return rpc_error(StatusCode::OK, &id, -32602, &format!("unknown tool: {name}"));
            }
            let args = params.get("arguments").cloned().unwrap_or_else(|| json!({}));
            let outcome = call_tool(&sim, name, &args).await;
            let (text, is_error) = match outcome {
                Ok(data) => (json!({"data": data}).to_string(), false),
                Err(e) => (json!({"error": {"code": e.code, "message": e.message}}).to_string(), true),
            };
            rpc_result(&id, json!({"content": [{"type": "text", "text": text}], "isError": is_error}))
        }
        _ => rpc_error(StatusCode::OK, &id, -32601, "method not found"),
    }
}

/// `DELETE /mcp` with `Mcp-Session-Id`: the client ends its session (transport spec). `GET /mcp`
/// (a server-initiated SSE stream) is not offered: 405, as the spec allows.
pub async fn end_session(State(sim): State<Sim>, headers: HeaderMap) -> Response {
    if !authorized(&sim, &headers) {
        return (StatusCode::UNAUTHORIZED, axum::Json(json!({"error": "unauthorized"}))).into_response();
    }
    let Some(sid) = headers.get("mcp-session-id").and_then(|v| v.to_str().ok()) else {
        return (StatusCode::BAD_REQUEST, axum::Json(json!({"error": "Mcp-Session-Id required"}))).into_response();
    };
    if sim.st().sessions.remove(sid) { StatusCode::OK.into_response() } else { StatusCode::NOT_FOUND.into_response() }
}

/// The input schema of a tool: the argument names runbook 000 shows (its steps 1–3, 7, 8), with
/// their JSON types; `required` as Center needs them.
fn input_schema(tool: &str) -> Value {
    let s = |d: &str| json!({"type": "string", "description": d});
    let paging = [("page", json!({"type": "integer", "minimum": 1})), ("pageSize", json!({"type": "integer", "minimum": 1, "maximum": MAX_PAGE_SIZE}))];
    let (props, required): (Vec<(&str, Value)>, Vec<&str>) = match tool {
        "list_node_operations" => {
            (vec![("action", s("provision | …")), ("status", s("queued | in_progress | done | failed")), ("id", s("one operation"))], vec![])
        }
        "claim_node_operation" => (
            vec![("id", s("operation id")), ("holder", s("the agent's id")), ("leaseSeconds", json!({"type": "integer", "minimum": 1, "maximum": MAX_LEASE_SECONDS}))],
            vec!["id", "holder"],
        ),
        "update_node_operation" => (
            vec![
                ("id", s("operation id")),
                ("holder", s("the lease holder")),
                ("status", json!({"type": "string", "enum": ["in_progress", "failed"]})),
                ("result", json!({"type": "object", "description": "{instanceId, ipv4}"})),
                ("error", s("concise reason; never a secret")),
            ],
            vec!["id", "status"],
        ),
        "list_cloud_accounts" => (vec![], vec![]),
        "list_cloud_regions" => (vec![("account_name", s("cloud account"))], vec!["account_name"]),
        "list_cloud_plans" | "list_cloud_images" => (vec![("account_name", s("cloud account")), ("region", s("region id"))], vec!["account_name", "region"]),
        "create_cloud_instance" => (
            vec![("account_name", s("cloud account")), ("region", s("region id")), ("plan", s("plan id")), ("image_id", s("image id")), ("name", s("pn-<subId>"))],
            vec!["account_name", "region", "plan", "image_id", "name"],
        ),
        "list_cloud_instances" => (vec![("name", s("exact name"))], vec![]),
        "get_cloud_instance" | "delete_cloud_instance" => (vec![("id", s("instance id"))], vec!["id"]),
        "list_nodes" => (vec![("name", s("exact node name"))], vec![]),
        "update_node" => (vec![("name", s("node name")), ("hidden", json!({"type": "boolean"}))], vec!["name", "hidden"]),
        _ => (vec![], vec![]),
    };
    let mut properties = serde_json::Map::new();
    for (k, v) in props {
        properties.insert(k.to_string(), v);
    }
    if tool.starts_with("list_") && tool != "list_cloud_accounts" {
        for (k, v) in paging {
            properties.insert(k.to_string(), v);
        }
    }
    json!({"type": "object", "properties": properties, "required": required})
}

/// (name, description)
const TOOLS: &[(&str, &str)] = &[
    ("list_node_operations", "List node operations (filters: action, status, id; paging: page, pageSize)."),
    ("claim_node_operation", "Atomically lease a queued operation: id, holder, leaseSeconds (default 600). Returns the one-time identity."),
    ("update_node_operation", "Report progress (in_progress, extends the lease) or failure (failed) as the holder."),
    ("list_cloud_accounts", "List cloud accounts."),
    ("list_cloud_regions", "List an account's regions (account_name)."),
    ("list_cloud_plans", "List plans/bundles of a region (account_name, region)."),
    ("list_cloud_images", "List images of a region (account_name, region)."),
    ("create_cloud_instance", "Create an instance (account_name, region, plan, image_id, name)."),
    ("list_cloud_instances", "List instances (name filter)."),
    ("get_cloud_instance", "Get an instance (id)."),
    ("delete_cloud_instance", "Delete an instance (id)."),
    ("list_nodes", "List registered nodes (name filter)."),
    ("update_node", "Hide or show a node (name, hidden)."),
];

fn tool_list() -> Vec<Value> {
    TOOLS.iter().map(|(name, desc)| json!({"name": name, "description": desc, "inputSchema": input_schema(name)})).collect()
}

// ---------- argument helpers (both camelCase and snake_case accepted) ----------

fn field<'a>(args: &'a Value, key: &str) -> Option<&'a Value> {
    args.get(key).or_else(|| args.get(alt_case(key))).filter(|v| !v.is_null())
}

fn alt_case(key: &str) -> String {
    if key.contains('_') {
        let mut out = String::new();
        let mut up = false;
        for c in key.chars() {
            if c == '_' {
                up = true;
            } else if up {
                out.extend(c.to_uppercase());
                up = false;
            } else {
                out.push(c);
            }
        }
        out
    } else {
        key.chars().flat_map(|c| if c.is_uppercase() { vec!['_', c.to_ascii_lowercase()] } else { vec![c] }).collect()
    }
}

fn opt_str(args: &Value, key: &str) -> Result<Option<String>, ToolError> {
    match field(args, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ToolError::bad_request(format!("{key} must be a string"))),
    }
}

fn req_str(args: &Value, key: &str) -> Result<String, ToolError> {
    opt_str(args, key)?.filter(|s| !s.trim().is_empty()).ok_or_else(|| ToolError::bad_request(format!("{key} is required")))
}

fn opt_u64(args: &Value, key: &str) -> Result<Option<u64>, ToolError> {
    match field(args, key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            .map(Some)
            .ok_or_else(|| ToolError::bad_request(format!("{key} must be a non-negative integer"))),
    }
}

/// `{items, page, pageSize, total}` of `items` at the requested page.
fn page<T: Serialize>(args: &Value, items: Vec<T>) -> ToolResult {
    let page = opt_u64(args, "page")?.unwrap_or(1).max(1);
    let size = opt_u64(args, "pageSize")?.unwrap_or(DEFAULT_PAGE_SIZE).clamp(1, MAX_PAGE_SIZE);
    let total = items.len() as u64;
    let skip = (page - 1).saturating_mul(size);
    let slice: Vec<T> = items.into_iter().skip(usize::try_from(skip).unwrap_or(usize::MAX)).take(size as usize).collect();
    Ok(json!({"items": slice, "page": page, "pageSize": size, "total": total}))
}

fn to_value<T: Serialize>(v: T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

// ---------- the tools ----------

async fn call_tool(sim: &Sim, name: &str, args: &Value) -> ToolResult {
    let (latency, fails) = {
        let mut st = sim.st();
        let fails = st.dice_roll(|f| f.center_error_rate)
            || (name == "update_node_operation" && st.dice_roll(|f| f.update_operation_error_rate));
        (st.faults.center_latency_ms, fails)
    };
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    if fails {
        return Err(ToolError::unavailable("center unavailable (injected)"));
    }
    if !args.is_object() {
        return Err(ToolError::bad_request("arguments must be an object"));
    }
    match name {
        "list_node_operations" => {
            let filter = |k: &str| opt_str(args, k).map(|v| v.filter(|s| !s.is_empty()));
            let (action, status, id) = (filter("action")?, filter("status")?, filter("id")?);
            let st = sim.st_ticked();
            let ops: Vec<_> = st.ops.list(action.as_deref(), status.as_deref(), id.as_deref()).into_iter().map(|o| o.to_wire()).collect();
            drop(st);
            page(args, ops)
        }
        "claim_node_operation" => claim(sim, args),
        "update_node_operation" => update(sim, args),
        "list_cloud_accounts" => page(args, cloud::accounts()),
        "list_cloud_regions" => {
            cloud::check_account(&req_str(args, "account_name")?)?;
            page(args, cloud::regions())
        }
        "list_cloud_plans" => {
            cloud::check_account(&req_str(args, "account_name")?)?;
            let region = req_str(args, "region")?;
            cloud::check_region(&region)?;
            page(args, cloud::plans_in(&region))
        }
        "list_cloud_images" => {
            cloud::check_account(&req_str(args, "account_name")?)?;
            cloud::check_region(&req_str(args, "region")?)?;
            page(args, cloud::images())
        }
        "create_cloud_instance" => {
            let a = CreateArgs {
                account_name: req_str(args, "account_name")?,
                region: req_str(args, "region")?,
                plan: req_str(args, "plan")?,
                image_id: req_str(args, "image_id")?,
                name: req_str(args, "name")?,
            };
            Ok(json!({"instance": sim.create_instance(a)?}))
        }
        "list_cloud_instances" => {
            let name = opt_str(args, "name")?.filter(|s| !s.is_empty());
            page(args, sim.list_instances(name.as_deref()))
        }
        "get_cloud_instance" => Ok(json!({"instance": sim.get_instance(&req_str(args, "id")?)?})),
        "delete_cloud_instance" => Ok(json!({"instance": sim.delete_instance(&req_str(args, "id")?)?})),
        "list_nodes" => {
            let name = opt_str(args, "name")?.filter(|s| !s.is_empty());
            let st = sim.st();
            let nodes: Vec<_> = st.nodes.values().filter(|n| name.as_deref().is_none_or(|x| n.name == x)).map(|n| n.to_wire()).collect();
            drop(st);
            page(args, nodes)
        }
        "update_node" => {
            let name = req_str(args, "name")?;
            let hidden =
                field(args, "hidden").and_then(Value::as_bool).ok_or_else(|| ToolError::bad_request("hidden must be a boolean"))?;
            let mut st = sim.st();
            let node = st.nodes.get_mut(&name).ok_or_else(|| ToolError::not_found(format!("node {name} not found")))?;
            node.hidden = hidden;
            tracing::info!(node = %name, hidden, "node visibility changed");
            Ok(json!({"node": to_value(node.to_wire())}))
        }
        _ => Err(ToolError::bad_request("unknown tool")),
    }
}

fn claim(sim: &Sim, args: &Value) -> ToolResult {
    let id = req_str(args, "id")?;
    let holder = req_str(args, "holder")?;
    if holder.len() > 200 {
        return Err(ToolError::bad_request("holder is too long"));
    }
    let lease = opt_u64(args, "leaseSeconds")?.unwrap_or(DEFAULT_LEASE_SECONDS);
    if !(1..=MAX_LEASE_SECONDS).contains(&lease) {
        return Err(ToolError::bad_request(format!("leaseSeconds must be between 1 and {MAX_LEASE_SECONDS}")));
    }
    let token = format!("pnclaim_{}", hex::encode(rand::random::<[u8; 32]>()));
    let now = kit::now_ms();
    let mut st = sim.st_ticked();
    let conflict = st.dice_roll(|f| f.claim_conflict_rate);
    let op = st.ops.claim(&id, &holder, lease, now, token.clone(), conflict)?;
    let domain = st.ops.get(&id).map(|o| o.domain.clone()).unwrap_or_default();
    drop(st);
    tracing::info!(op = %id, holder = %holder, lease_s = lease, "operation claimed");
    // Built by hand: kit's `Identity` holds a SecretString and does not serialize.
    Ok(json!({
        "operation": to_value(op),
        "identity": {"claimToken": token, "centerUrl": sim.cfg.base_url, "domain": domain},
    }))
}

fn update(sim: &Sim, args: &Value) -> ToolResult {
    let id = req_str(args, "id")?;
    let holder = req_str(args, "holder")?;
    let status = req_str(args, "status")?;
    let result = match field(args, "result") {
        None => None,
        Some(v @ Value::Object(_)) => Some(v.clone()),
        Some(_) => return Err(ToolError::bad_request("result must be an object")),
    };
    let error = opt_str(args, "error")?;
    let now = kit::now_ms();
    let mut st = sim.st_ticked();
    let leaked = st.find_secret(error.as_deref().unwrap_or("")).or_else(|| result.as_ref().and_then(|r| st.find_secret(&r.to_string())));
    if let Some(kind) = leaked {
        st.violate(Violation::new("secret_in_center_call", format!("a {kind} was sent in update_node_operation")).op(&id));
    }
    let op = st.ops.update(&id, &holder, &status, result, error.as_deref(), now)?;
    drop(st);
    tracing::info!(op = %id, status = %status, "operation updated");
    Ok(json!({"operation": to_value(op)}))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn both_spellings() {
        assert_eq!(alt_case("account_name"), "accountName");
        assert_eq!(alt_case("pageSize"), "page_size");
        let a = json!({"accountName": "x", "page_size": 3});
        assert_eq!(req_str(&a, "account_name").unwrap(), "x");
        assert_eq!(opt_u64(&a, "pageSize").unwrap(), Some(3));
    }

    #[test]
    fn paging() {
        let items: Vec<u32> = (0..45).collect();
        let p = page(&json!({"page": 3, "pageSize": 20}), items.clone()).unwrap();
        assert_eq!(p["items"], json!([40, 41, 42, 43, 44]));
        assert_eq!(p["total"], 45);
        let p = page(&json!({}), items.clone()).unwrap();
        assert_eq!(p["items"].as_array().unwrap().len(), 20);
        assert_eq!(p["page"], 1);
        let p = page(&json!({"pageSize": 1000}), items.clone()).unwrap();
        assert_eq!(p["pageSize"], 100);
        let p = page(&json!({"page": 99}), items).unwrap();
        assert_eq!(p["items"], json!([]));
        assert!(page(&json!({"page": "x"}), vec![1]).is_err());
    }
}
