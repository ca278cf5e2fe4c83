//! svc-claimer owns the operation's life with Center (runbook steps 1, 3's report and 8):
//! it finds queued provision intents, leases them, seals the one-time claim token at once and
//! publishes `pn.op.claimed`; it is the single writer of the operation's status at Center —
//! `in_progress {instanceId, ipv4}` on `pn.op.instance`, `failed` on `pn.op.failed` — and keeps
//! the leases of its in-flight operations alive. It never sends `done`.
//!
//! Fail safe: its consumers only *report* (`LoopConfig::reports_only`): a report Center keeps
//! refusing is retried with back-off for as long as it takes and never becomes
//! `pn.op.failed`; a `pn.op.failed` for an operation Center reports activated is recorded, not
//! reported. It claims only what the pipeline can carry (`max_claimed`).

mod gauges;
mod handlers;
mod operator;
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
use proto::{OpId, Stage, subjects};
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
    /// Lease asked for on claim; renewed every third of it while the operation is in flight —
    /// by `update_node_operation(in_progress)`, or, at a Center whose answer shows that
    /// progress does not extend a lease, by a claim of the holder (see ARCHITECTURE.md,
    /// "Assumptions about Center").
    pub lease_seconds: u32,
    /// Holder id at Center. Empty: generated once and kept in the state store.
    pub holder: String,
    /// Claims attempted at once.
    pub claim_concurrency: usize,
    /// `PN_MAX_CLAIMED`: the claim budget — operations this replica holds in flight at once
    /// (claimed at Center, not yet verified or failed). Each poll claims at most the budget
    /// minus what is in flight; the rest stay queued at Center, where no lease and no
    /// operation timeout runs. Unset: `PN_MAX_IN_FLIGHT` (`common.max_in_flight`), the handler
    /// slots each stage has — the number of operations a stage works on at once. A claim
    /// beyond that would wait in a JetStream queue behind the others while its lease has to be
    /// kept alive and Center's timeout for the operation runs, with nothing working on it; at
    /// that budget every claimed operation can be in some stage's hands. Raise it when the
    /// stages park their waits (a parked operation holds no slot) and throughput was measured
    /// to carry more within the lease. At least 1.
    pub max_claimed: Option<usize>,
    /// `PN_REPORT_RETRY_CAP_MS`: the longest pause between two attempts of one report to Center
    /// (`in_progress`, `failed`) while Center keeps refusing it. Attempts back off from 2 s up
    /// to this and never run out: a failed report is not a failed operation.
    pub report_retry_cap_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            common: Common::default(),
            poll_interval_ms: 2000,
            lease_seconds: 600,
            holder: String::new(),
            claim_concurrency: 16,
            max_claimed: None,
            report_retry_cap_ms: 60_000,
        }
    }
}

impl Settings {
    /// The claim budget (see `max_claimed`).
    pub fn claim_budget(&self) -> usize {
        self.max_claimed.unwrap_or(self.common.max_in_flight).max(1)
    }
}

/// An operation this replica holds at Center.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Held {
    /// When the lease was last renewed (ms; 0 = renew at the next round).
    pub renewed_ms: i64,
    /// The lease's end as Center last answered it (ms), if it did.
    pub lease_expires_ms: Option<i64>,
}

/// State shared by the poller, the handlers and the lease keeper.
pub(crate) struct Ctx {
    pub rt: Runtime,
    pub settings: Settings,
    pub seal: SealKey,
    pub holder: String,
    pub ops: Table<OpRecord>,
    /// In-flight operations this replica holds (its claim budget counts these).
    pub active: Mutex<HashMap<OpId, Held>>,
    /// Whether `update_node_operation(in_progress)` extends a lease at this Center. Starts
    /// true; the first answer that shows a lease not extended turns it off for the process,
    /// and leases are renewed by a claim of their holder from then on.
    pub progress_extends: std::sync::atomic::AtomicBool,
}

impl Ctx {
    /// How many operations this replica holds in flight (gauge `pn_claimed_in_flight`).
    pub fn in_flight(&self) -> usize {
        let n = self.active.lock().map(|a| a.len()).unwrap_or(0);
        metrics::gauge!("pn_claimed_in_flight").set(n as f64);
        n
    }

    /// Records that this replica holds `id`, its lease renewed now (to `lease_expires_ms` when
    /// Center said so).
    pub fn hold(&self, id: &OpId, lease_expires_ms: Option<i64>) {
        if let Ok(mut a) = self.active.lock() {
            let h = a.entry(id.clone()).or_default();
            h.renewed_ms = kit::now_ms();
            if lease_expires_ms.is_some() {
                h.lease_expires_ms = lease_expires_ms;
            }
        }
        self.in_flight();
    }

    /// Center answered an `in_progress` for `id` without extending its lease: leases are
    /// renewed by claim from now on, and `id`'s at the keeper's next round.
    pub fn progress_does_not_extend(&self, id: &OpId) {
        if self.progress_extends.swap(false, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(op = %id, "Center does not extend a lease on in_progress; leases are renewed by a claim of their holder from now on");
        }
        if let Ok(mut a) = self.active.lock()
            && let Some(h) = a.get_mut(id)
        {
            h.renewed_ms = 0;
        }
    }

    /// This replica no longer holds `id`.
    pub fn forget(&self, id: &OpId) {
        if let Ok(mut a) = self.active.lock() {
            a.remove(id);
        }
        self.in_flight();
    }
}

pub struct App {
    ctx: Arc<Ctx>,
}

impl App {
    pub async fn build(settings: Settings) -> anyhow::Result<App> {
        // The operator's abandon lives on the ops listener, which starts before the state.
        let cell: operator::Cell = Arc::new(std::sync::OnceLock::new());
        let rt = Runtime::start_with(SERVICE, &settings.common, operator::router(cell.clone())).await?;
        let seal = rt.seal_key()?;
        let ops: Table<OpRecord> = rt.store.table("ops")?;
        let holder = record::holder(&rt.store, &settings.holder).await?;
        let mut active = HashMap::new();
        for item in ops.iter() {
            let (_, rec) = item?;
            if rec.is_active() && rec.holder == holder {
                active.insert(rec.operation_id, Held::default());
            }
        }
        tracing::info!(%holder, in_flight = active.len(), budget = settings.claim_budget(), "claimer ready");
        let ctx = Arc::new(Ctx {
            rt,
            settings,
            seal,
            holder,
            ops,
            active: Mutex::new(active),
            progress_extends: std::sync::atomic::AtomicBool::new(true),
        });
        ctx.in_flight();
        let _ = cell.set(ctx.clone());
        Ok(App { ctx })
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
        // Every consumer here reports; none may fail an operation.
        let cfg = rt.loop_config(Stage::Claim).reports_only(Duration::from_millis(ctx.settings.report_retry_cap_ms.max(100)));
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
        {
            let ctx = ctx.clone();
            rt.spawn_sampler(move || gauges::sample(ctx.clone()));
        }
        rt.run_until(set, shutdown).await;
        Ok(())
    }
}

pub(crate) fn jitter(base: Duration) -> Duration {
    let f: f64 = 0.75 + rand::random::<f64>() * 0.5;
    base.mul_f64(f)
}
