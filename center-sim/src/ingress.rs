//! `pn-ingress`: the dev stack's stand-in for Traefik at Center's public host. Every request
//! goes to Center (`--upstream`, center-sim) and Center's answer goes back; `POST /slave/usage`
//! is **also** copied to the meter (`--mirror`), as Traefik's mirroring service with the meter
//! as a 100 % mirror does in production (`deploy/k8s/base/ingress.yaml`).
//!
//! The nodes reach the router over HTTP/1.1 (as the sidecars reach Traefik); the router reaches
//! Center and the meter over HTTP/2 cleartext (`h2c`, prior knowledge) by default, many requests
//! multiplexed on a few connections (Traefik: `scheme: h2c` for the meter's mirror, HTTP/2 to an
//! https origin that offers it); `--upstream-protocol` / `--mirror-protocol http1` give one
//! HTTP/1.1 keep-alive connection per request in flight instead. The router runs on one thread
//! by default (`--threads`). Both choices are measured in BENCHMARKS.md "Meter ingest".
//!
//! The copy is fire-and-forget: it is admitted if fewer than `--mirror-concurrency` +
//! `--mirror-queue` copies are pending, then sent as soon as one of `--mirror-concurrency`
//! sending slots is free, with a timeout; the meter's answer is read and dropped. A full queue drops the copy (reports are cumulative counters: the node's next
//! report carries the bytes), so a slow, stopped or dead meter never delays or fails Center's
//! answer. Headers and body reach both unchanged (hop-by-hop headers aside; `X-Forwarded-For`,
//! `-Proto` and `-Host` added to both, as Traefik does: the node's address reaches the meter).
//!
//! `GET /_pn_ingress/stats` answers the router's own counters (JSON); it is the one path the
//! router does not forward.
//!
//! Never: log a header or a body (they carry node credentials).

use std::ffi::OsString;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use clap::Parser;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The router's own path (not forwarded).
pub const STATS_PATH: &str = "/_pn_ingress/stats";
/// The largest body of a mirrored request the router buffers (larger: 413, like a buffering
/// middleware in front of a mirror).
const MAX_BUFFERED_BODY: usize = 1024 * 1024;

/// Flags; each also reads `PN_INGRESS_<NAME>`.
#[derive(Debug, Clone, Parser)]
#[command(name = "pn-ingress", version, about = "The dev stack's ingress at Center's host: forwards to Center, mirrors /slave/usage to the meter")]
pub struct IngressSettings {
    /// Where the router listens; port 0 picks one.
    #[arg(long, env = "PN_INGRESS_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,
    /// Center (center-sim): every request goes there, and its answer back.
    #[arg(long, env = "PN_INGRESS_UPSTREAM")]
    pub upstream: String,
    /// The meter's base URL: `POST <mirror-path>` is copied there too. Without it, nothing
    /// is mirrored.
    #[arg(long, env = "PN_INGRESS_MIRROR")]
    pub mirror: Option<String>,
    /// The one path mirrored (POST only, exact match).
    #[arg(long, env = "PN_INGRESS_MIRROR_PATH", default_value = "/slave/usage")]
    pub mirror_path: String,
    /// Copies in flight to the mirror at once.
    #[arg(long, env = "PN_INGRESS_MIRROR_CONCURRENCY", default_value_t = 256)]
    pub mirror_concurrency: usize,
    /// Copies waiting for a sending slot; beyond that a copy is dropped (counted).
    #[arg(long, env = "PN_INGRESS_MIRROR_QUEUE", default_value_t = 16_384)]
    pub mirror_queue: usize,
    /// A copy the mirror has not answered in this time is given up (counted as failed).
    #[arg(long, env = "PN_INGRESS_MIRROR_TIMEOUT_MS", default_value_t = 5000)]
    pub mirror_timeout_ms: u64,
    /// Bodies larger than this are forwarded but not mirrored (Traefik's `maxBodySize`).
    #[arg(long, env = "PN_INGRESS_MIRROR_MAX_BODY", default_value_t = 65_536)]
    pub mirror_max_body: usize,
    /// How copies reach the mirror: `h2c` (HTTP/2 cleartext with prior knowledge, the copies
    /// multiplexed over `--mirror-connections` connections; Traefik's `scheme: h2c`) or
    /// `http1` (one HTTP/1.1 keep-alive connection per copy in flight).
    #[arg(long, env = "PN_INGRESS_MIRROR_PROTOCOL", value_enum, default_value_t = Protocol::H2c)]
    pub mirror_protocol: Protocol,
    /// HTTP/2 connections the copies are spread over (`h2c` only).
    #[arg(long, env = "PN_INGRESS_MIRROR_CONNECTIONS", default_value_t = 2)]
    pub mirror_connections: usize,
    /// How requests reach Center: `h2c` (HTTP/2 cleartext with prior knowledge, multiplexed
    /// over `--upstream-connections` connections; the stand-in for Traefik's HTTP/2 to an https
    /// origin that offers it) or `http1` (HTTP/1.1 keep-alive, one request per connection).
    #[arg(long, env = "PN_INGRESS_UPSTREAM_PROTOCOL", value_enum, default_value_t = Protocol::H2c)]
    pub upstream_protocol: Protocol,
    /// HTTP/2 connections to Center (`h2c` only).
    #[arg(long, env = "PN_INGRESS_UPSTREAM_CONNECTIONS", default_value_t = 4)]
    pub upstream_connections: usize,
    /// The router's worker threads: 1 (the default) runs every connection on one thread (no
    /// wake-ups across threads: the cheapest per request, BENCHMARKS.md "Meter ingest"); 0 is
    /// tokio's default (one per core); more: that many.
    #[arg(long, env = "PN_INGRESS_THREADS", default_value_t = 1)]
    pub threads: usize,
}

