//! svc-cloud creates the VPS for a claimed operation (runbook steps 1's re-entry probe, 2, 3;
//! seed 001 §3.f's fail paths) and reaps the VPS of an operation that failed.
//!
//! Invariants: `pn-<subId>` is the idempotency root — the name is probed before any create
//! and a live match is adopted, so no redelivery or crash makes a second VPS; the intent to
//! create is recorded (flushed) before the create call; only instances this service created
//! for an operation are ever deleted, and only when Center, the provider and the record prove
//! the operation dead and the instance ours (`reaper.rs`); anything uncertain is kept and
//! listed for an operator. No wait holds a handler: the boot wait and the retry pauses are
//! recorded and the message parked.

mod gauges;
mod http;
mod reaper;
mod rebuild;
mod record;
mod stage;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use kit::app::Runtime;
use kit::bus::ConsumerSpec;
use kit::config::Common;
use kit::state::Table;
use proto::{OpId, Stage, subjects};
use serde::Deserialize;
use tokio::task::JoinSet;

use kit::cloud::{Port, Provider, Providers};
pub use record::CloudRecord;

/// The `svc-cloud` process: settings from `PN_*`, logging, then the service until SIGTERM/Ctrl-C.
/// It builds its own multi-thread runtime (what `#[tokio::main]` would) so that both `main.rs`
/// and the multi-call binary `pnp svc-cloud` can call it from a plain, synchronous `main`.
pub fn main_entry() -> anyhow::Result<()> {
    kit::app::service_main(|s: &Settings| s.common.log_format, |s| async move { App::build(s).await?.run(kit::shutdown::signal()).await })
}

pub const SERVICE: &str = "svc-cloud";

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Settings {
    #[serde(flatten)]
    pub common: Common,
    /// `center` (Center's cloud tools) or `hetzner`.
    pub provider: String,
    /// Cloud account for the `center` provider; empty: the first with a default keypair.
    pub account: String,
    /// Job region → provider regions, preferred first, siblings after ("a,b,c").
    pub regions: HashMap<String, String>,
    /// `PN_TRANSFER_HEADROOM`: a plan must include at least sold × this of transfer. 1.0 (no
    /// extra): the margin is already in the quota — Center and the meter cut a node off at
    /// 95 % of what was sold, so a node never moves more than 0.95 × sold, below a bundle that
    /// includes the sold amount. Runbook 000's own example, 950 GB sold on a 1 TB bundle, needs
    /// exactly this (1.2 refused it). Raise it for a provider that bills traffic the node's
    /// NIC counter does not see.
    pub transfer_headroom: f64,
    pub boot_timeout_ms: u64,
    pub boot_poll_ms: u64,
    /// How long a running instance may lack a public IPv4 before it counts as "no IP".
    pub no_ip_timeout_ms: u64,
    /// Pause before retrying a failed create (runbook: "retry after 2 min").
    pub create_retry_pause_ms: u64,
    /// Creates tried per region before moving to a sibling region.
    pub create_attempts_per_region: u32,
    /// Reap the VPS of a failed operation (after `reap_grace_ms`), once Center, the provider
    /// and the record prove it dead and ours; an uncertain one is kept and listed.
    pub reap: bool,
    pub reap_grace_ms: u64,
    /// How often a kept, uncertain reap (`GET /v1/reap/pending`) is checked again; it is
    /// deleted by itself once the checks prove it.
    pub reap_recheck_ms: u64,
    pub hetzner: kit::cloud::hetzner::HetznerSettings,
    /// The OS families to create with, in order of preference (`PN_IMAGE_OS`, "ubuntu,debian"):
    /// the newest supported release (`provision-node.sh`: Ubuntu 24.04/22.04/20.04, Debian
    /// 13/12) of the first family a region offers. Default `ubuntu` (runbook step 2).
    pub image_os: String,
    /// The ports opened in the provider's firewall before the instance is handed on
    /// (`PN_OPEN_PORTS`): 22 (the fresh SSH), 1022 (SSH after `provision-node.sh` hardens
    /// it), 443 tcp and udp (k2s). A provider without a firewall API is skipped with a
    /// warning; the deployer's outside check of 1022 keeps 22 open then.
    pub open_ports: String,
    /// The alternate provider tried when the configured one failed in every sibling region
    /// (`PN_ALT_PROVIDER`: `center` | `hetzner`; empty: none), its account (`PN_ALT_ACCOUNT`,
    /// for `center`) and its regions (`PN_ALT_REGIONS__<job region>`, "a,b"; a job region not
    /// named there uses `regions`). svc-deployer must be given the same (it confirms the
    /// instance there).
    pub alt_provider: String,
    pub alt_account: String,
    pub alt_regions: HashMap<String, String>,
    /// How many broken instances (`pn.op.rebuild`: cloud-init failed) one operation may have
    /// replaced (`PN_REBUILDS`): seed 001 §3.f says "re-provision fresh" — once; another broken
    /// one fails the operation.
    pub rebuilds: u32,
}

