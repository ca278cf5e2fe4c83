//! The ops HTTP endpoints every service serves: `/healthz` (the process runs), `/readyz`
//! (its dependencies answer: NATS connected, streams present) and Prometheus `/metrics`.
//! A service may add its own routes (`spawn_with`), e.g. svc-cloud's operator reap commands.
//!
//! Every mutating (non-GET, non-HEAD) request on this listener needs the operator token
//! (`PN_OPS_TOKEN`) as `Authorization: Bearer <token>` ([`require_operator`]): wrong or missing
//! → 401; no token configured → 403 "operator token not configured" (the route stays shut).
//! The GETs (`/healthz`, `/readyz`, `/metrics`, `/v1/ops/held`, `/v1/reap/pending`) stay open.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use secrecy::{ExposeSecret, SecretString};

pub type ReadyFn = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

static PROM: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Bucket bounds (seconds) of every `*_seconds` histogram: from a handler's milliseconds to a
/// node's minutes-long prep and boot. Histograms (not summaries) so that Prometheus can sum
/// them across pods and compute quantiles of the whole.
pub const SECONDS_BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0];

/// Every series Pnp exports, with its HELP text. A series not named here still exports, without
/// HELP; the ops test checks that none is missing.
pub const DESCRIPTIONS: &[(&str, &str)] = &[
    ("pn_build_info", "Always 1; the service and version as labels."),
    ("pn_center_call_seconds", "Time of one Center tool call, retries included, by tool."),
    ("pn_center_errors_total", "Center tool calls that failed after their retries, by tool."),
    ("pn_center_id_filter_ignored_total", "Times Center answered list_node_operations(id) with other operations (the id filter ignored); the operation is then found by its status."),
    ("pn_claimed_in_flight", "Operations this claimer holds: claimed and not yet terminal."),
    ("pn_failed_for_activated_total", "pn.op.failed events that arrived for an activated operation (not reported to Center)."),
    ("pn_handler_parks_total", "Messages parked (nak with a delay) while waiting on the outside world, by stage."),
    ("pn_handler_retries_total", "Handler runs that asked for a retry, by stage."),
    ("pn_handler_seconds", "Time a handler ran on one message, by stage."),
    ("pn_firewall_opens_total", "Ports svc-cloud asked the provider's firewall to open, by result."),
    ("pn_rebuilds_requested_total", "Rebuilds of a never-activated instance the deployer asked svc-cloud for (cloud-init error)."),
    ("pn_rebuilds_total", "svc-cloud's rebuilds of a never-activated instance after a cloud-init error, by result."),
    ("pn_handler_terminated_total", "Messages a report-only consumer terminated without failing the operation, by stage."),
    ("pn_instance_checks_total", "Checks of an event's instance with the provider before a secret moves or a node's identity changes, by service and result."),
    ("pn_lease_not_extended_total", "Lease renewals Center answered without extending the lease."),
    ("pn_lease_renewals_total", "Lease renewals accepted by Center, by how (progress: update_node_operation(in_progress); claim: a claim by the holder)."),
    ("pn_lease_lost_total", "Leases this claimer found lost (Center requeued the operation or gave it to another holder) while it still held the operation in flight."),
    ("pn_stale_failures_total", "pn.op.failed events of an earlier claim attempt than the operation's current one (not reported to Center)."),
    ("pn_meter_cutoffs_total", "Times a node reached the cut-off (>= 95 % of its sold quota) in the meter's ledger."),
    ("pn_meter_nodes", "Private nodes in the meter's ledger, by quota state (ok, warn, cutoff); sampled."),
    ("pn_meter_hide_unsupported_total", "Hide/show calls (update_node) that Center could not take because it has no update_node tool; the meter's own 402 still holds."),
    ("pn_meter_ingest_seconds", "Time the meter took to answer one POST /slave/usage (authenticate, bill, write and flush the ledger), whatever the answer."),
    ("pn_meter_billed_bytes_total", "Bytes billed to nodes' ledgers."),
    ("pn_meter_reports_total", "Usage reports received, by result (accepted, unauthorized, malformed, too_fast, refused, stale, flooded, future_at, unavailable)."),
    ("pn_meter_usage_published_total", "meter.usage.<node> messages published."),
    ("pn_ops_failed_total", "pn.op.failed events a stage published, by stage (the reason is in the event and the logs, not a label)."),
    ("pn_ops_in_flight", "Operations a stage holds now (started, not yet handed on or terminal), read from its own state; sampled, by stage."),
    ("pn_ops_overdue", "Operations a stage holds past its deadline (the wait they are in ended more than a minute ago without a decision); sampled, by stage."),
    ("pn_ops_parked", "Operations a stage holds parked, waiting on the world (a booting VPS, a pause, the OS prep, the next verification round); sampled, by stage."),
    ("pn_relay_backlog", "Reports to Center waiting to be delivered, by relay (claimer-instance, claimer-failed, claimer-verified: the claimer's consumers' pending and unacknowledged messages; meter-visibility: the meter's pending hide/show calls); sampled."),
    ("pn_ops_degraded", "Activated operations whose later checks do not hold (degraded), now."),
    ("pn_ops_degraded_total", "Operations that became degraded."),
    ("pn_reap_decisions_total", "The reaper's decisions, by decision."),
    ("pn_reap_delete_unsupported_total", "Reaps of proven-dead VPSes left to an operator because Center has no delete_cloud_instance tool."),
    ("pn_reap_pending", "VPSes of failed operations kept because their death is not proven; waiting for an operator."),
    ("pn_stage_pickup_seconds", "From an event's publication to the next stage starting on it, by stage."),
    ("pn_time_to_active_seconds", "From the operation queued at Center (else claimed) to its node verified active; observed once per operation."),
    ("pn_trace_spans_dropped_total", "Finished spans not exported over OTLP: the exporter's queue was full or its post failed (only when OTLP export is configured)."),
    ("pn_verify_watch_ended_total", "Degraded operations the verifier stopped watching."),
    ("pn_verify_usage_mismatch_total", "Verifications where the meter's ledger and Center's trafficUsedBytes disagreed by more than one report (a warning; never fails or degrades the operation)."),
];