/// The protocol the router speaks to a backend (the nodes always reach the router over HTTP/1.1,
/// as the sidecars do).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// HTTP/1.1 keep-alive: one request in flight per connection.
    Http1,
    /// HTTP/2 cleartext, prior knowledge (no upgrade round trip): many requests per connection.
    H2c,
}

impl IngressSettings {
    pub fn load_from<I, T>(args: I) -> IngressSettings
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        IngressSettings::parse_from(args)
    }
}

/// The router's counters (`GET /_pn_ingress/stats`).
#[derive(Debug, Default)]
pub struct Stats {
    forwarded: AtomicU64,
    upstream_errors: AtomicU64,
    mirror_queued: AtomicU64,
    mirror_dropped: AtomicU64,
    mirror_too_large: AtomicU64,
    mirror_ok: AtomicU64,
    mirror_rejected: AtomicU64,
    mirror_failed: AtomicU64,
}

/// A snapshot of [`Stats`].
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StatsView {
    /// Requests sent to Center (answered or not).
    pub forwarded: u64,
    /// Requests Center could not be reached for (502 to the caller).
    pub upstream_errors: u64,
    /// Copies queued for the mirror.
    pub mirror_queued: u64,
    /// Copies dropped because the queue was full.
    pub mirror_dropped: u64,
    /// Mirrored-path requests whose body exceeded `--mirror-max-body` (not copied).
    pub mirror_too_large: u64,
    /// Copies the mirror answered 2xx (for the meter: recorded in its flushed ledger).
    pub mirror_ok: u64,
    /// Copies the mirror answered with another status.
    pub mirror_rejected: u64,
    /// Copies not answered: connection refused, reset, or the timeout.
    pub mirror_failed: u64,
}

impl Stats {
    pub fn view(&self) -> StatsView {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsView {
            forwarded: g(&self.forwarded),
            upstream_errors: g(&self.upstream_errors),
            mirror_queued: g(&self.mirror_queued),
            mirror_dropped: g(&self.mirror_dropped),
            mirror_too_large: g(&self.mirror_too_large),
            mirror_ok: g(&self.mirror_ok),
            mirror_rejected: g(&self.mirror_rejected),
            mirror_failed: g(&self.mirror_failed),
        }
    }
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

type HttpClient = Client<HttpConnector, Body>;

/// A backend's clients: one for HTTP/1.1 (its own pool of keep-alive connections), or one per
/// HTTP/2 connection (a legacy client keeps one h2 connection per host), taken in turn.
struct Backend {
    clients: Vec<HttpClient>,
    next: AtomicUsize,
    version: axum::http::Version,
}

impl Backend {
    fn new(protocol: Protocol, connections: usize, max_idle: usize) -> Backend {
        match protocol {
            Protocol::Http1 => Backend { clients: vec![client(max_idle, false)], next: AtomicUsize::new(0), version: axum::http::Version::HTTP_11 },
            Protocol::H2c => Backend {
                clients: (0..connections.max(1)).map(|_| client(1, true)).collect(),
                next: AtomicUsize::new(0),
                version: axum::http::Version::HTTP_2,
            },
        }
    }