impl Default for Settings {
    fn default() -> Self {
        let regions = [
            ("sg", "ap-southeast-1,ap-northeast-1"),
            ("jp", "ap-northeast-1,ap-southeast-1"),
            ("de", "eu-central-1"),
            ("us", "us-west-2,us-east-1"),
            ("br", "sa-east-1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        Settings {
            common: Common::default(),
            provider: "center".into(),
            account: String::new(),
            regions,
            transfer_headroom: 1.0,
            boot_timeout_ms: 300_000,
            boot_poll_ms: 1000,
            no_ip_timeout_ms: 60_000,
            create_retry_pause_ms: 120_000,
            create_attempts_per_region: 2,
            reap: true,
            reap_grace_ms: 600_000,
            reap_recheck_ms: 300_000,
            hetzner: Default::default(),
            image_os: "ubuntu".into(),
            open_ports: "22/tcp,1022/tcp,443/tcp,443/udp".into(),
            alt_provider: String::new(),
            alt_account: String::new(),
            alt_regions: HashMap::new(),
            rebuilds: 1,
        }
    }
}

impl Settings {
    /// Provider regions to try for a job region, preferred first.
    pub fn regions_for(&self, job_region: &str) -> Vec<String> {
        match self.regions.get(job_region) {
            Some(list) => list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect(),
            None => vec![job_region.to_string()],
        }
    }

    /// The alternate provider's regions for a job region (its own map first, else `regions`).
    pub fn alt_regions_for(&self, job_region: &str) -> Vec<String> {
        match self.alt_regions.get(job_region) {
            Some(list) => list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect(),
            None => self.regions_for(job_region),
        }
    }

    /// `image_os` as a list.
    pub fn image_families(&self) -> Vec<String> {
        self.image_os.split(',').map(|s| s.trim().to_ascii_lowercase()).filter(|s| !s.is_empty()).collect()
    }
}

pub(crate) struct Ctx {
    pub rt: Runtime,
    pub settings: Settings,
    /// The configured provider and the alternate one.
    pub providers: Providers,
    /// `open_ports`, parsed.
    pub ports: Vec<Port>,
    pub ops: Table<CloudRecord>,
    /// Operations a handler or the reaper is working on in this process: the one writer of
    /// an operation's record at a time (a second delivery parks briefly rather than races).
    pub busy: Mutex<HashSet<OpId>>,
    /// Reap schedule: due time (ms) → operation ids.
    pub reaps: Mutex<BTreeMap<i64, Vec<OpId>>>,
    /// Uncertain reaps kept for an operator, by operation id (mirrors `reap_pending` in sled).
    pub pending: Mutex<BTreeMap<OpId, reaper::PendingView>>,
}

/// An operation held by one writer; released on drop.
pub(crate) struct Busy<'a>(&'a Ctx, OpId);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        if let Ok(mut b) = self.0.busy.lock() {
            b.remove(&self.1);
        }
    }
}

impl Ctx {
    /// Takes `id` if nobody in this process works on it.
    pub fn try_busy(&self, id: &OpId) -> Option<Busy<'_>> {
        let mut b = self.busy.lock().ok()?;
        b.insert(id.clone()).then(|| Busy(self, id.clone()))
    }

    /// Takes `id`, waiting up to `patience` for the current holder (handlers hold it briefly).
    pub async fn wait_busy(&self, id: &OpId, patience: Duration) -> Option<Busy<'_>> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            if let Some(b) = self.try_busy(id) {
                return Some(b);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The configured provider.
    pub fn provider(&self) -> Arc<dyn Provider> {
        self.providers.primary.clone()
    }

    /// The provider of `alt`'s side: the alternate one when `alt` and one is configured.
    pub fn provider_for(&self, alt: bool) -> Arc<dyn Provider> {
        match (&self.providers.alt, alt) {
            (Some(a), true) => a.clone(),
            _ => self.providers.primary.clone(),
        }
    }

    /// The provider instance `id` of `rec` lives at.
    pub fn provider_of(&self, rec: &CloudRecord, id: &str) -> Arc<dyn Provider> {
        self.provider_for(rec.alt_instances.iter().any(|i| i == id))
    }

    /// Plans a reap look at `at_ms`.
    pub fn schedule_reap(&self, id: &OpId, at_ms: i64) {
        if let Ok(mut r) = self.reaps.lock() {
            r.entry(at_ms).or_default().push(id.clone());
        }
    }
}

