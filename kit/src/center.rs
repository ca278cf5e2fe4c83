//! The Center client: typed calls for the MCP tools the runbook uses, behind the `Center`
//! trait so that a REST transport can be added without touching the services.
//!
//! Transport: MCP streamable HTTP — JSON-RPC 2.0 `tools/call` POSTed to `<center>/mcp` with a
//! bearer token; the tool's JSON (`{data: …}` or `{error: {code, message}}`) is the text
//! content of the result. Errors are typed (conflict, rejected, transient, permanent,
//! unsupported, malformed); transient ones are retried with jittered exponential back-off
//! (`backon`). Error texts never carry request arguments, so no secret can reach them.
//!
//! Arguments: the names runbook 000 shows (`account_name`, `image_id`, `leaseSeconds`,
//! `pageSize`, …), spelled as the tool's published input schema (`tools/list`, read once per
//! session) spells them — so a Center that publishes strict camelCase or snake_case is
//! followed. The arguments the runbook does not show (`id` on `list_node_operations`, `holder`
//! on `update_node_operation`, paging on the lists it does not page) are sent only when the
//! schema declares them. A call refused for its arguments re-reads the schemas and is tried
//! once more. Lists are paged until an empty page or `total` (a short page is not the last:
//! a Center may cap pages below the size asked).
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
    /// This Center has no such tool (an unknown-tool error): retrying will not help until
    /// Center changes. Callers report what they could not do.
    #[error("center {tool}: tool not offered by this Center: {msg}")]
    Unsupported { tool: &'static str, msg: String },
}

/// The words an `Unsupported` error's text carries (also through `ProviderError`'s text).
pub const UNSUPPORTED_MARK: &str = "tool not offered by this Center";

impl CenterError {
    pub fn is_transient(&self) -> bool {
        matches!(self, CenterError::Transient { .. })
    }
    pub fn is_conflict(&self) -> bool {
        matches!(self, CenterError::Conflict { .. })
    }
    /// Center does not offer the tool at all.
    pub fn is_unsupported(&self) -> bool {
        matches!(self, CenterError::Unsupported { .. })
    }
    /// Center refused the call's arguments (an unknown, misspelled or mistyped name): a
    /// schema-checking server's answer; nothing was done.
    pub fn is_invalid_arguments(&self) -> bool {
        match self {
            CenterError::Permanent { msg, .. } | CenterError::Rejected { msg, .. } => {
                let m = msg.to_ascii_lowercase();
                ["invalid arguments", "unknown argument", "input validation error", "invalid params"].iter().any(|w| m.contains(w))
            }
            _ => false,
        }
    }
}

/// Whether an error text says the tool does not exist ("Unknown tool: x", the MCP spec's and
/// the SDKs' wording; "tool not found"; "no such tool").
fn says_unknown_tool(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    ["unknown tool", "tool not found", "no such tool"].iter().any(|w| m.contains(w))
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
    /// `list_node_operations` paged only until an item for which `stop` holds (that item is the
    /// last one returned), or the list ends.
    async fn list_node_operations_until(
        &self,
        f: &OpFilter,
        stop: &(dyn for<'x> Fn(&'x NodeOperation) -> bool + Send + Sync),
    ) -> Result<Vec<NodeOperation>, CenterError> {
        let mut all = self.list_node_operations(f).await?;
        if let Some(i) = all.iter().position(stop) {
            all.truncate(i + 1);
        }
        Ok(all)
    }
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
    /// Opens `port`/`protocol` (`tcp` | `udp`) in the instance's provider firewall; answers
    /// the ports now open (`"1022/tcp"`). An assumed tool, `open_cloud_instance_port` (the
    /// seeds list none; center-sim/README.md): a Center without it answers `Unsupported`.
    async fn open_cloud_instance_port(&self, id: &str, port: u16, protocol: &str) -> Result<Vec<String>, CenterError> {
        let _ = (id, port, protocol);
        Err(CenterError::Unsupported { tool: "open_cloud_instance_port", msg: "not implemented by this client".into() })
    }
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
    /// The tools' argument names as `tools/list` published them (`None`: not read yet).
    schemas: std::sync::RwLock<Option<(Arc<Schemas>, std::time::Instant)>>,
}