    fn client(&self) -> &HttpClient {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len().max(1);
        &self.clients[i]
    }
}

/// One copy for the mirror.
struct MirrorJob {
    path_and_query: String,
    headers: HeaderMap,
    body: Bytes,
}

/// Where copies go, and the two bounds on them.
struct Mirror {
    base: String,
    backend: Backend,
    /// Copies pending (sending or waiting): `--mirror-concurrency` + `--mirror-queue` permits.
    admitted: Arc<Semaphore>,
    /// Copies being sent: `--mirror-concurrency` permits.
    sending: Arc<Semaphore>,
    timeout: Duration,
    stats: Arc<Stats>,
}

struct Inner {
    upstream: String,
    mirror_path: String,
    mirror_max_body: usize,
    upstream_backend: Backend,
    mirror: Option<Arc<Mirror>>,
    stats: Arc<Stats>,
}

#[derive(Clone)]
struct Ingress(Arc<Inner>);

/// A base URL `http://host:port` (no path), checked.
fn base_url(flag: &str, u: &str) -> anyhow::Result<String> {
    let u = u.trim().trim_end_matches('/');
    let uri: Uri = u.parse().with_context(|| format!("{flag} {u:?} is not a URL"))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        bail!("{flag} must be an http://host:port URL (the router speaks plain HTTP), got {u:?}");
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        bail!("{flag} must have no path, got {u:?}");
    }
    Ok(u.to_string())
}

fn client(max_idle: usize, h2c: bool) -> HttpClient {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    conn.set_connect_timeout(Some(Duration::from_secs(5)));
    let mut b = Client::builder(TokioExecutor::new());
    b.pool_max_idle_per_host(max_idle).pool_idle_timeout(Duration::from_secs(90));
    if h2c {
        b.http2_only(true);
    }
    b.build(conn)
}

/// Connection-level headers a proxy does not pass on (RFC 9110 §7.6.1).
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        HeaderName::from_static("proxy-connection"),
    ] {
        h.remove(n);
    }
}

/// A built router: bound, not yet serving.
pub struct App {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    ingress: Ingress,
}

impl App {
    pub async fn build(s: IngressSettings) -> anyhow::Result<App> {
        let upstream = base_url("--upstream", &s.upstream)?;
        let mirror = s.mirror.as_deref().filter(|m| !m.trim().is_empty()).map(|m| base_url("--mirror", m)).transpose()?;
        if !s.mirror_path.starts_with('/') {
            bail!("--mirror-path must start with /");
        }
        if s.mirror_concurrency == 0 || s.mirror_queue == 0 {
            bail!("--mirror-concurrency and --mirror-queue must be positive");
        }
        if s.mirror_connections == 0 || s.upstream_connections == 0 {
            bail!("--mirror-connections and --upstream-connections must be positive");
        }
        let listener = tokio::net::TcpListener::bind(s.listen).await.with_context(|| format!("listen on {}", s.listen))?;
        let mut addr = listener.local_addr()?;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
        }
        let stats = Arc::new(Stats::default());
        let mirror = mirror.map(|base| {
            Arc::new(Mirror {
                base,
                backend: Backend::new(s.mirror_protocol, s.mirror_connections, s.mirror_concurrency),
                admitted: Arc::new(Semaphore::new(s.mirror_concurrency.saturating_add(s.mirror_queue))),
                sending: Arc::new(Semaphore::new(s.mirror_concurrency)),
                timeout: Duration::from_millis(s.mirror_timeout_ms.max(1)),
                stats: stats.clone(),
            })
        });
        let inner = Inner { upstream, mirror_path: s.mirror_path, mirror_max_body: s.mirror_max_body, upstream_backend: Backend::new(s.upstream_protocol, s.upstream_connections, 1024), mirror, stats };
        Ok(App { listener, addr, ingress: Ingress(Arc::new(inner)) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Serves until `shutdown` resolves.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let router = Router::new().route(STATS_PATH, get(stats)).fallback(proxy).with_state(self.ingress);
        let listener = self.listener.tap_io(|t| {
            let _ = t.set_nodelay(true);
        });
        axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>()).with_graceful_shutdown(shutdown).await.context("serve")
    }
}

/// The `pn-ingress` process: flags (program name first), the first stdout line
/// `pn-ingress listening on http://ADDR`, then the router until SIGTERM/Ctrl-C.
pub fn main_entry<I, T>(args: I) -> anyhow::Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let settings = IngressSettings::load_from(args);
    let rt = match settings.threads {
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build()?,
        0 => tokio::runtime::Builder::new_multi_thread().enable_all().build()?,
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build()?,
    };
    rt.block_on(async {
        kit::telemetry::init(kit::config::LogFormat::from_env());
        let mirroring = settings.mirror.clone().unwrap_or_default();
        let app = App::build(settings).await?;
        tracing::info!(listen = %app.addr(), mirror = %mirroring, "pn-ingress up");
        let mut out = std::io::stdout();
        writeln!(out, "pn-ingress listening on {}", app.base_url())?;
        out.flush()?;
        app.run(kit::shutdown::signal()).await
    })
}

async fn stats(State(ing): State<Ingress>) -> Response {
    axum::Json(ing.0.stats.view()).into_response()
}