/// The process-wide Prometheus recorder (installed on first use), with histogram buckets and
/// the HELP texts.
pub fn prometheus() -> Option<PrometheusHandle> {
    PROM.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
            .ok()?;
        let handle = builder.install_recorder().ok()?;
        for (name, help) in DESCRIPTIONS {
            metrics::describe_gauge!(*name, *help);
        }
        Some(handle)
    })
    .clone()
}

/// How long past the end of the wait it is in an operation counts as overdue: its parked
/// message should have come back and been decided by then (JetStream redelivers at the end
/// of the nak delay; a handler slot frees within seconds).
pub const OVERDUE_GRACE_MS: i64 = 60_000;

/// Whether an operation whose current wait ends at `due_ms` is overdue at `now_ms`.
pub fn overdue(now_ms: i64, due_ms: i64) -> bool {
    due_ms > 0 && now_ms > due_ms.saturating_add(OVERDUE_GRACE_MS)
}

/// What a stage holds now, counted from its own durable state by a sampler (so the gauges are
/// right after a restart, not a sum of increments since the process started).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StageCounts {
    pub in_flight: u64,
    pub parked: u64,
    pub overdue: u64,
}

impl StageCounts {
    /// Counts one operation the stage holds.
    pub fn held(&mut self, parked: bool, overdue: bool) {
        self.in_flight += 1;
        self.parked += u64::from(parked);
        self.overdue += u64::from(overdue);
    }

    /// Sets `pn_ops_in_flight{stage}`, `pn_ops_parked{stage}` and `pn_ops_overdue{stage}`.
    pub fn set(&self, stage: &'static str) {
        metrics::gauge!("pn_ops_in_flight", "stage" => stage).set(self.in_flight as f64);
        metrics::gauge!("pn_ops_parked", "stage" => stage).set(self.parked as f64);
        metrics::gauge!("pn_ops_overdue", "stage" => stage).set(self.overdue as f64);
    }
}

/// How often the sampled gauges are read when a service does not say (`PN_GAUGE_SAMPLE_MS`).
pub const DEFAULT_SAMPLE_MS: u64 = 5_000;

/// Runs `sample` at once and then every `every` until `shutdown`: the one periodic sampler
/// behind the gauges read from a service's state (`pn_ops_*`, `pn_meter_nodes`,
/// `pn_relay_backlog`), off the message path. A sample that scans a sled table should do it
/// in `tokio::task::spawn_blocking`. Samples never overlap; a slow one delays the next.
pub fn spawn_sampler<F, Fut>(every: std::time::Duration, shutdown: tokio_util::sync::CancellationToken, mut sample: F) -> tokio::task::JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let every = every.max(std::time::Duration::from_millis(50));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = sample() => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
        }
    })
}