/// The argument names each tool's input schema declares, as `tools/list` answered.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Schemas {
    /// Tool → the names of its schema's properties. A tool listed without properties maps to
    /// an empty list.
    pub tools: std::collections::HashMap<String, Vec<String>>,
    /// `tools/list` answered (false: it failed; every argument is sent as the runbook names it).
    pub known: bool,
}

/// Whether an argument goes out only when the tool's schema declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// One the runbook shows for this call: always sent (spelled as the schema spells it).
    Always,
    /// Beyond the runbook: sent only when the schema declares it (or no schema is known).
    IfDeclared,
}

/// An argument name reduced for matching across spellings: lower case, no `_` or `-`.
fn norm(name: &str) -> String {
    name.chars().filter(|c| *c != '_' && *c != '-').flat_map(char::to_lowercase).collect()
}

impl Schemas {
    /// Reads a `tools/list` result (`{tools: [{name, inputSchema: {properties}}]}`).
    pub fn from_list(result: &Value) -> Schemas {
        let mut tools = std::collections::HashMap::new();
        for t in result.get("tools").and_then(Value::as_array).into_iter().flatten() {
            let Some(name) = t.get("name").and_then(Value::as_str) else { continue };
            let props = t
                .pointer("/inputSchema/properties")
                .and_then(Value::as_object)
                .map(|p| p.keys().cloned().collect())
                .unwrap_or_default();
            tools.insert(name.to_string(), props);
        }
        Schemas { tools, known: true }
    }

    /// The call's arguments: each runbook name spelled as `tool`'s schema spells it; an
    /// `IfDeclared` one dropped when the schema does not declare it. With no schema for the
    /// tool, every argument goes out as the runbook names it. Null values are left out.
    pub fn args(&self, tool: &str, list: &[(&'static str, Value, Need)]) -> Value {
        let mut out = serde_json::Map::new();
        let props = if self.known { self.tools.get(tool) } else { None };
        for (name, value, need) in list {
            if value.is_null() {
                continue;
            }
            let spelled = match props {
                None => Some(name.to_string()),
                Some(p) => match p.iter().find(|p| norm(p) == norm(name)) {
                    Some(p) => Some(p.clone()),
                    None if *need == Need::Always => Some(name.to_string()),
                    None => None,
                },
            };
            if let Some(k) = spelled {
                out.insert(k, value.clone());
            }
        }
        Value::Object(out)
    }

    /// Whether `tool`'s schema declares `name` (in any spelling); true when unknown.
    pub fn declares(&self, tool: &str, name: &str) -> bool {
        match self.tools.get(tool) {
            Some(p) if self.known => p.iter().any(|p| norm(p) == norm(name)),
            _ => true,
        }
    }
}

/// MCP protocol versions this client speaks, newest first (the transport spec of each).
pub const PROTOCOL_VERSIONS: [&str; 2] = ["2025-06-18", "2025-03-26"];

impl std::fmt::Debug for McpCenter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "McpCenter({})", self.cfg.base_url)
    }
}