fn bad_gateway() -> Response {
    (StatusCode::BAD_GATEWAY, axum::Json(json!({"error": "Bad Gateway: Center is unreachable"}))).into_response()
}

async fn proxy(State(ing): State<Ingress>, ConnectInfo(peer): ConnectInfo<SocketAddr>, req: Request) -> Response {
    let ing = &ing.0;
    let (mut parts, body) = req.into_parts();
    let pq = parts.uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
    let mirrored = ing.mirror.is_some() && parts.method == Method::POST && parts.uri.path() == ing.mirror_path;
    strip_hop_by_hop(&mut parts.headers);
    // As Traefik does for every backend, the mirror included: who asked, over what, for which host.
    let host = parts.headers.get(header::HOST).cloned();
    let fwd_for = match parts.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&fwd_for) {
        parts.headers.insert(HeaderName::from_static("x-forwarded-for"), v);
    }
    parts.headers.insert(HeaderName::from_static("x-forwarded-proto"), HeaderValue::from_static("http"));
    if let Some(h) = host {
        parts.headers.insert(HeaderName::from_static("x-forwarded-host"), h);
    }
    let body = if mirrored {
        let bytes = match axum::body::to_bytes(body, MAX_BUFFERED_BODY).await {
            Ok(b) => b,
            Err(_) => return (StatusCode::PAYLOAD_TOO_LARGE, axum::Json(json!({"error": "body too large"}))).into_response(),
        };
        if bytes.len() > ing.mirror_max_body {
            bump(&ing.stats.mirror_too_large);
        } else if let Some(m) = &ing.mirror {
            // Admitted before Center is asked, sent by its own task: Center's answer never waits.
            match m.admitted.clone().try_acquire_owned() {
                Ok(admit) => {
                    bump(&ing.stats.mirror_queued);
                    let job = MirrorJob { path_and_query: pq.clone(), headers: parts.headers.clone(), body: bytes.clone() };
                    tokio::spawn(send_copy(m.clone(), job, admit));
                }
                Err(_) => bump(&ing.stats.mirror_dropped),
            }
        }
        Body::from(bytes)
    } else {
        body
    };
    let Ok(uri) = format!("{}{pq}", ing.upstream).parse::<Uri>() else {
        return (StatusCode::BAD_REQUEST, "bad request target").into_response();
    };
    parts.uri = uri;
    parts.version = ing.upstream_backend.version;
    bump(&ing.stats.forwarded);
    match ing.upstream_backend.client().request(Request::from_parts(parts, body)).await {
        Ok(resp) => {
            let (mut rp, rb) = resp.into_parts();
            strip_hop_by_hop(&mut rp.headers);
            // The node asked over HTTP/1.1, whatever Center was asked over.
            rp.version = axum::http::Version::HTTP_11;
            Response::from_parts(rp, Body::new(rb))
        }
        Err(_) => {
            bump(&ing.stats.upstream_errors);
            bad_gateway()
        }
    }
}

/// Sends one copy when a sending slot is free; the answer is read and dropped.
async fn send_copy(m: Arc<Mirror>, job: MirrorJob, _admitted: OwnedSemaphorePermit) {
    let Ok(_sending) = m.sending.acquire().await else { return };
    let Ok(uri) = format!("{}{}", m.base, job.path_and_query).parse::<Uri>() else {
        bump(&m.stats.mirror_failed);
        return;
    };
    let mut req = Request::new(Body::from(job.body));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = uri;
    *req.version_mut() = m.backend.version;
    *req.headers_mut() = job.headers;
    req.headers_mut().remove(header::CONTENT_LENGTH);
    let sent = tokio::time::timeout(m.timeout, async {
        let resp = m.backend.client().request(req).await.ok()?;
        let ok = resp.status().is_success();
        // Read the answer to the end (it goes nowhere) so the connection is reused.
        let _ = axum::body::to_bytes(Body::new(resp.into_body()), 1024 * 1024).await;
        Some(ok)
    })
    .await;
    match sent {
        Ok(Some(true)) => bump(&m.stats.mirror_ok),
        Ok(Some(false)) => bump(&m.stats.mirror_rejected),
        Ok(None) | Err(_) => bump(&m.stats.mirror_failed),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn base_urls_are_plain_http_without_a_path() {
        assert_eq!(base_url("--upstream", "http://127.0.0.1:9/").unwrap(), "http://127.0.0.1:9");
        assert!(base_url("--upstream", "https://x:1").is_err());
        assert!(base_url("--upstream", "http://x:1/api").is_err());
        assert!(base_url("--upstream", "not a url").is_err());
    }

    #[test]
    fn hop_by_hop_headers_go_and_the_rest_stays() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h[header::AUTHORIZATION], "Basic abc");
    }
}
