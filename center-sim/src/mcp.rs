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

use crate::center::{DEFAULT_LEASE_SECONDS, MAX_LEASE_SECONDS, Report};
use crate::faults::{ArgCase, Faults};
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
        "tools/list" => {
            let faults = sim.st().faults.clone();
            rpc_result(&id, json!({"tools": tool_list(&faults)}))
        }
        "tools/call" => {
            let Some(name) = params.get("name").and_then(Value::as_str) else {
                return rpc_error(StatusCode::OK, &id, -32602, "missing tool name");
            };
            let faults = sim.st().faults.clone();
            if !offered(&faults, name) {
                return rpc_error(StatusCode::OK, &id, -32602, &format!("Unknown tool: {}", clip_name(name)));
            }
            let args = params.get("arguments").cloned().unwrap_or_else(|| json!({}));
            // Invalid arguments are a protocol error (-32602) naming the argument, before any effect.
            if let Err(msg) = check_args(name, &args, faults.arg_case) {
                return rpc_error(StatusCode::OK, &id, -32602, &msg);
            }
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

/// The JSON type of a tool argument.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Str,
    /// An integer in `min..=max`.
    Int(u64, u64),
    Obj,
    Bool,
    /// One of these strings.
    OneOf(&'static [&'static str]),
}

/// One argument of a tool, named as runbook 000 names it (steps 1–3, 7, 8); the one table the
/// published schemas (`tools/list`) and the argument check of `tools/call` are built from.
struct Arg {
    name: &'static str,
    kind: Kind,
    required: bool,
    desc: &'static str,
}

const fn arg(name: &'static str, kind: Kind, required: bool, desc: &'static str) -> Arg {
    Arg { name, kind, required, desc }
}

const PAGE: Arg = arg("page", Kind::Int(1, u32::MAX as u64), false, "page number, from 1");
const PAGE_SIZE: Arg = arg("pageSize", Kind::Int(1, MAX_PAGE_SIZE), false, "items per page (the server may answer fewer)");

/// The arguments of `tool` (`None`: no such tool). Beyond the runbook: `id` on
/// `list_node_operations` (runbook step 7's "or check the operation"), `holder` on
/// `update_node_operation` (optional; checked against the lease when given), paging on every
/// list, and the arguments of the tools the runbook does not show (`get_cloud_instance`,
/// `delete_cloud_instance`, `update_node`).
fn tool_args(tool: &str) -> Option<Vec<Arg>> {
    use Kind::*;
    let account = arg("account_name", Str, true, "cloud account (list_cloud_accounts)");
    let region = arg("region", Str, true, "region id (list_cloud_regions)");
    Some(match tool {
        "list_node_operations" => vec![
            arg("action", Str, false, "provision | …"),
            arg("status", Str, false, "queued | claimed | in_progress | done | failed"),
            arg("id", Str, false, "one operation"),
            PAGE,
            PAGE_SIZE,
        ],
        "claim_node_operation" => vec![
            arg("id", Str, true, "operation id"),
            arg("holder", Str, true, "the agent's id"),
            arg("leaseSeconds", Int(1, MAX_LEASE_SECONDS), false, "lease length (default 600)"),
        ],
        "update_node_operation" => vec![
            arg("id", Str, true, "operation id"),
            arg("status", OneOf(&["in_progress", "failed"]), true, "in_progress | failed (done is the node's)"),
            arg("result", Obj, false, "{instanceId, ipv4}"),
            arg("error", Str, false, "concise reason; never a secret"),
            arg("holder", Str, false, "the lease holder; when given, it must hold the lease"),
        ],
        "list_cloud_accounts" => vec![PAGE, PAGE_SIZE],
        "list_cloud_regions" => vec![account, PAGE, PAGE_SIZE],
        "list_cloud_plans" | "list_cloud_images" => vec![account, region, PAGE, PAGE_SIZE],
        "create_cloud_instance" => vec![
            account,
            region,
            arg("plan", Str, true, "plan id (list_cloud_plans)"),
            arg("image_id", Str, true, "image id (list_cloud_images)"),
            arg("name", Str, true, "pn-<subId>"),
        ],
        "list_cloud_instances" => vec![arg("name", Str, false, "exact name"), PAGE, PAGE_SIZE],
        "get_cloud_instance" | "delete_cloud_instance" => vec![arg("id", Str, true, "instance id")],
        "list_nodes" => vec![arg("name", Str, false, "exact node name"), PAGE, PAGE_SIZE],
        "update_node" => vec![arg("name", Str, true, "node name"), arg("hidden", Bool, true, "hide (true) or show")],
        // Assumed (issue #19; the seeds do not list it): the provider firewall, one port a call
        // as Lightsail's OpenInstancePublicPorts takes one port range (center-sim/README.md).
        "open_cloud_instance_port" => vec![
            arg("id", Str, true, "instance id"),
            arg("port", Int(1, 65535), true, "port to open"),
            arg("protocol", OneOf(&["tcp", "udp"]), true, "tcp | udp"),
        ],
        _ => return None,
    })
}