/// What a durable consumer still has to deliver: messages not yet delivered (`num_pending`)
/// plus delivered and not yet acknowledged (`num_ack_pending`, which holds the nak'ed ones
/// waiting for their retry). One `CONSUMER.INFO` call, which every service may make on its
/// own durables (`kit::nats_auth`).
pub async fn consumer_backlog(bus: &crate::bus::Bus, stream: &str, durable: &str) -> Option<u64> {
    let consumer = bus
        .js
        .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(durable, stream)
        .await
        .ok()?;
    let info = consumer.cached_info();
    Some(info.num_pending.saturating_add(info.num_ack_pending as u64))
}

/// Sets `pn_relay_backlog{relay}`.
pub fn relay_backlog(relay: &'static str, n: u64) {
    metrics::gauge!("pn_relay_backlog", "relay" => relay).set(n as f64);
}

/// Sets `pn_build_info{service, version} 1`.
pub fn build_info(service: &'static str) {
    metrics::gauge!("pn_build_info", "service" => service, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// A readiness check from a bus: connected and the streams exist.
pub fn bus_ready(bus: crate::bus::Bus) -> ReadyFn {
    Arc::new(move || {
        let bus = bus.clone();
        Box::pin(async move { bus.streams_present().await })
    })
}

pub fn router(ready: ReadyFn) -> Router {
    let prom = prometheus();
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(ready): State<ReadyFn>| async move {
                if ready().await { (StatusCode::OK, "ready") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready") }
            }),
        )
        .with_state(ready)
        .route("/v1/ops/held", get(|| async { axum::Json(held::snapshot()) }))
        .route(
            "/metrics",
            get(move || {
                let prom = prom.clone();
                async move { prom.map(|p| p.render()).unwrap_or_default() }
            }),
        )
}

/// The services whose ops listener has mutating routes, so the only ones given the operator
/// token (`PN_OPS_TOKEN`; the dev stack's `secrets/ops-token`, k8s Secret `pn-ops-token`):
/// svc-claimer (`POST /v1/ops/<op>/abandon`) and svc-cloud (`POST /v1/reap/<op>/confirm`).
pub const OPS_TOKEN_USERS: [&str; 2] = ["svc-claimer", "svc-cloud"];

/// `Authorization: Bearer <token>`, compared in constant time; an empty `token` matches
/// nothing. The one check of a bearer token (the ops listener's operator token, svc-meter's
/// internal token).
pub fn bearer_ok(headers: &HeaderMap, token: &SecretString) -> bool {
    use subtle::ConstantTimeEq;
    let Some(given) = headers.get(header::AUTHORIZATION).and_then(|v| v.as_bytes().strip_prefix(b"Bearer ")) else {
        return false;
    };
    let want = token.expose_secret().as_bytes();
    !want.is_empty() && bool::from(given.ct_eq(want))
}

/// Wraps `app` so that every request other than GET and HEAD must carry the operator token
/// (`token`, `PN_OPS_TOKEN`): missing or wrong → 401 (logged without the header), `token`
/// `None` → 403 "operator token not configured" — a mutating route is never open.
pub fn require_operator(app: Router, token: Option<SecretString>) -> Router {
    let token = Arc::new(token);
    app.layer(axum::middleware::from_fn(move |req: axum::extract::Request, next: axum::middleware::Next| {
        let token = token.clone();
        async move {
            if req.method() == Method::GET || req.method() == Method::HEAD {
                return next.run(req).await;
            }
            let Some(token) = token.as_ref() else {
                tracing::warn!(method = %req.method(), path = %req.uri().path(), "ops: refused: operator token not configured (PN_OPS_TOKEN)");
                return refusal(StatusCode::FORBIDDEN, "operator token not configured (PN_OPS_TOKEN): mutating ops routes are off");
            };
            if bearer_ok(req.headers(), token) {
                return next.run(req).await;
            }
            tracing::warn!(method = %req.method(), path = %req.uri().path(), "ops: refused: missing or wrong operator token");
            let mut r = refusal(StatusCode::UNAUTHORIZED, "missing or wrong operator token (Authorization: Bearer <PN_OPS_TOKEN>)");
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"pnp-ops\""));
            r
        }
    }))
}

