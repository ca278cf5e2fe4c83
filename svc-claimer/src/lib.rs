//! svc-claimer owns the operation's life with Center (runbook steps 1, 3's report and 8):
//! it finds queued provision intents, leases them, seals the one-time claim token at once and
//! publishes `pn.op.claimed`; it is the single writer of the operation's status at Center —
//! `in_progress {instanceId, ipv4}` on `pn.op.instance`, `failed` on `pn.op.failed` — and keeps
//! the leases of its in-flight operations alive. It never sends `done`.

mod handlers;
mod poll;
mod record;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kit::app::Runtime;
use kit::bus::ConsumerSpec;
use kit::config::Common;
use kit::seal::SealKey;
use kit::state::Table;
use proto::{Stage, subjects};
use serde::Deserialize;
use tokio::task::JoinSet;

pub use record::OpRecord;

/// The `svc-claimer` process: settings from `PN_*`, logging, then the service until SIGTERM/Ctrl-C.
/// It builds its own multi-thread runtime (what `#[tokio::main]` would) so that both `main.rs`
/// and the multi-call binary `pnp svc-claimer` can call it from a plain, synchronous `main`.
pub fn main_entry() -> anyhow::Result<()> {
    kit::app::service_main(|s: &Settings| s.common.log_format, |s| async move { App::build(s).await?.run(kit::shutdown::signal()).await })
}

pub const SERVICE: &str = "svc-claimer";

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Settings {
    #[serde(flatten)]
    pub common: Common,
    /// Mean interval between polls of Center's queue (jittered ±25%).
    pub poll_interval_ms: u64,
    /// Lease asked for on claim; renewed every third of it while the operation is in flight.
    pub lease_seconds: u32,
    /// Holder id at Center. Empty: generated once and kept in the state store.
    pub holder: String,
    /// Claims attempted at once.
    pub claim_concurrency: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { common: Common::default(), poll_interval_ms: 2000, lease_seconds: 600, holder: String::new(), claim_concurrency: 16 }
    }
}

/// State shared by the poller, the handlers and the lease keeper.
pub(crate) struct Ctx {
    pub rt: Runtime,
    pub settings: Settings,
    pub seal: SealKey,
    pub holder: String,
    pub ops: Table<OpRecord>,
    /// In-flight operations this replica holds: id → last lease renewal (ms).
    pub active: Mutex<HashMap<String, i64>>,
}

pub struct App {
    ctx: Arc<Ctx>,
}

impl App {
    pub async fn build(settings: Settings) -> anyhow::Result<App> {
        let rt = Runtime::start(SERVICE, &settings.common).await?;
        let seal = rt.seal_key()?;
        let ops: Table<OpRecord> = rt.store.table("ops")?;
        let holder = record::holder(&rt.store, &settings.holder).await?;
        let mut active = HashMap::new();
        for item in ops.iter() {
            let (id, rec) = item?;
            if rec.is_active() && rec.holder == holder {
                active.insert(id, 0);
            }
        }
        tracing::info!(%holder, in_flight = active.len(), "claimer ready");
        Ok(App { ctx: Arc::new(Ctx { rt, settings, seal, holder, ops, active: Mutex::new(active) }) })
    }

    pub fn ops_addr(&self) -> std::net::SocketAddr {
        self.ctx.rt.ops_addr
    }

    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        let ctx = self.ctx;
        let rt = ctx.rt.clone();
        // Operations claimed but never published (a crash between the two) go out first.
        handlers::republish_unpublished(&ctx).await;
        let mut set = JoinSet::new();
        let cfg = rt.loop_config(Stage::Claim);
        let on_instance = handlers::OnInstance(ctx.clone());
        rt.spawn_consumer(&mut set, ConsumerSpec::ops("svc-claimer-instance", subjects::INSTANCE, &cfg), cfg.clone(), Arc::new(on_instance))
            .await?;
        rt.spawn_consumer(&mut set, ConsumerSpec::ops("svc-claimer-failed", subjects::FAILED, &cfg), cfg.clone(), Arc::new(handlers::OnFailed(ctx.clone())))
            .await?;
        rt.spawn_consumer(
            &mut set,
            ConsumerSpec::ops("svc-claimer-verified", subjects::VERIFIED, &cfg),
            cfg.clone(),
            Arc::new(handlers::OnVerified(ctx.clone())),
        )
        .await?;
        rt.spawn_consumer(&mut set, ConsumerSpec::replay(SERVICE, Stage::Claim, &cfg), cfg.clone(), Arc::new(handlers::OnReplay(ctx.clone())))
            .await?;
        {
            let ctx = ctx.clone();
            let token = rt.shutdown.clone();
            set.spawn(async move { poll::poll_loop(ctx, token).await });
        }
        {
            let ctx = ctx.clone();
            let token = rt.shutdown.clone();
            set.spawn(async move { poll::lease_keeper(ctx, token).await });
        }
        rt.run_until(set, shutdown).await;
        Ok(())
    }
}

pub(crate) fn jitter(base: Duration) -> Duration {
    let f: f64 = 0.75 + rand::random::<f64>() * 0.5;
    base.mul_f64(f)
}