/// `name` as `case` spells it: the runbook's own name, or every word joined camelCase or
/// snake_case.
fn spelled(name: &str, case: ArgCase) -> String {
    match case {
        ArgCase::Runbook | ArgCase::Any => name.to_string(),
        ArgCase::Camel if name.contains('_') => alt_case(name),
        ArgCase::Snake if name.chars().any(char::is_uppercase) => alt_case(name),
        _ => name.to_string(),
    }
}

/// The input schema of a tool as published under `case`: its arguments with their JSON types,
/// `required`, and no others (`additionalProperties: false`).
fn input_schema(tool: &str, case: ArgCase) -> Value {
    let mut properties = serde_json::Map::new();
    let mut required = Vec::new();
    for a in tool_args(tool).unwrap_or_default() {
        let mut p = match a.kind {
            Kind::Str => json!({"type": "string"}),
            Kind::Int(min, max) => json!({"type": "integer", "minimum": min, "maximum": max}),
            Kind::Obj => json!({"type": "object"}),
            Kind::Bool => json!({"type": "boolean"}),
            Kind::OneOf(v) => json!({"type": "string", "enum": v}),
        };
        p["description"] = json!(a.desc);
        let name = spelled(a.name, case);
        if a.required {
            required.push(name.clone());
        }
        properties.insert(name, p);
    }
    json!({"type": "object", "properties": properties, "required": required, "additionalProperties": false})
}

/// Checks `args` against `tool`'s schema under `case`, as a schema-checking MCP server does:
/// an object; every name one the schema publishes (under `any`, in either spelling); each
/// value of its type; the required ones present. `Err` names the argument.
fn check_args(tool: &str, args: &Value, case: ArgCase) -> Result<(), String> {
    let Some(spec) = tool_args(tool) else { return Err(format!("Unknown tool: {tool}")) };
    let Some(obj) = args.as_object() else { return Err(format!("Invalid arguments for tool {tool}: arguments must be an object")) };
    let names = |a: &Arg| -> Vec<String> {
        if case == ArgCase::Any { vec![a.name.to_string(), alt_case(a.name)] } else { vec![spelled(a.name, case)] }
    };
    let expected = || spec.iter().map(|a| spelled(a.name, case)).collect::<Vec<_>>().join(", ");
    for (k, v) in obj {
        let Some(a) = spec.iter().find(|a| names(a).iter().any(|n| n == k)) else {
            return Err(format!("Invalid arguments for tool {tool}: unknown argument '{}' (expected: {})", clip_name(k), expected()));
        };
        let ok = match a.kind {
            _ if v.is_null() && !a.required => true,
            Kind::Str => v.is_string(),
            Kind::Int(min, max) => v.as_u64().is_some_and(|n| (min..=max).contains(&n)),
            Kind::Obj => v.is_object(),
            Kind::Bool => v.is_boolean(),
            Kind::OneOf(_) => v.is_string(),
        };
        if !ok {
            let want = match a.kind {
                Kind::Str | Kind::OneOf(_) => "a string".to_string(),
                Kind::Int(min, max) => format!("an integer from {min} to {max}"),
                Kind::Obj => "an object".to_string(),
                Kind::Bool => "a boolean".to_string(),
            };
            return Err(format!("Invalid arguments for tool {tool}: '{k}' must be {want}"));
        }
    }
    for a in spec.iter().filter(|a| a.required) {
        if !names(a).iter().any(|n| obj.get(n).is_some_and(|v| !v.is_null())) {
            return Err(format!("Invalid arguments for tool {tool}: '{}' is required", spelled(a.name, case)));
        }
    }
    Ok(())
}