fn refusal(status: StatusCode, msg: &str) -> Response {
    (status, axum::Json(serde_json::json!({"error": msg}))).into_response()
}

/// Binds `listen` and serves the ops endpoints until `shutdown`. Returns the bound address.
pub async fn spawn(
    listen: SocketAddr,
    ready: ReadyFn,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<SocketAddr> {
    spawn_with(listen, ready, Router::new(), None, shutdown).await
}

/// Like `spawn`, with the service's own routes (`extra`) served beside the ops endpoints on
/// the same listener. `extra` must not route `/healthz`, `/readyz` or `/metrics`. Its
/// mutating routes need `ops_token` ([`require_operator`]).
pub async fn spawn_with(
    listen: SocketAddr,
    ready: ReadyFn,
    extra: Router,
    ops_token: Option<SecretString>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("ops listen {listen}: {e}")))?;
    let addr = listener.local_addr()?;
    let app = require_operator(router(ready).merge(extra), ops_token);
    // The exporter's summaries roll their windows only on upkeep; without it quantiles drift.
    if let Some(prom) = prometheus() {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                prom.run_upkeep();
            }
        });
    }
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).with_graceful_shutdown(shutdown).await;
    });
    Ok(addr)
}

pub use crate::held;

#[cfg(test)]
mod tests {
    use super::*;

    /// An ops listener with one mutating route that counts its calls, guarded by `token`.
    async fn guarded(token: Option<&str>) -> (String, Arc<std::sync::atomic::AtomicU32>) {
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let c = calls.clone();
        let extra = Router::new().route(
            "/v1/x/{op}/do",
            axum::routing::post(move || {
                let c = c.clone();
                async move {
                    c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    "done"
                }
            }),
        );
        let ready: ReadyFn = Arc::new(|| Box::pin(async { true }));
        let addr = spawn_with(SocketAddr::from(([127, 0, 0, 1], 0)), ready, extra, token.map(|t| SecretString::from(t.to_string())), std::future::pending())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        (format!("http://{addr}"), calls)
    }

    #[tokio::test]
    async fn mutating_ops_routes_need_the_operator_token_and_gets_stay_open() {
        crate::init_crypto();
        let token = "ops-token-0123456789abcdef";
        let http = reqwest::Client::new();
        let (url, calls) = guarded(Some(token)).await;
        let post = |auth: Option<String>| {
            let mut r = http.post(format!("{url}/v1/x/op-1/do"));
            if let Some(a) = auth {
                r = r.header("Authorization", a);
            }
            r.send()
        };
        for bad in [None, Some(format!("Bearer {token}x")), Some(format!("Bearer {}", &token[..10])), Some(token.to_string()), Some("Bearer ".into())] {
            let r = post(bad.clone()).await.unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{bad:?}");
            let body = r.text().await.unwrap_or_default();
            assert!(body.contains("operator token") && !body.contains(token), "{body}");
        }
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0, "a refused request never reaches the handler");
        let r = post(Some(format!("Bearer {token}"))).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        for path in ["/healthz", "/readyz", "/metrics", "/v1/ops/held"] {
            let r = http.get(format!("{url}{path}")).send().await.unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(r.status(), StatusCode::OK, "{path} stays open");
        }

