//! The Center client: typed calls for the MCP tools the runbook uses, behind the `Center`
//! trait so that a REST transport can be added without touching the services.
//!
//! Transport: MCP streamable HTTP — JSON-RPC 2.0 `tools/call` POSTed to `<center>/mcp` with a
//! bearer token; the tool's JSON (`{data: …}` or `{error: {code, message}}`) is the text
//! content of the result. Errors are typed (conflict, rejected, transient, permanent,
//! malformed); transient ones are retried with jittered exponential back-off (`backon`).
//! Error texts never carry request arguments, so no secret can reach them.
//!
//! Invariant: only this module speaks to Center.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum CenterError {
    /// Someone else holds it, or it does not exist (runbook: "409-ish"). Do not retry blindly.
    #[error("center {tool}: conflict: {msg}")]
    Conflict { tool: &'static str, msg: String },
    /// Center refused the request as invalid (e.g. `done` for a provision).
    #[error("center {tool}: rejected: {msg}")]
    Rejected { tool: &'static str, msg: String },
    /// Try again later (5xx, 429, timeouts, connection errors).
    #[error("center {tool}: transient: {msg}")]
    Transient { tool: &'static str, msg: String },
    /// Will not work by retrying (auth, unknown tool).
    #[error("center {tool}: {msg}")]
    Permanent { tool: &'static str, msg: String },
    /// The answer did not parse.
    #[error("center {tool}: malformed answer: {msg}")]
    Malformed { tool: &'static str, msg: String },
}

impl CenterError {
    pub fn is_transient(&self) -> bool {
        matches!(self, CenterError::Transient { .. })
    }
    pub fn is_conflict(&self) -> bool {
        matches!(self, CenterError::Conflict { .. })
    }
}

fn clip(s: &str) -> String {
    s.chars().take(200).collect()
}

// ---------- wire types (Center's JSON, camelCase) ----------

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct OpParams {
    pub region: String,
    pub traffic_total_bytes: u64,
    pub ip_type: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct NodeOperation {
    pub id: String,
    pub action: String,
    pub status: String,
    pub sub_id: String,
    pub params: OpParams,
    pub holder: Option<String>,
    pub lease_expires_at: Option<String>,
    pub created_at: Option<String>,
    pub result: Option<Value>,
    pub error: Option<String>,
}

/// The one-time identity of a claimed provision. `claim_token` never prints.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    pub claim_token: SecretString,
    #[serde(default)]
    pub center_url: String,
    #[serde(default)]
    pub domain: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Claimed {
    pub operation: NodeOperation,
    #[serde(default)]
    pub identity: Option<Identity>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Page<T> {
    pub items: Vec<T>,
    #[serde(default)]
    pub page: u32,
    #[serde(default)]
    pub page_size: u32,
    #[serde(default)]
    pub total: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct CloudAccount {
    pub account_name: String,
    pub provider: String,
    /// The account has a default keypair (runbook step 0) and its name.
    pub default_key_name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct CloudRegion {
    pub id: String,
    pub name: String,
    pub available: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct CloudPlan {
    pub id: String,
    pub transfer_bytes: u64,
    pub price_monthly: f64,
    pub cpus: u32,
    pub memory_mb: u32,
    /// Regions where the plan can be created now.
    pub regions: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct CloudImage {
    pub id: String,
    pub name: String,
    pub os: String,
    pub version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct CloudInstance {
    pub id: String,
    pub name: String,
    pub status: String,
    pub ipv4: Option<String>,
    pub account_name: String,
    pub region: String,
    pub plan: String,
    pub image_id: String,
    pub traffic_used_bytes: u64,
    pub created_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct CreateInstance {
    pub account_name: String,
    pub region: String,
    pub plan: String,
    pub image_id: String,
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct Tunnel {
    pub domain: String,
    pub port: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct Node {
    pub name: String,
    pub ipv4: String,
    pub region: String,
    pub class: String,
    pub ip_type: String,
    pub hidden: bool,
    pub tunnels: Vec<Tunnel>,
}

/// A filter for `list_node_operations`.
#[derive(Debug, Clone, Default)]
pub struct OpFilter {
    pub action: Option<String>,
    pub status: Option<String>,
    pub id: Option<String>,
}

// ---------- the trait ----------

#[async_trait::async_trait]
pub trait Center: Send + Sync {
    /// Every page of `list_node_operations`.
    async fn list_node_operations(&self, f: &OpFilter) -> Result<Vec<NodeOperation>, CenterError>;
    async fn claim_node_operation(&self, id: &str, holder: &str, lease_seconds: u32) -> Result<Claimed, CenterError>;
    /// `status` is `in_progress` or `failed`; `result` e.g. `{instanceId, ipv4}`.
    async fn update_node_operation(
        &self,
        id: &str,
        holder: &str,
        status: &str,
        result: Option<Value>,
        error: Option<&str>,
    ) -> Result<NodeOperation, CenterError>;
    async fn list_cloud_accounts(&self) -> Result<Vec<CloudAccount>, CenterError>;
    async fn list_cloud_regions(&self, account: &str) -> Result<Vec<CloudRegion>, CenterError>;
    async fn list_cloud_plans(&self, account: &str, region: &str) -> Result<Vec<CloudPlan>, CenterError>;
    async fn list_cloud_images(&self, account: &str, region: &str) -> Result<Vec<CloudImage>, CenterError>;
    async fn create_cloud_instance(&self, req: &CreateInstance) -> Result<CloudInstance, CenterError>;
    /// Every page of `list_cloud_instances`, optionally filtered by exact name.
    async fn list_cloud_instances(&self, name: Option<&str>) -> Result<Vec<CloudInstance>, CenterError>;
    async fn get_cloud_instance(&self, id: &str) -> Result<CloudInstance, CenterError>;
    async fn delete_cloud_instance(&self, id: &str) -> Result<(), CenterError>;
    async fn list_nodes(&self, name: Option<&str>) -> Result<Vec<Node>, CenterError>;
    async fn update_node(&self, name: &str, hidden: bool) -> Result<Node, CenterError>;
}

// ---------- MCP over streamable HTTP ----------

/// How the client behaves.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub base_url: String,
    pub timeout: Duration,
    /// Attempts for a transient failure, the first included.
    pub attempts: usize,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

impl ClientConfig {
    pub fn new(base_url: &str, timeout: Duration) -> ClientConfig {
        ClientConfig {
            base_url: base_url.trim_end_matches('/').to_string(),
            timeout,
            attempts: 5,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(3),
        }
    }
}

pub struct McpCenter {
    http: reqwest::Client,
    cfg: ClientConfig,
    token: SecretString,
    next_id: AtomicU64,
    /// The MCP session id (empty when the server keeps none) and the negotiated protocol version.
    session: tokio::sync::Mutex<Option<(String, String)>>,
}

/// MCP protocol versions this client speaks, newest first (the transport spec of each).
pub const PROTOCOL_VERSIONS: [&str; 2] = ["2025-06-18", "2025-03-26"];

impl std::fmt::Debug for McpCenter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "McpCenter({})", self.cfg.base_url)
    }
}

const PAGE_SIZE: u32 = 100;
const MAX_PAGES: u32 = 10_000;

impl McpCenter {
    pub fn new(cfg: ClientConfig, token: SecretString) -> Result<Arc<McpCenter>, CenterError> {
        crate::init_crypto();
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(64)
            .build()
            .map_err(|e| CenterError::Permanent { tool: "client", msg: e.to_string() })?;
        Ok(Arc::new(McpCenter { http, cfg, token, next_id: AtomicU64::new(1), session: tokio::sync::Mutex::new(None) }))
    }

    async fn post(
        &self,
        tool: &'static str,
        body: &Value,
        session: Option<&str>,
        version: Option<&str>,
    ) -> Result<(Option<String>, Value), CenterError> {
        let url = format!("{}/mcp", self.cfg.base_url);
        let mut req = self
            .http
            .post(&url)
            .bearer_auth(self.token.expose_secret())
            .header("Accept", "application/json, text/event-stream")
            .json(body);
        if let Some(s) = session {
            req = req.header("Mcp-Session-Id", s);
        }
        // Required on every request after `initialize` (transport spec 2025-06-18).
        if let Some(v) = version {
            req = req.header("MCP-Protocol-Version", v);
        }
        let resp = req.send().await.map_err(|e| CenterError::Transient {
            tool,
            msg: if e.is_timeout() { "timed out".into() } else { format!("request failed: {}", clip(&without_url(&e))) },
        })?;
        let status = resp.status();
        let sid = resp.headers().get("mcp-session-id").and_then(|v| v.to_str().ok()).map(str::to_string);
        let is_sse = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.starts_with("text/event-stream"));
        let text = resp.text().await.map_err(|e| CenterError::Transient { tool, msg: clip(&without_url(&e)) })?;
        if status.as_u16() == 429 || status.is_server_error() {
            return Err(CenterError::Transient { tool, msg: format!("HTTP {status}") });
        }
        if status.as_u16() == 401 || status.as_u16() == 403 {
            return Err(CenterError::Permanent { tool, msg: format!("HTTP {status}: check PN_CENTER_TOKEN") });
        }
        if status.as_u16() == 202 && text.trim().is_empty() {
            return Ok((sid, Value::Null));
        }
        if !status.is_success() {
            return Err(CenterError::Permanent { tool, msg: format!("HTTP {status}") });
        }
        let v = parse_body(tool, &text, is_sse)?;
        Ok((sid, v))
    }

    /// The session id (`None` when the server keeps none) and the negotiated protocol version.
    async fn ensure_session(&self) -> Result<(Option<String>, String), CenterError> {
        let mut guard = self.session.lock().await;
        if let Some((s, v)) = guard.as_ref() {
            return Ok((Some(s.clone()).filter(|s| !s.is_empty()), v.clone()));
        }
        let init = json!({
            "jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": {
                "protocolVersion": PROTOCOL_VERSIONS[0],
                "capabilities": {},
                "clientInfo": {"name": "pnp", "version": env!("CARGO_PKG_VERSION")}
            }
        });
        let (sid, v) = self.post("initialize", &init, None, None).await?;
        let version = negotiated_version(&v)?;
        let sid = sid.filter(|s| !s.is_empty());
        let _ = self
            .post("initialize", &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}), sid.as_deref(), Some(&version))
            .await;
        *guard = Some((sid.clone().unwrap_or_default(), version.clone()));
        Ok((sid, version))
    }

    async fn call_once(&self, tool: &'static str, args: &Value) -> Result<Value, CenterError> {
        let (sid, version) = self.ensure_session().await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": args}});
        let (_, v) = match self.post(tool, &body, sid.as_deref(), Some(&version)).await {
            Err(CenterError::Permanent { msg, .. }) if msg.starts_with("HTTP 404") && sid.is_some() => {
                // The server forgot our session: start a new one next time.
                *self.session.lock().await = None;
                return Err(CenterError::Transient { tool, msg: "MCP session expired".into() });
            }
            other => other?,
        };
        interpret(tool, &v)
    }

    /// Calls a tool, retrying transient failures with jittered exponential back-off.
    pub async fn call(&self, tool: &'static str, args: Value) -> Result<Value, CenterError> {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.cfg.min_backoff)
            .with_max_delay(self.cfg.max_backoff)
            .with_max_times(self.cfg.attempts.saturating_sub(1))
            .with_jitter();
        let started = std::time::Instant::now();
        let res = (|| async { self.call_once(tool, &args).await })
            .retry(backoff)
            .when(CenterError::is_transient)
            .notify(|e, d| tracing::debug!(tool, error = %e, retry_in_ms = d.as_millis() as u64, "center call failed; retrying"))
            .await;
        metrics::histogram!("pn_center_call_seconds", "tool" => tool).record(started.elapsed().as_secs_f64());
        if res.is_err() {
            metrics::counter!("pn_center_errors_total", "tool" => tool).increment(1);
        }
        res
    }

    async fn typed<T: DeserializeOwned>(&self, tool: &'static str, args: Value) -> Result<T, CenterError> {
        let data = self.call(tool, args).await?;
        serde_json::from_value(data).map_err(|e| CenterError::Malformed { tool, msg: clip(&e.to_string()) })
    }

    async fn all_pages<T: DeserializeOwned>(&self, tool: &'static str, mut args: Value) -> Result<Vec<T>, CenterError> {
        let mut out = Vec::new();
        for page in 1..=MAX_PAGES {
            args["page"] = json!(page);
            args["pageSize"] = json!(PAGE_SIZE);
            let p: Page<T> = self.typed(tool, args.clone()).await?;
            let n = p.items.len();
            out.extend(p.items);
            if n < PAGE_SIZE as usize || (p.total > 0 && out.len() as u64 >= p.total) {
                break;
            }
        }
        Ok(out)
    }
}

/// The protocol version the server answered `initialize` with; one this client does not speak
/// (or an `initialize` error) is a permanent error: talking past each other is worse than stopping.
pub fn negotiated_version(init_answer: &Value) -> Result<String, CenterError> {
    if let Some(e) = init_answer.get("error") {
        return Err(CenterError::Permanent { tool: "initialize", msg: clip(&e.to_string()) });
    }
    match init_answer.pointer("/result/protocolVersion").and_then(Value::as_str) {
        Some(v) if PROTOCOL_VERSIONS.contains(&v) => Ok(v.to_string()),
        Some(v) => Err(CenterError::Permanent {
            tool: "initialize",
            msg: format!("server speaks MCP protocol {}, this client {}", clip(v), PROTOCOL_VERSIONS.join(" or ")),
        }),
        None => Err(CenterError::Malformed { tool: "initialize", msg: "no protocolVersion in the initialize result".into() }),
    }
}

/// The JSON-RPC message in an HTTP body: plain JSON, or the last `data:` line of an SSE stream.
pub fn parse_body(tool: &'static str, text: &str, is_sse: bool) -> Result<Value, CenterError> {
    let json_text = if is_sse {
        text.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim).rfind(|l| l.contains("\"jsonrpc\"")).unwrap_or("")
    } else {
        text
    };
    serde_json::from_str(json_text).map_err(|e| CenterError::Malformed { tool, msg: e.to_string() })
}

/// A JSON-RPC response → the tool's `data`, or a typed error. Any input gives one of the two.
pub fn interpret(tool: &'static str, v: &Value) -> Result<Value, CenterError> {
    if let Some(err) = v.get("error") {
        let code = err.get("code").and_then(Value::as_i64).unwrap_or(0);
        let msg = clip(err.get("message").and_then(Value::as_str).unwrap_or("JSON-RPC error"));
        return Err(if code == -32603 { CenterError::Transient { tool, msg } } else { CenterError::Permanent { tool, msg } });
    }
    let result = v.get("result").ok_or_else(|| CenterError::Malformed { tool, msg: "no result".into() })?;
    let text = result
        .get("content")
        .and_then(Value::as_array)
        .and_then(|c| c.iter().find_map(|item| item.get("text").and_then(Value::as_str)))
        .ok_or_else(|| CenterError::Malformed { tool, msg: "no text content".into() })?;
    let is_error = result.get("isError").and_then(Value::as_bool) == Some(true);
    let payload: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        // The official SDKs report a tool that raised as `isError: true` with the exception's
        // message as plain text: keep the message and classify it.
        Err(_) if is_error => return Err(classify_plain_error(tool, text)),
        Err(e) => return Err(CenterError::Malformed { tool, msg: e.to_string() }),
    };
    if let Some(err) = payload.get("error").filter(|e| !e.is_null()) {
        return Err(classify_tool_error(tool, err));
    }
    if is_error {
        return Err(classify_plain_error(tool, text));
    }
    payload.get("data").cloned().ok_or_else(|| CenterError::Malformed { tool, msg: "no data".into() })
}

/// reqwest errors print the URL; ours carries no secret, but keep error texts short.
fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(u) = e.url() {
        s = s.replace(u.as_str(), "<center>");
    }
    s
}

/// A tool error given as plain text (`isError: true`, as the MCP SDKs raise it): the message
/// is kept; its kind is read from the words and status codes Center's errors use. Anything not
/// recognised is permanent, so a refusal is never retried forever.
pub fn classify_plain_error(tool: &'static str, text: &str) -> CenterError {
    let msg = clip(text.trim());
    let lower = msg.to_ascii_lowercase();
    let has = |words: &[&str]| words.iter().any(|w| lower.contains(w));
    if has(&["409", "conflict", "already claimed", "not the holder", "held by", "not found", "404", "gone", "410"]) {
        CenterError::Conflict { tool, msg }
    } else if has(&["400", "422", "invalid", "rejected", "not allowed", "must be", "unknown argument", "required"]) {
        CenterError::Rejected { tool, msg }
    } else if has(&["503", "502", "504", "429", "timeout", "timed out", "unavailable", "try again", "temporarily", "rate limit"]) {
        CenterError::Transient { tool, msg }
    } else {
        CenterError::Permanent { tool, msg }
    }
}

fn classify_tool_error(tool: &'static str, err: &Value) -> CenterError {
    let code = err.get("code").and_then(|c| c.as_i64().or_else(|| c.as_str().and_then(|s| s.parse().ok()))).unwrap_or(0);
    let msg = clip(err.get("message").and_then(Value::as_str).unwrap_or("error"));
    match code {
        404 | 409 | 410 => CenterError::Conflict { tool, msg },
        400 | 422 => CenterError::Rejected { tool, msg },
        408 | 429 | 500..=599 => CenterError::Transient { tool, msg },
        _ => CenterError::Permanent { tool, msg },
    }
}

#[async_trait::async_trait]
impl Center for McpCenter {
    async fn list_node_operations(&self, f: &OpFilter) -> Result<Vec<NodeOperation>, CenterError> {
        let mut args = json!({});
        if let Some(a) = &f.action {
            args["action"] = json!(a);
        }
        if let Some(s) = &f.status {
            args["status"] = json!(s);
        }
        if let Some(i) = &f.id {
            args["id"] = json!(i);
        }
        self.all_pages("list_node_operations", args).await
    }

    async fn claim_node_operation(&self, id: &str, holder: &str, lease_seconds: u32) -> Result<Claimed, CenterError> {
        // A transient failure here is not retried: the claim may have happened and its one-time
        // token been lost; a retry would only see a conflict. The lease expiry requeues it.
        let args = json!({"id": id, "holder": holder, "leaseSeconds": lease_seconds});
        let data = self.call_once("claim_node_operation", &args).await?;
        serde_json::from_value(data).map_err(|e| CenterError::Malformed { tool: "claim_node_operation", msg: clip(&e.to_string()) })
    }

    async fn update_node_operation(
        &self,
        id: &str,
        holder: &str,
        status: &str,
        result: Option<Value>,
        error: Option<&str>,
    ) -> Result<NodeOperation, CenterError> {
        let mut args = json!({"id": id, "holder": holder, "status": status});
        if let Some(r) = result {
            args["result"] = r;
        }
        if let Some(e) = error {
            args["error"] = json!(e);
        }
        #[derive(Deserialize)]
        struct W {
            operation: NodeOperation,
        }
        let w: W = self.typed("update_node_operation", args).await?;
        Ok(w.operation)
    }

    async fn list_cloud_accounts(&self) -> Result<Vec<CloudAccount>, CenterError> {
        self.all_pages("list_cloud_accounts", json!({})).await
    }

    async fn list_cloud_regions(&self, account: &str) -> Result<Vec<CloudRegion>, CenterError> {
        self.all_pages("list_cloud_regions", json!({"account_name": account})).await
    }

    async fn list_cloud_plans(&self, account: &str, region: &str) -> Result<Vec<CloudPlan>, CenterError> {
        self.all_pages("list_cloud_plans", json!({"account_name": account, "region": region})).await
    }

    async fn list_cloud_images(&self, account: &str, region: &str) -> Result<Vec<CloudImage>, CenterError> {
        self.all_pages("list_cloud_images", json!({"account_name": account, "region": region})).await
    }

    async fn create_cloud_instance(&self, req: &CreateInstance) -> Result<CloudInstance, CenterError> {
        // Not retried blindly: a lost answer may hide a created instance. The caller probes
        // `list_cloud_instances` by name before trying again.
        let args = json!({
            "account_name": req.account_name, "region": req.region, "plan": req.plan,
            "image_id": req.image_id, "name": req.name,
        });
        let data = self.call_once("create_cloud_instance", &args).await?;
        #[derive(Deserialize)]
        struct W {
            instance: CloudInstance,
        }
        serde_json::from_value::<W>(data)
            .map(|w| w.instance)
            .map_err(|e| CenterError::Malformed { tool: "create_cloud_instance", msg: clip(&e.to_string()) })
    }

    async fn list_cloud_instances(&self, name: Option<&str>) -> Result<Vec<CloudInstance>, CenterError> {
        let mut args = json!({});
        if let Some(n) = name {
            args["name"] = json!(n);
        }
        self.all_pages("list_cloud_instances", args).await
    }

    async fn get_cloud_instance(&self, id: &str) -> Result<CloudInstance, CenterError> {
        #[derive(Deserialize)]
        struct W {
            instance: CloudInstance,
        }
        let w: W = self.typed("get_cloud_instance", json!({"id": id})).await?;
        Ok(w.instance)
    }

    async fn delete_cloud_instance(&self, id: &str) -> Result<(), CenterError> {
        self.call("delete_cloud_instance", json!({"id": id})).await.map(|_| ())
    }

    async fn list_nodes(&self, name: Option<&str>) -> Result<Vec<Node>, CenterError> {
        let mut args = json!({});
        if let Some(n) = name {
            args["name"] = json!(n);
        }
        self.all_pages("list_nodes", args).await
    }

    async fn update_node(&self, name: &str, hidden: bool) -> Result<Node, CenterError> {
        #[derive(Deserialize)]
        struct W {
            node: Node,
        }
        let w: W = self.typed("update_node", json!({"name": name, "hidden": hidden})).await?;
        Ok(w.node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn wrap(tool_json: &str) -> Value {
        json!({"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": tool_json}], "isError": false}})
    }

    #[test]
    fn tool_errors_are_typed() {
        let e = |code: i64| interpret("t", &wrap(&json!({"error": {"code": code, "message": "m"}}).to_string())).err();
        assert!(matches!(e(409), Some(CenterError::Conflict { .. })));
        assert!(matches!(e(404), Some(CenterError::Conflict { .. })));
        assert!(matches!(e(422), Some(CenterError::Rejected { .. })));
        assert!(matches!(e(503), Some(CenterError::Transient { .. })));
        assert!(matches!(e(401), Some(CenterError::Permanent { .. })));
        assert_eq!(interpret("t", &wrap(r#"{"data": {"x": 1}}"#)), Ok(json!({"x": 1})));
        assert!(matches!(interpret("t", &wrap("not json")), Err(CenterError::Malformed { .. })));
        // The SDK way: isError with the exception's text; the message survives, typed.
        let sdk = |text: &str| json!({"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": text}], "isError": true}});
        match interpret("update_node_operation", &sdk("Error executing tool update_node_operation: 409 lease held by another holder")) {
            Err(CenterError::Conflict { msg, .. }) => assert!(msg.contains("lease held by another holder"), "{msg}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(interpret("t", &sdk("invalid status: done")), Err(CenterError::Rejected { .. })));
        assert!(matches!(interpret("t", &sdk("service temporarily unavailable")), Err(CenterError::Transient { .. })));
        match interpret("t", &sdk("something odd happened")) {
            Err(CenterError::Permanent { msg, .. }) => assert_eq!(msg, "something odd happened"),
            other => panic!("{other:?}"),
        }
        let sse = "event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\n\n";
        assert!(parse_body("t", sse, true).is_ok());
    }

    #[test]
    fn the_protocol_version_is_checked() {
        let init = |v: &str| json!({"jsonrpc": "2.0", "id": 0, "result": {"protocolVersion": v, "capabilities": {}}});
        assert_eq!(negotiated_version(&init("2025-06-18")), Ok("2025-06-18".to_string()));
        assert_eq!(negotiated_version(&init("2025-03-26")), Ok("2025-03-26".to_string()));
        assert!(matches!(negotiated_version(&init("1999-01-01")), Err(CenterError::Permanent { .. })));
        assert!(matches!(negotiated_version(&json!({"result": {}})), Err(CenterError::Malformed { .. })));
        assert!(matches!(negotiated_version(&json!({"error": {"code": -32602}})), Err(CenterError::Permanent { .. })));
    }

    proptest! {
        #[test]
        fn any_body_gives_a_value_or_an_error(text in ".{0,300}", sse in any::<bool>()) {
            if let Ok(v) = parse_body("t", &text, sse) {
                let _ = interpret("t", &v);
            }
        }

        #[test]
        fn any_tool_text_gives_data_or_an_error(text in ".{0,300}") {
            let _ = interpret("t", &wrap(&text));
        }

        #[test]
        fn any_json_shape_decodes_or_errors(v in arb_json()) {
            let _ = interpret("t", &v);
            let _ = serde_json::from_value::<Page<NodeOperation>>(v.clone());
            let _ = serde_json::from_value::<Claimed>(v.clone());
            let _ = serde_json::from_value::<CloudInstance>(v);
        }
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            ".{0,20}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map(prop_oneof![Just("data".to_string()), Just("error".to_string()), Just("items".to_string()), Just("result".to_string()), Just("content".to_string()), ".{0,8}"], inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }
}