/// An argument name as an error text may quote it (an unknown name is the caller's text).
fn clip_name(k: &str) -> String {
    k.chars().filter(|c| !c.is_control()).take(64).collect()
}

/// (name, description)
const TOOLS: &[(&str, &str)] = &[
    ("list_node_operations", "List node operations (filters: action, status, id; paging: page, pageSize)."),
    ("claim_node_operation", "Atomically lease a queued operation: id, holder, leaseSeconds (default 600). Returns the one-time identity. A claim by the current holder renews its lease."),
    ("update_node_operation", "Report progress (in_progress) or failure (failed) of a held operation."),
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
    ("open_cloud_instance_port", "Open a port in an instance's provider firewall (id, port, protocol); answers the open ports."),
];

/// Whether this Center offers `tool` now (the `updateNodeTool`/`deleteInstanceTool` knobs).
fn offered(f: &Faults, tool: &str) -> bool {
    match tool {
        "update_node" => f.update_node_tool,
        "delete_cloud_instance" => f.delete_instance_tool,
        "open_cloud_instance_port" => f.firewall_tool,
        _ => TOOLS.iter().any(|(n, _)| *n == tool),
    }
}

fn tool_list(f: &Faults) -> Vec<Value> {
    TOOLS
        .iter()
        .filter(|(name, _)| offered(f, name))
        .map(|(name, desc)| json!({"name": name, "description": desc, "inputSchema": input_schema(name, f.arg_case)}))
        .collect()
}

// ---------- argument helpers (after `check_args`: a name in the spelling the case allows) ----------

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

