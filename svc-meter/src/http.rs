//! The meter's HTTP surfaces.
//!
//! Public (`PN_LISTEN`, what Traefik reaches):
//! - `POST /slave/usage` (Basic `ipv4:secret`, JSON counters) → 200 `Ingested`; 401, 400, 413,
//!   422 (impossible jump; an `at` more than `PN_MAX_CLOCK_AHEAD_MS` ahead), 429 (too fast, or
//!   the source — the peer, or what a `PN_TRUSTED_PROXIES` proxy names in `X-Forwarded-For` —
//!   spent its budget of failed authentications; `Retry-After`), 503 (ledger unavailable),
//!   408 (slow).
//! - `GET /v1/admission/<node>` → 200 `{"node","admitted":true}` or 402
//!   `{"node","admitted":false}` — no state, no bytes used or sold; 404 unknown.
//! - `GET /healthz` → `ok` (the ingest port answers).
//!
//! Internal (`PN_INTERNAL_LISTEN`, loopback; `Authorization: Bearer <PN_INTERNAL_TOKEN>`, else
//! 401; `pnctl ledger`, the demo, an operator through `kubectl port-forward`):
//! - `GET /v1/nodes` → `{"items":[{node,ipv4,usedBytes,soldBytes,state}]}`;
//! - `GET /v1/nodes/<node>/usage` → the ledger view; `PUT /v1/nodes/<node>/quota` `{soldBytes}`.
//!
//! Errors are JSON `{"error": <code>, "message": <text>}`; the 401 body is the same for every
//! cause, so that an unknown address and a wrong secret cannot be told apart.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::Extension;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::Deserialize;
use secrecy::SecretString;
use serde_json::json;
use tower_http::timeout::TimeoutLayer;

use crate::meter::{IngestError, Meter};
use crate::quota::State as QuotaState;

/// A failed request, mapped to a status and a JSON body once.
#[derive(Debug)]
pub enum ApiError {
    Unauthorized,
    BadRequest(String),
    PayloadTooLarge,
    TooManyRequests { retry_after: Duration, message: &'static str },
    Unprocessable(String),
    NotFound,
    Unavailable(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, msg) = match self {
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized", "bad or missing node credentials".to_string()),
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, "bad_request", m),
            ApiError::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "body too large".to_string()),
            ApiError::TooManyRequests { retry_after, message } => {
                let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
                let body = json!({"error": "too_many_requests", "message": message, "retryAfterMs": retry_after.as_millis() as u64});
                let mut r = (StatusCode::TOO_MANY_REQUESTS, axum::Json(body)).into_response();
                r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
                return r;
            }
            ApiError::Unprocessable(m) => (StatusCode::UNPROCESSABLE_ENTITY, "unprocessable", m),
            ApiError::NotFound => (StatusCode::NOT_FOUND, "not_found", "unknown node".to_string()),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", "ledger unavailable; retry".to_string()),
        };
        let mut r = (status, axum::Json(json!({"error": code, "message": msg}))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"pnp-meter\""));
        }
        r
    }
}

impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::Unauthorized => ApiError::Unauthorized,
            IngestError::BadRequest(b) => ApiError::BadRequest(b.to_string()),
            IngestError::TooFast { retry_after, .. } => ApiError::TooManyRequests { retry_after, message: "reports too frequent" },
            IngestError::Flooded { retry_after } => {
                ApiError::TooManyRequests { retry_after, message: "too many failed authentications from this address; slow down" }
            }
            IngestError::FutureAt(f) => ApiError::Unprocessable(f.to_string()),
            IngestError::Refused(r) => ApiError::Unprocessable(r.to_string()),
            IngestError::Unavailable(m) => ApiError::Unavailable(m),
        }
    }
}

/// The public router (`PN_LISTEN`), with the body limit on ingest and a timeout on every
/// request: ingest, admission, health — nothing that reads the ledger or changes a quota.
pub fn router(meter: Arc<Meter>) -> Router {
    let s = meter.settings();
    let limit = s.body_limit_bytes;
    let timeout = Duration::from_millis(s.request_timeout_ms);
    // The body limit is axum's (enforced while reading, chunked or not), so that the 413 is
    // the same JSON error as every other answer.
    Router::new()
        .route("/slave/usage", post(post_usage))
        // pnctl's health check polls the ingest port too.
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/admission/{node}", get(admission))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(meter)
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, timeout))
}

