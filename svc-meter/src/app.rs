//! Wiring: `kit::app::Runtime` (NATS, streams, sled, Center client, ops endpoints) plus the
//! meter's own parts — the ledger, the `pn.op.deployed` consumer, the ingest HTTP listener and
//! the two outbox tasks — all stopped by one shutdown future.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::serve::ListenerExt;
use kit::app::Runtime;
use kit::bus::ConsumerSpec;
use proto::{Stage, subjects};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::handlers::deployed::DeployedHandler;
use crate::meter::Meter;
use crate::settings::Settings;
use crate::{http, outbox};

/// The service name: binary, data sub-directory, NATS connection name.
pub const SERVICE: &str = "svc-meter";

/// A built, running meter (its tasks start in `build`; `run` waits for shutdown).
pub struct App {
    rt: Runtime,
    set: JoinSet<()>,
    http_addr: SocketAddr,
    internal_addr: Option<SocketAddr>,
    meter: Arc<Meter>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "App(svc-meter at {})", self.http_addr)
    }
}

impl App {
    pub async fn build(settings: Settings) -> anyhow::Result<App> {
        settings.validate()?;
        // The listeners are bound before the ops endpoints exist, so that once /readyz answers
        // a report can be sent (the kernel queues it until the server below takes it).
        let listener = tokio::net::TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("listen on {} (PN_LISTEN)", settings.listen))?;
        let http_addr = listener.local_addr()?;
        let internal_listener = match settings.internal_token() {
            Some(_) => Some(
                tokio::net::TcpListener::bind(settings.internal_listen)
                    .await
                    .with_context(|| format!("listen on {} (PN_INTERNAL_LISTEN)", settings.internal_listen))?,
            ),
            None => None,
        };
        let rt = Runtime::start(SERVICE, &settings.common).await?;
        let meter = Meter::open(&rt.store, settings.clone()).await.context("load the ledger")?;
        // Read only: confirms a deployment that would change a known node's address or secret.
        meter.set_provider(kit::cloud::build(&settings.provider, &settings.account, &settings.hetzner, rt.center.clone(), true)?);

        let mut set = JoinSet::new();
        // A side consumer: it never fails an operation (a retry — the ledger, the provider —
        // backs off for as long as it takes).
        let cfg = rt.loop_config(Stage::Meter).reports_only(std::time::Duration::from_secs(30));
        let spec = ConsumerSpec::ops(&settings.deployed_consumer, subjects::DEPLOYED, &cfg);
        rt.spawn_consumer(&mut set, spec, cfg, Arc::new(DeployedHandler { meter: meter.clone() })).await?;

        let router = http::router(meter.clone());
        let token = rt.shutdown.clone();
        set.spawn(async move {
            // Reports are small request/response pairs: no Nagle delay on them.
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            // The peer's address: the budget of failed authentications is kept per source.
            let service = router.into_make_service_with_connect_info::<SocketAddr>();
            if let Err(e) = axum::serve(listener, service).with_graceful_shutdown(token.cancelled_owned()).await {
                tracing::error!(error = %e, "ingest http server failed");
            }
        });
        // The ledger and the quota change: only on the internal listener, only with its token.
        let internal_addr = match (settings.internal_token(), internal_listener) {
            (Some(token), Some(listener)) => {
                let addr = listener.local_addr()?;
                let router = http::internal_router(meter.clone(), token);
                let token = rt.shutdown.clone();
                set.spawn(async move {
                    if let Err(e) = axum::serve(listener, router).with_graceful_shutdown(token.cancelled_owned()).await {
                        tracing::error!(error = %e, "internal http server failed");
                    }
                });
                Some(addr)
            }
            _ => {
                tracing::info!("PN_INTERNAL_TOKEN unset: no internal listener (ledger and quota API off)");
                None
            }
        };
        set.spawn(outbox::usage_loop(meter.clone(), rt.bus.clone(), rt.shutdown.clone()));
        set.spawn(outbox::quota_loop(meter.clone(), rt.bus.clone(), rt.center.clone(), rt.shutdown.clone()));
        {
            let meter = meter.clone();
            rt.spawn_sampler(move || crate::gauges::sample(meter.clone()));
        }

        tracing::info!(listen = %http_addr, internal = ?internal_addr, nodes = meter.node_count(), "svc-meter ready");
        println!("svc-meter listening on http://{http_addr}");
        Ok(App { rt, set, http_addr, internal_addr, meter })
    }

    /// Where `/slave/usage` and `/v1/admission/…` are served.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Where `/v1/nodes…` are served (with `PN_INTERNAL_TOKEN`), if the internal API is on.
    pub fn internal_addr(&self) -> Option<SocketAddr> {
        self.internal_addr
    }

    pub fn ops_addr(&self) -> SocketAddr {
        self.rt.ops_addr
    }

    pub fn meter(&self) -> Arc<Meter> {
        self.meter.clone()
    }

    /// Cancelling this token stops the app (as the shutdown future would).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.rt.shutdown.clone()
    }

    /// Runs until `shutdown` resolves, then drains every task and flushes the store.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        self.rt.run_until(self.set, shutdown).await;
        Ok(())
    }
}