/// `{items, page, pageSize, total}` of `items` at the requested page; at most `cap` items a
/// page (the `maxPageSize` knob) whatever `pageSize` asks, and `pageSize` answers what was used.
fn page<T: Serialize>(args: &Value, items: Vec<T>, cap: u64) -> ToolResult {
    let page = opt_u64(args, "page")?.unwrap_or(1).max(1);
    let size = opt_u64(args, "pageSize")?.unwrap_or(DEFAULT_PAGE_SIZE).clamp(1, MAX_PAGE_SIZE.min(cap.max(1)));
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
    let (latency, fails, faults) = {
        let mut st = sim.st();
        let fails = st.dice_roll(|f| f.center_error_rate)
            || (name == "update_node_operation" && st.dice_roll(|f| f.update_operation_error_rate));
        (st.faults.center_latency_ms, fails, st.faults.clone())
    };
    let cap = faults.max_page_size;
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
            // `idFilter` off: the filter is accepted and has no effect.
            let id = id.filter(|_| faults.id_filter);
            let st = sim.st_ticked();
            let ops: Vec<_> = st.ops.list(action.as_deref(), status.as_deref(), id.as_deref()).into_iter().map(|o| o.to_wire()).collect();
            drop(st);
            page(args, ops, cap)
        }
        "claim_node_operation" => claim(sim, args),
        "update_node_operation" => update(sim, args, faults.lease_extends_on_progress),
        "list_cloud_accounts" => page(args, cloud::accounts(), cap),
        "list_cloud_regions" => {
            cloud::check_account(&req_str(args, "account_name")?)?;
            page(args, cloud::regions(), cap)
        }
        "list_cloud_plans" => {
            cloud::check_account(&req_str(args, "account_name")?)?;
            let region = req_str(args, "region")?;
            cloud::check_region(&region)?;
            page(args, cloud::plans_in(&region), cap)
        }
        "list_cloud_images" => {
            cloud::check_account(&req_str(args, "account_name")?)?;
            cloud::check_region(&req_str(args, "region")?)?;
            page(args, cloud::images(), cap)
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
            page(args, sim.list_instances(name.as_deref()), cap)
        }
        "get_cloud_instance" => Ok(json!({"instance": sim.get_instance(&req_str(args, "id")?)?})),
        "delete_cloud_instance" => Ok(json!({"instance": sim.delete_instance(&req_str(args, "id")?)?})),
        "list_nodes" => {
            let name = opt_str(args, "name")?.filter(|s| !s.is_empty());
            let st = sim.st();
            let nodes: Vec<_> = st.nodes.values().filter(|n| name.as_deref().is_none_or(|x| n.name == x)).map(|n| n.to_wire()).collect();
            drop(st);
            page(args, nodes, cap)
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
        "open_cloud_instance_port" => {
            let id = req_str(args, "id")?;
            let port = opt_u64(args, "port")?.and_then(|p| u16::try_from(p).ok()).ok_or_else(|| ToolError::bad_request("port must be 1-65535"))?;
            let protocol = req_str(args, "protocol")?;
            Ok(json!({"ports": sim.open_instance_ports(&id, &[(port, protocol)])?}))
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
    let (op, new) = st.ops.claim(&id, &holder, lease, now, token.clone(), conflict)?;
    let domain = st.ops.get(&id).map(|o| o.domain.clone()).unwrap_or_default();
    drop(st);
    if !new {
        // The holder's claim renewed its lease: the token issued with the claim stays live and
        // is not shown again.
        tracing::info!(op = %id, holder = %holder, lease_s = lease, "lease renewed by a claim of its holder");
        return Ok(json!({"operation": to_value(op)}));
    }
    tracing::info!(op = %id, holder = %holder, lease_s = lease, "operation claimed");
    // Built by hand: kit's `Identity` holds a SecretString and does not serialize.
    Ok(json!({
        "operation": to_value(op),
        "identity": {"claimToken": token, "centerUrl": sim.cfg.base_url, "domain": domain},
    }))
}

fn update(sim: &Sim, args: &Value, extends: bool) -> ToolResult {
    let id = req_str(args, "id")?;
    let holder = opt_str(args, "holder")?.filter(|h| !h.trim().is_empty());
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
    let report = Report { holder: holder.as_deref(), status: &status, result, error: error.as_deref(), extends };
    let op = st.ops.update(&id, report, now)?;
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
        let p = page(&json!({"page": 3, "pageSize": 20}), items.clone(), 100).unwrap();
        assert_eq!(p["items"], json!([40, 41, 42, 43, 44]));
        assert_eq!(p["total"], 45);
        let p = page(&json!({}), items.clone(), 100).unwrap();
        assert_eq!(p["items"].as_array().unwrap().len(), 20);
        assert_eq!(p["page"], 1);
        let p = page(&json!({"pageSize": 1000}), items.clone(), 100).unwrap();
        assert_eq!(p["pageSize"], 100);
        let p = page(&json!({"page": 99}), items.clone(), 100).unwrap();
        assert_eq!(p["items"], json!([]));
        assert!(page(&json!({"page": "x"}), vec![1], 100).is_err());
        // maxPageSize 7: pages of 7 whatever was asked; page 2 starts after the first 7.
        let p = page(&json!({"page": 2, "pageSize": 100}), items, 7).unwrap();
        assert_eq!((p["items"].clone(), p["pageSize"].clone(), p["total"].clone()), (json!([7, 8, 9, 10, 11, 12, 13]), json!(7), json!(45)));
    }

    #[test]
    fn schemas_and_the_argument_check_come_from_one_table() {
        // The runbook's names, mixed as the runbook shows them.
        let s = input_schema("create_cloud_instance", ArgCase::Runbook);
        assert_eq!(s["required"], json!(["account_name", "region", "plan", "image_id", "name"]));
        assert_eq!(s["additionalProperties"], false);
        assert!(input_schema("claim_node_operation", ArgCase::Runbook)["properties"]["leaseSeconds"].is_object());
        assert!(input_schema("update_node_operation", ArgCase::Runbook)["properties"]["holder"].is_object());
        assert_eq!(input_schema("update_node_operation", ArgCase::Runbook)["required"], json!(["id", "status"]));
        // Strict camel / snake: every multi-word name respelled.
        assert!(input_schema("create_cloud_instance", ArgCase::Camel)["properties"]["imageId"].is_object());
        assert!(input_schema("claim_node_operation", ArgCase::Snake)["properties"]["lease_seconds"].is_object());
        assert!(input_schema("list_nodes", ArgCase::Snake)["properties"]["page_size"].is_object());

        let runbook = ArgCase::Runbook;
        // The runbook's own calls pass.
        check_args("list_node_operations", &json!({"action": "provision", "status": "queued", "page": 1, "pageSize": 20}), runbook).unwrap();
        check_args("claim_node_operation", &json!({"id": "op-1", "holder": "h", "leaseSeconds": 600}), runbook).unwrap();
        check_args("update_node_operation", &json!({"id": "op-1", "status": "in_progress", "result": {"instanceId": "i", "ipv4": "1.2.3.4"}}), runbook).unwrap();
        check_args("update_node_operation", &json!({"id": "op-1", "status": "failed", "error": "why"}), runbook).unwrap();
        check_args("create_cloud_instance", &json!({"account_name": "a", "region": "r", "plan": "p", "image_id": "i", "name": "pn-x"}), runbook).unwrap();
        // Misspelled, unknown, mistyped, missing: an error naming the argument.
        let e = check_args("create_cloud_instance", &json!({"accountName": "a", "region": "r", "plan": "p", "image_id": "i", "name": "n"}), runbook).unwrap_err();
        assert!(e.contains("unknown argument 'accountName'") && e.contains("account_name"), "{e}");
        let e = check_args("claim_node_operation", &json!({"id": "x", "holder": "h", "lease_seconds": 5}), runbook).unwrap_err();
        assert!(e.contains("'lease_seconds'"), "{e}");
        let e = check_args("list_nodes", &json!({"nmae": "x"}), runbook).unwrap_err();
        assert!(e.contains("'nmae'"), "{e}");
        let e = check_args("claim_node_operation", &json!({"id": "x", "holder": "h", "leaseSeconds": "600"}), runbook).unwrap_err();
        assert!(e.contains("'leaseSeconds' must be an integer"), "{e}");
        let e = check_args("claim_node_operation", &json!({"id": "x"}), runbook).unwrap_err();
        assert!(e.contains("'holder' is required"), "{e}");
        assert!(check_args("update_node", &json!({"name": "n", "hidden": "yes"}), runbook).is_err());
        assert!(check_args("list_nodes", &json!([1]), runbook).is_err());
        assert!(check_args("no_such_tool", &json!({}), runbook).unwrap_err().starts_with("Unknown tool"));
        // Strict snake refuses the runbook's camel names, strict camel its snake ones.
        assert!(check_args("claim_node_operation", &json!({"id": "x", "holder": "h", "leaseSeconds": 5}), ArgCase::Snake).is_err());
        check_args("claim_node_operation", &json!({"id": "x", "holder": "h", "lease_seconds": 5}), ArgCase::Snake).unwrap();
        assert!(check_args("list_cloud_regions", &json!({"account_name": "a"}), ArgCase::Camel).is_err());
        check_args("list_cloud_regions", &json!({"accountName": "a", "pageSize": 3}), ArgCase::Camel).unwrap();
        let e = check_args("list_cloud_regions", &json!({}), ArgCase::Camel).unwrap_err();
        assert!(e.contains("'accountName' is required"), "{e}");
        // `any`: either spelling.
        check_args("list_cloud_regions", &json!({"accountName": "a", "page_size": 3}), ArgCase::Any).unwrap();
        check_args("list_cloud_regions", &json!({"account_name": "a", "pageSize": 3}), ArgCase::Any).unwrap();
        assert!(check_args("list_cloud_regions", &json!({"account": "a"}), ArgCase::Any).is_err());
        // Every published tool has a schema.
        for (t, _) in TOOLS {
            assert!(tool_args(t).is_some(), "{t}");
        }
    }

    #[test]
    fn the_tool_knobs_hide_the_tools() {
        let mut f = Faults::default();
        let names = |f: &Faults| tool_list(f).iter().map(|t| t["name"].as_str().unwrap().to_string()).collect::<Vec<_>>();
        assert!(names(&f).contains(&"update_node".to_string()) && names(&f).contains(&"delete_cloud_instance".to_string()));
        f.update_node_tool = false;
        f.delete_instance_tool = false;
        assert!(!names(&f).contains(&"update_node".to_string()) && !names(&f).contains(&"delete_cloud_instance".to_string()));
        assert!(!offered(&f, "update_node") && offered(&f, "list_nodes") && !offered(&f, "bogus"));
    }
}