/// The internal router (`PN_INTERNAL_LISTEN`): the ledger and the quota change, each request
/// checked against `token` (constant time) before anything else.
pub fn internal_router(meter: Arc<Meter>, token: SecretString) -> Router {
    let s = meter.settings();
    let limit = s.body_limit_bytes;
    let timeout = Duration::from_millis(s.request_timeout_ms);
    let token = Arc::new(token);
    Router::new()
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{node}/usage", get(usage))
        .route("/v1/nodes/{node}/quota", put(set_quota))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(meter)
        .layer(axum::middleware::from_fn(move |req: axum::extract::Request, next: axum::middleware::Next| {
            let token = token.clone();
            async move {
                if bearer_ok(req.headers(), &token) {
                    next.run(req).await
                } else {
                    let body = json!({"error": "unauthorized", "message": "missing or wrong internal token"});
                    let mut r = (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response();
                    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"pnp-meter-internal\""));
                    r
                }
            }
        }))
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, timeout))
}

/// `Authorization: Bearer <token>`, compared in constant time (`kit::ops::bearer_ok`, the one
/// bearer check of the workspace).
fn bearer_ok(headers: &HeaderMap, token: &SecretString) -> bool {
    kit::ops::bearer_ok(headers, token)
}

async fn post_usage(
    State(m): State<Arc<Meter>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    // The source's budget of failed authentications is looked at first (inside `ingest`).
    let source = peer.map(|Extension(ConnectInfo(p))| m.source(p.ip(), headers.get("x-forwarded-for").map(HeaderValue::as_bytes)));
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE { ApiError::PayloadTooLarge } else { ApiError::BadRequest("unreadable body".into()) }
    })?;
    let auth = headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes);
    let started = std::time::Instant::now();
    let res = m.ingest(source, auth, &body).await;
    metrics::histogram!("pn_meter_ingest_seconds").record(started.elapsed().as_secs_f64());
    Ok(axum::Json(res?).into_response())
}

fn node_name(node: &str) -> Result<&str, ApiError> {
    if proto::subjects::is_token(node) { Ok(node) } else { Err(ApiError::NotFound) }
}

async fn admission(State(m): State<Arc<Meter>>, Path(node): Path<String>) -> Result<Response, ApiError> {
    let a = m.admission(node_name(&node)?).await.ok_or(ApiError::NotFound)?;
    // Public: admitted or not, never the state (warn says "above 80 %"), usage or quota.
    let admitted = a.state != QuotaState::Cutoff;
    let status = if admitted { StatusCode::OK } else { StatusCode::PAYMENT_REQUIRED };
    Ok((status, axum::Json(json!({"node": a.node, "admitted": admitted}))).into_response())
}

async fn usage(State(m): State<Arc<Meter>>, Path(node): Path<String>) -> Result<Response, ApiError> {
    let v = m.usage(node_name(&node)?).await.ok_or(ApiError::NotFound)?;
    Ok(axum::Json(v).into_response())
}

async fn list_nodes(State(m): State<Arc<Meter>>) -> Response {
    axum::Json(json!({"items": m.list().await})).into_response()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct QuotaBody {
    #[serde(alias = "sold_bytes")]
    sold_bytes: u64,
}

async fn set_quota(State(m): State<Arc<Meter>>, Path(node): Path<String>, body: Bytes) -> Result<Response, ApiError> {
    let node = node_name(&node)?;
    let q: QuotaBody = serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("expected {{\"soldBytes\": u64}}: {e}")))?;
    if q.sold_bytes == 0 {
        return Err(ApiError::BadRequest("soldBytes must be positive".into()));
    }
    let v = m.set_quota(node, q.sold_bytes).await.map_err(|e| ApiError::Unavailable(e.to_string()))?.ok_or(ApiError::NotFound)?;
    Ok(axum::Json(v).into_response())
}