        // No token configured: the mutating route is shut (403), whatever the request carries.
        let (url, calls) = guarded(None).await;
        for auth in [None, Some("Bearer ".to_string()), Some(format!("Bearer {token}"))] {
            let mut r = http.post(format!("{url}/v1/x/op-1/do"));
            if let Some(a) = auth {
                r = r.header("Authorization", a);
            }
            let r = r.send().await.unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(r.status(), StatusCode::FORBIDDEN);
            assert!(r.text().await.unwrap_or_default().contains("operator token not configured"));
        }
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0);
        let r = http.get(format!("{url}/readyz")).send().await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status(), StatusCode::OK);
    }

    #[test]
    fn a_short_ops_token_is_refused_and_an_empty_one_is_none() {
        let c = |t: &str| crate::config::Common { ops_token: Some(SecretString::from(t.to_string())), ..Default::default() }.ops_token();
        assert!(c("").is_ok_and(|t| t.is_none()));
        assert!(c("  ").is_ok_and(|t| t.is_none()));
        let err = c("short-secret").err().map(|e| e.0).unwrap_or_default();
        assert!(err.contains("PN_OPS_TOKEN") && !err.contains("short-secret"), "{err}");
        assert!(c("0123456789abcdef").is_ok_and(|t| t.is_some()));
    }

    #[test]
    fn histograms_have_buckets_and_every_series_has_help() {
        let Some(prom) = prometheus() else { panic!("the recorder could not be installed") };
        metrics::histogram!("pn_handler_seconds", "stage" => "test").record(0.3);
        metrics::counter!("pn_handler_retries_total", "stage" => "test").increment(1);
        build_info("test");
        let text = prom.render();
        assert!(text.contains("pn_handler_seconds_bucket{stage=\"test\",le=\"0.5\"} 1"), "{text}");
        assert!(!text.contains("quantile="), "summaries cannot be aggregated: {text}");
        assert!(text.contains("pn_build_info{service=\"test\",version="), "{text}");
        for name in ["pn_handler_seconds", "pn_handler_retries_total", "pn_build_info"] {
            assert!(text.contains(&format!("# HELP {name} ")), "no HELP for {name}: {text}");
        }
    }

    #[test]
    fn stage_counts_set_the_three_gauges() {
        let Some(prom) = prometheus() else { panic!("the recorder could not be installed") };
        let mut c = StageCounts::default();
        c.held(true, false);
        c.held(true, true);
        c.held(false, false);
        c.set("unit");
        relay_backlog("unit-relay", 7);
        let text = prom.render();
        assert!(text.contains("pn_ops_in_flight{stage=\"unit\"} 3"), "{text}");
        assert!(text.contains("pn_ops_parked{stage=\"unit\"} 2"), "{text}");
        assert!(text.contains("pn_ops_overdue{stage=\"unit\"} 1"), "{text}");
        assert!(text.contains("pn_relay_backlog{relay=\"unit-relay\"} 7"), "{text}");
        for name in ["pn_ops_in_flight", "pn_ops_parked", "pn_ops_overdue", "pn_relay_backlog"] {
            assert!(text.contains(&format!("# HELP {name} ")), "no HELP for {name}: {text}");
        }
    }

    #[test]
    fn overdue_only_past_the_grace_and_never_without_a_due_time() {
        assert!(!overdue(1_000_000, 0), "no due time known: not overdue");
        assert!(!overdue(1_000_000, 1_000_000 - OVERDUE_GRACE_MS), "at the grace's end: not yet");
        assert!(overdue(1_000_001, 1_000_000 - OVERDUE_GRACE_MS));
    }

    #[tokio::test]
    async fn the_sampler_samples_at_once_and_again_until_shutdown() {
        let n = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let token = tokio_util::sync::CancellationToken::new();
        let n2 = n.clone();
        let h = spawn_sampler(std::time::Duration::from_millis(50), token.clone(), move || {
            let n = n2.clone();
            async move {
                n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        token.cancel();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), h).await;
        let seen = n.load(std::sync::atomic::Ordering::SeqCst);
        assert!(seen >= 2, "sampled {seen} times");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert_eq!(n.load(std::sync::atomic::Ordering::SeqCst), seen, "no sample after shutdown");
    }

    #[test]
    fn every_metric_the_code_names_is_described() {
        // Every `metrics::…!("pn_…"` in the workspace's sources has a DESCRIPTIONS entry.
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(std::path::Path::to_path_buf).unwrap_or_default();
        let mut missing = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&dir) else { continue };
            for e in rd.flatten() {
                let p = e.path();
                let name = e.file_name().to_string_lossy().to_string();
                if p.is_dir() {
                    if !matches!(name.as_str(), "target" | ".git" | ".tools" | ".pn" | "tests") {
                        stack.push(p);
                    }
                } else if name.ends_with(".rs") {
                    let text = std::fs::read_to_string(&p).unwrap_or_default();
                    for part in text.split("metrics::").skip(1) {
                        let Some(rest) = ["counter!(", "gauge!(", "histogram!("].iter().find_map(|m| part.strip_prefix(m)) else { continue };
                        let rest = rest.trim_start().trim_start_matches('"');
                        let metric: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                        if metric.starts_with("pn_") && !DESCRIPTIONS.iter().any(|(n, _)| *n == metric) {
                            missing.push(format!("{metric} ({})", p.display()));
                        }
                    }
                }
            }
        }
        assert!(missing.is_empty(), "metrics without a HELP text in kit::ops::DESCRIPTIONS: {missing:?}");
    }
}