const PAGE_SIZE: u32 = 100;
/// How long a failed `tools/list` is taken as "no schema known" before it is read again.
const SCHEMA_RETRY: Duration = Duration::from_secs(60);
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
        Ok(Arc::new(McpCenter {
            http,
            cfg,
            token,
            next_id: AtomicU64::new(1),
            session: tokio::sync::Mutex::new(None),
            schemas: std::sync::RwLock::new(None),
        }))
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
        use tracing::Instrument;
        // One span per tool call (each try): the tool's name only, never its arguments.
        let span = crate::trace::with_trace_id(tracing::info_span!("center.call", tool, trace_id = tracing::field::Empty));
        self.call_once_traced(tool, args).instrument(span).await
    }

    async fn call_once_traced(&self, tool: &'static str, args: &Value) -> Result<Value, CenterError> {
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

    /// The tools' schemas, read with `tools/list` once (again after `refresh_schemas`). A
    /// failed read is remembered as unknown for `SCHEMA_RETRY` (every argument then goes out
    /// as the runbook names it), then tried again.
    pub async fn schemas(&self) -> Arc<Schemas> {
        if let Some((s, at)) = self.schemas.read().ok().and_then(|g| g.clone())
            && (s.known || at.elapsed() < SCHEMA_RETRY)
        {
            return s;
        }
        let s = Arc::new(self.read_schemas().await);
        if let Ok(mut g) = self.schemas.write() {
            *g = Some((s.clone(), std::time::Instant::now()));
        }
        s
    }

    /// Forgets the schemas: the next call reads `tools/list` again.
    pub fn refresh_schemas(&self) {
        if let Ok(mut g) = self.schemas.write() {
            *g = None;
        }
    }

    async fn read_schemas(&self) -> Schemas {
        let mut out = Schemas { known: true, ..Default::default() };
        let mut cursor: Option<String> = None;
        for _ in 0..100 {
            let attempt = async {
                let (sid, version) = self.ensure_session().await?;
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let params = match &cursor {
                    Some(c) => json!({"cursor": c}),
                    None => json!({}),
                };
                let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/list", "params": params});
                let (_, v) = self.post("tools/list", &body, sid.as_deref(), Some(&version)).await?;
                Ok::<Value, CenterError>(v)
            };
            match attempt.await {
                Ok(v) if v.get("result").is_some() => {
                    let result = &v["result"];
                    out.tools.extend(Schemas::from_list(result).tools);
                    cursor = result.get("nextCursor").and_then(Value::as_str).map(str::to_string);
                    if cursor.is_none() {
                        return out;
                    }
                }
                Ok(_) | Err(_) => {
                    tracing::warn!("center: tools/list failed; arguments go out as the runbook names them");
                    return Schemas::default();
                }
            }
        }
        out
    }

    /// Calls `tool` once with the arguments `build` makes from the schemas; a call refused for
    /// its arguments re-reads the schemas and is tried once more (nothing was done).
    async fn call_args(&self, tool: &'static str, once: bool, build: &(dyn Fn(&Schemas) -> Value + Send + Sync)) -> Result<Value, CenterError> {
        let mut refreshed = false;
        loop {
            let args = build(&*self.schemas().await);
            let res = if once { self.call_once(tool, &args).await } else { self.call(tool, args).await };
            match res {
                Err(e) if e.is_invalid_arguments() && !refreshed => {
                    tracing::warn!(tool, error = %e, "center refused the arguments; reading the tools' schemas again");
                    self.refresh_schemas();
                    refreshed = true;
                }
                other => return other,
            }
        }
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

    async fn typed<T: DeserializeOwned>(&self, tool: &'static str, list: Vec<(&'static str, Value, Need)>) -> Result<T, CenterError> {
        let data = self.call_args(tool, false, &|s: &Schemas| s.args(tool, &list)).await?;
        serde_json::from_value(data).map_err(|e| CenterError::Malformed { tool, msg: clip(&e.to_string()) })
    }

    async fn all_pages<T: DeserializeOwned>(&self, tool: &'static str, list: Vec<(&'static str, Value, Need)>) -> Result<Vec<T>, CenterError> {
        self.pages(tool, list, &|_: &T| false).await
    }

    /// Pages through a list until an empty page, `total` items, or an item for which `stop`
    /// holds. A page shorter than asked is *not* taken as the last (a Center may cap pages).
    /// A Center that does not page the tool (its schema has no `page`) answers in one call.
    async fn pages<T: DeserializeOwned>(
        &self,
        tool: &'static str,
        list: Vec<(&'static str, Value, Need)>,
        stop: &(dyn Fn(&T) -> bool + Send + Sync),
    ) -> Result<Vec<T>, CenterError> {
        let mut out: Vec<T> = Vec::new();
        let mut previous: Option<Value> = None;
        for page in 1..=MAX_PAGES {
            let mut with_page = list.clone();
            with_page.push(("page", json!(page), Need::IfDeclared));
            with_page.push(("pageSize", json!(PAGE_SIZE), Need::IfDeclared));
            let paged = self.schemas().await.declares(tool, "page");
            let data = self.call_args(tool, false, &|s: &Schemas| s.args(tool, &with_page)).await?;
            let items = data.get("items").cloned().unwrap_or(Value::Null);
            if items.as_array().is_none() {
                return Err(CenterError::Malformed { tool, msg: "no items[] in the page".into() });
            }
            if previous.as_ref() == Some(&items) {
                // The same page twice: this Center ignores `page`. What was read is all there is.
                tracing::warn!(tool, page, "center answered the same page again (paging ignored?); stopped paging");
                break;
            }
            let p: Page<T> = serde_json::from_value(data).map_err(|e| CenterError::Malformed { tool, msg: clip(&e.to_string()) })?;
            if p.items.is_empty() {
                break;
            }
            let before = out.len();
            out.extend(p.items);
            if out[before..].iter().any(stop) {
                if let Some(i) = out.iter().skip(before).position(stop) {
                    out.truncate(before + i + 1);
                }
                break;
            }
            if !paged || (p.total > 0 && out.len() as u64 >= p.total) {
                break;
            }
            previous = Some(items);
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
        return Err(match code {
            -32603 => CenterError::Transient { tool, msg },
            -32601 | -32602 if says_unknown_tool(&msg) => CenterError::Unsupported { tool, msg },
            _ => CenterError::Permanent { tool, msg },
        });
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
    if says_unknown_tool(&msg) {
        CenterError::Unsupported { tool, msg }
    } else if has(&["409", "conflict", "already claimed", "not the holder", "held by", "not found", "404", "gone", "410"]) {
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
        self.pages("list_node_operations", op_filter_args(f), &|_: &NodeOperation| false).await
    }

    async fn list_node_operations_until(
        &self,
        f: &OpFilter,
        stop: &(dyn for<'x> Fn(&'x NodeOperation) -> bool + Send + Sync),
    ) -> Result<Vec<NodeOperation>, CenterError> {
        self.pages("list_node_operations", op_filter_args(f), stop).await
    }

    async fn claim_node_operation(&self, id: &str, holder: &str, lease_seconds: u32) -> Result<Claimed, CenterError> {
        // A transient failure here is not retried: the claim may have happened and its one-time
        // token been lost; a retry would only see a conflict. The lease expiry requeues it.
        let list = [("id", json!(id), Need::Always), ("holder", json!(holder), Need::Always), ("leaseSeconds", json!(lease_seconds), Need::Always)];
        let data = self.call_args("claim_node_operation", true, &|s: &Schemas| s.args("claim_node_operation", &list)).await?;
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
        // The runbook's call: id, status, result | error. `holder` goes along where Center's
        // schema declares it (a Center that checks it refuses a report from one that lost the lease).
        let list = vec![
            ("id", json!(id), Need::Always),
            ("status", json!(status), Need::Always),
            ("result", result.unwrap_or(Value::Null), Need::Always),
            ("error", error.map(|e| json!(e)).unwrap_or(Value::Null), Need::Always),
            ("holder", json!(holder), Need::IfDeclared),
        ];
        #[derive(Deserialize)]
        struct W {
            operation: NodeOperation,
        }
        let w: W = self.typed("update_node_operation", list).await?;
        Ok(w.operation)
    }

    async fn list_cloud_accounts(&self) -> Result<Vec<CloudAccount>, CenterError> {
        self.all_pages("list_cloud_accounts", vec![]).await
    }

    async fn list_cloud_regions(&self, account: &str) -> Result<Vec<CloudRegion>, CenterError> {
        self.all_pages("list_cloud_regions", vec![("account_name", json!(account), Need::Always)]).await
    }

    async fn list_cloud_plans(&self, account: &str, region: &str) -> Result<Vec<CloudPlan>, CenterError> {
        self.all_pages("list_cloud_plans", vec![("account_name", json!(account), Need::Always), ("region", json!(region), Need::Always)]).await
    }

    async fn list_cloud_images(&self, account: &str, region: &str) -> Result<Vec<CloudImage>, CenterError> {
        self.all_pages("list_cloud_images", vec![("account_name", json!(account), Need::Always), ("region", json!(region), Need::Always)]).await
    }

    async fn create_cloud_instance(&self, req: &CreateInstance) -> Result<CloudInstance, CenterError> {
        // Not retried blindly: a lost answer may hide a created instance. The caller probes
        // `list_cloud_instances` by name before trying again.
        let list = [
            ("account_name", json!(req.account_name), Need::Always),
            ("region", json!(req.region), Need::Always),
            ("plan", json!(req.plan), Need::Always),
            ("image_id", json!(req.image_id), Need::Always),
            ("name", json!(req.name), Need::Always),
        ];
        let data = self.call_args("create_cloud_instance", true, &|s: &Schemas| s.args("create_cloud_instance", &list)).await?;
        #[derive(Deserialize)]
        struct W {
            instance: CloudInstance,
        }
        serde_json::from_value::<W>(data)
            .map(|w| w.instance)
            .map_err(|e| CenterError::Malformed { tool: "create_cloud_instance", msg: clip(&e.to_string()) })
    }

    async fn list_cloud_instances(&self, name: Option<&str>) -> Result<Vec<CloudInstance>, CenterError> {
        self.all_pages("list_cloud_instances", vec![("name", name.map(|n| json!(n)).unwrap_or(Value::Null), Need::Always)]).await
    }

    async fn get_cloud_instance(&self, id: &str) -> Result<CloudInstance, CenterError> {
        #[derive(Deserialize)]
        struct W {
            instance: CloudInstance,
        }
        let w: W = self.typed("get_cloud_instance", vec![("id", json!(id), Need::Always)]).await?;
        Ok(w.instance)
    }

    async fn delete_cloud_instance(&self, id: &str) -> Result<(), CenterError> {
        let list = [("id", json!(id), Need::Always)];
        self.call_args("delete_cloud_instance", false, &|s: &Schemas| s.args("delete_cloud_instance", &list)).await.map(|_| ())
    }

    async fn list_nodes(&self, name: Option<&str>) -> Result<Vec<Node>, CenterError> {
        self.all_pages("list_nodes", vec![("name", name.map(|n| json!(n)).unwrap_or(Value::Null), Need::Always)]).await
    }

    async fn update_node(&self, name: &str, hidden: bool) -> Result<Node, CenterError> {
        #[derive(Deserialize)]
        struct W {
            node: Node,
        }
        let w: W = self.typed("update_node", vec![("name", json!(name), Need::Always), ("hidden", json!(hidden), Need::Always)]).await?;
        Ok(w.node)
    }

    async fn open_cloud_instance_port(&self, id: &str, port: u16, protocol: &str) -> Result<Vec<String>, CenterError> {
        #[derive(Deserialize)]
        struct W {
            #[serde(default)]
            ports: Vec<String>,
        }
        let list = vec![("id", json!(id), Need::Always), ("port", json!(port), Need::Always), ("protocol", json!(protocol), Need::Always)];
        let w: W = self.typed("open_cloud_instance_port", list).await?;
        Ok(w.ports)
    }
}

/// `list_node_operations`'s filters: `action` and `status` as the runbook shows them; `id` (not
/// in the runbook) only where Center's schema declares it.
fn op_filter_args(f: &OpFilter) -> Vec<(&'static str, Value, Need)> {
    let opt = |v: &Option<String>| v.as_ref().map(|s| json!(s)).unwrap_or(Value::Null);
    vec![("action", opt(&f.action), Need::Always), ("status", opt(&f.status), Need::Always), ("id", opt(&f.id), Need::IfDeclared)]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
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
    fn unknown_tools_are_unsupported_and_bad_arguments_are_recognised() {
        let rpc = |code: i64, m: &str| json!({"jsonrpc": "2.0", "id": 1, "error": {"code": code, "message": m}});
        assert!(interpret("update_node", &rpc(-32602, "Unknown tool: update_node")).unwrap_err().is_unsupported());
        assert!(interpret("update_node", &rpc(-32601, "tool not found")).unwrap_err().is_unsupported());
        let bad = interpret("list_nodes", &rpc(-32602, "Invalid arguments for tool list_nodes: unknown argument 'page_size'")).unwrap_err();
        assert!(bad.is_invalid_arguments() && !bad.is_unsupported() && !bad.is_transient(), "{bad:?}");
        // The SDK way: isError with the text.
        let sdk = |text: &str| json!({"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": text}], "isError": true}});
        assert!(interpret("delete_cloud_instance", &sdk("Unknown tool: delete_cloud_instance")).unwrap_err().is_unsupported());
        assert!(interpret("t", &sdk("Input validation error: 'x' is a required property")).unwrap_err().is_invalid_arguments());
        assert!(!interpret("t", &sdk("Error executing tool t: boom")).unwrap_err().is_unsupported());
    }

    #[test]
    fn arguments_follow_the_published_schema() {
        let list = json!({"tools": [
            {"name": "create_cloud_instance", "inputSchema": {"type": "object", "properties": {"accountName": {}, "region": {}, "plan": {}, "imageId": {}, "name": {}}}},
            {"name": "claim_node_operation", "inputSchema": {"properties": {"id": {}, "holder": {}, "lease_seconds": {}}}},
            {"name": "update_node_operation", "inputSchema": {"properties": {"id": {}, "status": {}, "result": {}, "error": {}}}},
            {"name": "list_cloud_accounts", "inputSchema": {"type": "object"}},
        ]});
        let s = Schemas::from_list(&list);
        let a = s.args("create_cloud_instance", &[("account_name", json!("a"), Need::Always), ("image_id", json!("i"), Need::Always), ("name", json!("n"), Need::Always)]);
        assert_eq!(a, json!({"accountName": "a", "imageId": "i", "name": "n"}));
        let a = s.args("claim_node_operation", &[("id", json!("o"), Need::Always), ("leaseSeconds", json!(60), Need::Always)]);
        assert_eq!(a, json!({"id": "o", "lease_seconds": 60}));
        // `holder` is not in the runbook's update call: dropped where the schema lacks it.
        let a = s.args("update_node_operation", &[("id", json!("o"), Need::Always), ("status", json!("failed"), Need::Always), ("result", Value::Null, Need::Always), ("holder", json!("h"), Need::IfDeclared)]);
        assert_eq!(a, json!({"id": "o", "status": "failed"}));
        // A list that declares no paging gets none; a tool not listed gets the runbook's names.
        assert_eq!(s.args("list_cloud_accounts", &[("page", json!(1), Need::IfDeclared)]), json!({}));
        assert!(!s.declares("list_cloud_accounts", "page"));
        assert_eq!(s.args("list_nodes", &[("pageSize", json!(100), Need::IfDeclared)]), json!({"pageSize": 100}));
        // No schema at all: everything as the runbook names it.
        let none = Schemas::default();
        assert_eq!(none.args("update_node_operation", &[("id", json!("o"), Need::Always), ("holder", json!("h"), Need::IfDeclared)]), json!({"id": "o", "holder": "h"}));
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