pub struct App {
    ctx: Arc<Ctx>,
}

impl App {
    pub async fn build(settings: Settings) -> anyhow::Result<App> {
        // The operator's reap routes live on the ops listener, which starts before the state.
        let cell: Arc<OnceLock<Arc<Ctx>>> = Arc::new(OnceLock::new());
        let rt = Runtime::start_with(SERVICE, &settings.common, http::router(cell.clone())).await?;
        let provider: Arc<dyn Provider> = kit::cloud::build(&settings.provider, &settings.account, &settings.hetzner, rt.center.clone(), false)?;
        let alt = match settings.alt_provider.trim() {
            "" => None,
            kind => Some(kit::cloud::build(kind, &settings.alt_account, &settings.hetzner, rt.center.clone(), false)?),
        };
        let ports = Port::parse_list(&settings.open_ports).map_err(|e| anyhow::anyhow!("PN_OPEN_PORTS: {e}"))?;
        if settings.image_families().iter().any(|f| !matches!(f.as_str(), "ubuntu" | "debian")) || settings.image_families().is_empty() {
            anyhow::bail!("PN_IMAGE_OS must list ubuntu and/or debian, got {:?}", settings.image_os);
        }
        let ops: Table<CloudRecord> = rt.store.table("ops")?;
        let mut reaps: BTreeMap<i64, Vec<OpId>> = BTreeMap::new();
        let mut pending = BTreeMap::new();
        for item in ops.iter() {
            let (_, rec) = item?;
            let id = rec.operation_id.clone();
            if rec.reaped {
                continue;
            }
            if let Some(at) = rec.reap_at_ms {
                reaps.entry(at).or_default().push(id.clone());
            }
            if let Some(p) = &rec.reap_pending {
                pending.insert(id.clone(), reaper::PendingView::of(&rec, p));
            }
        }
        metrics::gauge!("pn_reap_pending").set(pending.len() as f64);
        let ctx = Arc::new(Ctx {
            rt,
            settings,
            providers: Providers::new(provider, alt),
            ports,
            ops,
            busy: Mutex::new(HashSet::new()),
            reaps: Mutex::new(reaps),
            pending: Mutex::new(pending),
        });
        let _ = cell.set(ctx.clone());
        Ok(App { ctx })
    }

    /// Where `/healthz`, `/readyz`, `/metrics` and the `/v1/reap/…` routes are served.
    pub fn ops_addr(&self) -> std::net::SocketAddr {
        self.ctx.rt.ops_addr
    }

    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        let ctx = self.ctx;
        let rt = ctx.rt.clone();
        let mut set = JoinSet::new();
        // Booting VPSs and §3.f pauses wait parked (no handler slot): the stage's consumers park.
        let cfg = rt.loop_config(Stage::Cloud);
        let parking = cfg.clone().with_parking(rt.common.max_parked);
        rt.spawn_consumer(
            &mut set,
            ConsumerSpec::ops("svc-cloud-claimed", subjects::CLAIMED, &parking),
            parking.clone(),
            Arc::new(stage::OnClaimed(ctx.clone())),
        )
        .await?;
        rt.spawn_consumer(&mut set, ConsumerSpec::replay(SERVICE, Stage::Cloud, &parking), parking.clone(), Arc::new(stage::OnReplay(ctx.clone())))
            .await?;
        rt.spawn_consumer(&mut set, ConsumerSpec::ops("svc-cloud-failed", subjects::FAILED, &cfg), cfg.clone(), Arc::new(reaper::OnFailed(ctx.clone())))
            .await?;
        // The deployer's requests to replace a broken instance; the new one's boot wait parks.
        rt.spawn_consumer(
            &mut set,
            ConsumerSpec::ops("svc-cloud-rebuild", subjects::REBUILD, &parking),
            parking.clone(),
            Arc::new(rebuild::OnRebuild(ctx.clone())),
        )
        .await?;
        {
            let ctx = ctx.clone();
            let token = rt.shutdown.clone();
            set.spawn(async move { reaper::reap_loop(ctx, token).await });
        }
        {
            let ctx = ctx.clone();
            rt.spawn_sampler(move || gauges::sample(ctx.clone()));
        }
        rt.run_until(set, shutdown).await;
        Ok(())
    }
}
