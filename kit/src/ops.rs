//! The ops HTTP endpoints every service serves: `/healthz` (the process runs), `/readyz`
//! (its dependencies answer: NATS connected, streams present) and Prometheus `/metrics`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub type ReadyFn = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

static PROM: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process-wide Prometheus recorder (installed on first use).
pub fn prometheus() -> Option<PrometheusHandle> {
    PROM.get_or_init(|| PrometheusBuilder::new().install_recorder().ok()).clone()
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
        .route(
            "/metrics",
            get(move || {
                let prom = prom.clone();
                async move { prom.map(|p| p.render()).unwrap_or_default() }
            }),
        )
}

/// Binds `listen` and serves the ops endpoints until `shutdown`. Returns the bound address.
pub async fn spawn(
    listen: SocketAddr,
    ready: ReadyFn,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("ops listen {listen}: {e}")))?;
    let addr = listener.local_addr()?;
    let app = router(ready);
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
