//! What every service does at start, once: telemetry, NATS + streams, the state store, the
//! Center client, the seal key, the ops endpoints — and the consumer loops it runs until
//! shutdown. A service's `App::build` calls `Runtime::start` and adds only its own handlers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use proto::Stage;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, ConsumerSpec, Handler, LoopConfig, run_loop};
use crate::center::{Center, ClientConfig, McpCenter};
use crate::config::Common;
use crate::seal::SealKey;
use crate::state::Store;

/// The shared parts of a running service.
#[derive(Clone)]
pub struct Runtime {
    pub service: &'static str,
    pub bus: Bus,
    pub store: Store,
    pub center: Arc<dyn Center>,
    pub common: Common,
    pub ops_addr: SocketAddr,
    /// Cancelled when the service must stop.
    pub shutdown: CancellationToken,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Runtime({})", self.service)
    }
}

impl Runtime {
    /// Connects everything. Fails with a clear, secret-free message when something is missing.
    pub async fn start(service: &'static str, common: &Common) -> anyhow::Result<Runtime> {
        Runtime::start_with(service, common, axum::Router::new()).await
    }

    /// Like `start`, with the service's own HTTP routes (`extra`) on its ops listener beside
    /// `/healthz`, `/readyz` and `/metrics` (svc-cloud's `/v1/reap/…`); its non-GET routes need
    /// the operator token (`PN_OPS_TOKEN`, `kit::ops::require_operator`). The routes exist
    /// before the service's state does: a handler that needs it answers 503 until it is set.
    pub async fn start_with(service: &'static str, common: &Common, extra: axum::Router) -> anyhow::Result<Runtime> {
        crate::init_crypto();
        crate::trace::set_service_name(service);
        let token = common.center_token()?;
        let ops_token = common.ops_token()?;
        let bus = Bus::connect_as(&common.nats_url, service, Duration::from_secs(30), &common.nats_auth()?).await?;
        bus.ensure_streams_with(common.stream_replicas).await?;
        let store = Store::open_with_cache(&common.data_dir.join(service), common.state_cache_mb).context("open state store")?;
        let center: Arc<dyn Center> =
            McpCenter::new(ClientConfig::new(&common.center_url, Duration::from_millis(common.center_timeout_ms)), token)?;
        let shutdown = CancellationToken::new();
        let ops_addr = crate::ops::spawn_with(common.ops_listen, crate::ops::bus_ready(bus.clone()), extra, ops_token, shutdown.clone().cancelled_owned())
            .await
            .context("ops endpoints")?;
        crate::ops::build_info(service);
        tracing::info!(service, ops = %ops_addr, nats = %crate::bus::redact_url(&common.nats_url), nats_user = ?common.nats_user, "started");
        Ok(Runtime { service, bus, store, center, common: common.clone(), ops_addr, shutdown })
    }

    pub fn seal_key(&self) -> anyhow::Result<SealKey> {
        Ok(self.common.seal_key()?)
    }

    pub fn loop_config(&self, stage: Stage) -> LoopConfig {
        let mut c = LoopConfig::new(stage, self.common.max_in_flight, Duration::from_millis(self.common.ack_wait_ms));
        c.max_deliver = self.common.max_deliver.max(1);
        c
    }

    /// Creates the durable consumer and runs `handler` on it in `set` until shutdown.
    pub async fn spawn_consumer(
        &self,
        set: &mut JoinSet<()>,
        spec: ConsumerSpec,
        cfg: LoopConfig,
        handler: Arc<dyn Handler>,
    ) -> anyhow::Result<()> {
        let consumer = self.bus.consumer(&spec).await?;
        let bus = self.bus.clone();
        let token = self.shutdown.clone();
        set.spawn(async move { run_loop(bus, consumer, cfg, handler, token.cancelled_owned()).await });
        Ok(())
    }

    /// Runs `sample` now and every `PN_GAUGE_SAMPLE_MS` until shutdown (`kit::ops::spawn_sampler`):
    /// the service's gauges read from its own state.
    pub fn spawn_sampler<F, Fut>(&self, sample: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        crate::ops::spawn_sampler(Duration::from_millis(self.common.gauge_sample_ms), self.shutdown.clone(), sample);
    }

    /// Waits for `shutdown`, cancels every loop, and waits for them to drain.
    pub async fn run_until(&self, mut set: JoinSet<()>, shutdown: impl std::future::Future<Output = ()>) {
        let token = self.shutdown.clone();
        tokio::select! {
            _ = shutdown => { tracing::info!(service = self.service, "shutting down"); }
            _ = token.cancelled() => {}
            Some(res) = set.join_next() => {
                if let Err(e) = res { tracing::error!(service = self.service, error = %e, "a loop ended unexpectedly"); }
            }
        }
        token.cancel();
        let drain = async { while set.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(25), drain).await.is_err() {
            tracing::warn!(service = self.service, "drain timed out");
        }
        if let Err(e) = self.store.flush().await {
            tracing::error!(service = self.service, error = %e, "final flush failed");
        }
    }
}

/// The whole process of a `PN_*` service: its own multi-thread runtime (what `#[tokio::main]`
/// would build), settings from the environment, logging in `log_format(&settings)` to stdout, then
/// `run(settings)` — which builds the service and runs it until shutdown. Each service's
/// `main_entry` is this call, so its `main.rs` and `pnp <service>` start it the same way.
pub fn service_main<S, Fut>(log_format: fn(&S) -> crate::config::LogFormat, run: impl FnOnce(S) -> Fut) -> anyhow::Result<()>
where
    S: serde::de::DeserializeOwned,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(async {
        // Before anything can answer: a SIGTERM during start-up is then a clean stop.
        crate::shutdown::arm();
        let settings: S = crate::config::load()?;
        crate::telemetry::init_stdout(log_format(&settings));
        let res = run(settings).await;
        // The last spans (the drain's) reach the OTLP collector before the process ends.
        crate::trace::flush(std::time::Duration::from_secs(2)).await;
        res
    })
}
