//! svc-verifier waits for a deployed node to prove itself (runbook step 7) — k2s ready, the
//! sidecar registered (carrying the claim), the usage reporter started, the node listed at
//! Center with its domain, the operation `done` (set by the node, never by us), usage recorded
//! at Center (`get_cloud_instance`'s `trafficUsedBytes` advancing between two readings), with
//! the meter's ledger (`meter.usage.<node>`) as a cross-check that warns and counts
//! (`pn_verify_usage_mismatch_total`), never a condition.
//!
//! One way to wait: a message is handled in rounds. Each round runs the checks not yet held
//! (`checks`), records what it saw and when to look next in sled (`record`), and parks the
//! message (`HandleError::Park`) — no sleep, handler slot or SSH session is held between
//! rounds. The deadline is recorded when the node is first seen, so a restart keeps it.
//!
//! Activation is final: before failing an operation for any reason (the deadline, a fatal
//! finding) the verifier asks Center (`kit::world::activation`). An activated operation is
//! never failed: it becomes *degraded* (`pn.op.degraded.<op>` once, a warning, metrics) and is
//! watched at a slow pace for `degraded_watch_ms`; if every check holds later, it is verified.
//! When Center cannot say, nothing is concluded: it asks again later.

mod checks;
mod gauges;
mod record;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kit::app::Runtime;
use kit::bus::{ConsumerSpec, HandleError, Handler, Incoming, Meta};
use kit::config::Common;
use kit::ssh::AdminKeys;
use kit::state::Table;
use kit::world::Activation;
use proto::{Body, NodeDeployed, NodeVerified, OpDegraded, OpFailed, OpId, Stage, subjects};
use serde::Deserialize;
use tokio::task::JoinSet;

pub use record::{Degraded, Held, VerifyRecord};

/// The `svc-verifier` process: settings from `PN_*`, logging, then the service until SIGTERM/Ctrl-C.
/// It builds its own multi-thread runtime (what `#[tokio::main]` would) so that both `main.rs`
/// and the multi-call binary `pnp svc-verifier` can call it from a plain, synchronous `main`.
pub fn main_entry() -> anyhow::Result<()> {
    kit::app::service_main(|s: &Settings| s.common.log_format, |s| async move { App::build(s).await?.run(kit::shutdown::signal()).await })
}

pub const SERVICE: &str = "svc-verifier";

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SshSettings {
    /// The login user for a `pn.op.deployed` that names none (`PN_SSH__USER`); an event's
    /// `ssh_user` — the user the deployer logged in as, the image's — wins.
    pub user: String,
    pub admin_keys: String,
    pub connect_timeout_ms: u64,
    pub command_timeout_ms: u64,
}

impl Default for SshSettings {
    fn default() -> Self {
        SshSettings { user: "ubuntu".into(), admin_keys: String::new(), connect_timeout_ms: 10_000, command_timeout_ms: 30_000 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Settings {
    #[serde(flatten)]
    pub common: Common,
    /// Time a deployed node has to prove itself, from when the verifier first sees it
    /// (`PN_DEADLINE_MS`). After it, a node activated at Center is degraded, any other failed.
    pub deadline_ms: u64,
    /// Pause before the second round of checks (`PN_POLL_MIN_MS`); it grows ×1.5 per round …
    pub poll_min_ms: u64,
    /// … up to this (`PN_POLL_MAX_MS`).
    pub poll_max_ms: u64,
    /// How long a degraded operation is still watched, from when it degraded
    /// (`PN_DEGRADED_WATCH_MS`, a day). Also how long, past the deadline, the verifier keeps
    /// asking a Center that cannot say whether the operation is activated.
    pub degraded_watch_ms: u64,
    /// The longest pause between two rounds of a degraded operation (`PN_DEGRADED_POLL_MAX_MS`,
    /// 5 minutes); the pause doubles from `poll_max_ms` up to it.
    pub degraded_poll_max_ms: u64,
    pub ssh: SshSettings,
    /// Sudo prefix for `docker logs` (empty when the SSH user is root without sudo).
    pub sudo: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            common: Common::default(),
            deadline_ms: 600_000,
            poll_min_ms: 500,
            poll_max_ms: 10_000,
            degraded_watch_ms: 86_400_000,
            degraded_poll_max_ms: 300_000,
            ssh: SshSettings::default(),
            sudo: "sudo".into(),
        }
    }
}

pub(crate) struct Ctx {
    pub rt: Runtime,
    pub settings: Settings,
    pub keys: AdminKeys,
    pub ops: Table<VerifyRecord>,
    locks: kit::locks::OpLocks,
    /// Operations degraded and still watched (the `pn_ops_degraded` gauge).
    degraded_open: AtomicI64,
}

impl Ctx {
    /// Moves the degraded gauge by what one handler call changed.
    fn degraded_moved(&self, before: bool, after: bool) {
        let delta = i64::from(after) - i64::from(before);
        if delta != 0 {
            let now = self.degraded_open.fetch_add(delta, Ordering::Relaxed) + delta;
            metrics::gauge!("pn_ops_degraded", "stage" => Stage::Verify.as_str()).set(now as f64);
        }
    }
}

pub struct App {
    ctx: Arc<Ctx>,
}

impl App {
    pub async fn build(settings: Settings) -> anyhow::Result<App> {
        let keys = AdminKeys::parse(&settings.ssh.admin_keys)?;
        let rt = Runtime::start(SERVICE, &settings.common).await?;
        let ops: Table<VerifyRecord> = rt.store.table("ops")?;
        // The gauge survives restarts: count the degraded operations still watched.
        let open = ops.iter().filter_map(Result::ok).filter(|(_, r)| r.degraded_open()).count() as i64;
        metrics::gauge!("pn_ops_degraded", "stage" => Stage::Verify.as_str()).set(open as f64);
        let ctx = Ctx { rt, settings, keys, ops, locks: kit::locks::OpLocks::default(), degraded_open: AtomicI64::new(open) };
        Ok(App { ctx: Arc::new(ctx) })
    }

    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        let ctx = self.ctx;
        let rt = ctx.rt.clone();
        let mut set = JoinSet::new();
        // Operations between two rounds wait parked in JetStream (no handler, no session).
        let cfg = rt.loop_config(Stage::Verify).with_parking(ctx.settings.common.max_parked);
        rt.spawn_consumer(&mut set, ConsumerSpec::ops("svc-verifier-deployed", subjects::DEPLOYED, &cfg), cfg.clone(), Arc::new(OnDeployed(ctx.clone())))
            .await?;
        rt.spawn_consumer(&mut set, ConsumerSpec::replay(SERVICE, Stage::Verify, &cfg), cfg.clone(), Arc::new(OnReplay(ctx.clone())))
            .await?;
        {
            let ctx = ctx.clone();
            rt.spawn_sampler(move || gauges::sample(ctx.clone()));
        }
        rt.run_until(set, shutdown).await;
        Ok(())
    }
}

struct OnDeployed(Arc<Ctx>);
struct OnReplay(Arc<Ctx>);

#[async_trait::async_trait]
impl Handler for OnDeployed {
    async fn handle(&self, msg: Incoming) -> Result<(), HandleError> {
        let d: NodeDeployed = msg.decode_as()?;
        verify(&self.0, d, Source::Deployed).await
    }
}

#[async_trait::async_trait]
impl Handler for OnReplay {
    async fn handle(&self, msg: Incoming) -> Result<(), HandleError> {
        let (id, d): (OpId, NodeDeployed) = kit::bus::replay_lookup(&self.0.ops, &msg, SERVICE, |r| r.deployed_pb.as_slice())?;
        if msg.delivered == 1 {
            tracing::info!(op = %id, "replaying verification with a new deadline");
        }
        verify(&self.0, d, Source::Replay { first: msg.delivered == 1 }).await
    }
}

/// Which message drives a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Deployed,
    /// `first`: the replay message's first delivery (it starts over with a new deadline).
    Replay { first: bool },
}

impl Source {
    fn replay(self) -> bool {
        matches!(self, Source::Replay { .. })
    }
}

fn transient(e: impl std::fmt::Display) -> HandleError {
    HandleError::retry(e.to_string(), Duration::from_secs(2))
}

fn fail(d: &NodeDeployed, reason: String) -> HandleError {
    let op = d.op.clone().unwrap_or_default();
    HandleError::Fail {
        reason: reason.clone(),
        failed: Some(
            OpFailed::new(&op.operation_id, Stage::Verify.as_str(), reason, kit::now_ms())
                .of_op(&op)
                .on_instance(d.instance.as_ref().map(|i| i.instance_id.clone()).unwrap_or_default()),
        ),
    }
}

fn park(reason: &str, at_ms: i64) -> HandleError {
    let after = Duration::from_millis((at_ms - kit::now_ms()).max(50) as u64);
    HandleError::Park { reason: reason.to_string(), after }
}

fn fresh(id: &OpId, d: &NodeDeployed, ctx: &Ctx, replay_driven: bool) -> VerifyRecord {
    let now = kit::now_ms();
    VerifyRecord {
        claim_attempt: d.op.as_ref().map(|o| o.claim_attempt).unwrap_or(0),
        deployed_pb: prost::Message::encode_to_vec(d),
        deadline_ms: now + ctx.settings.deadline_ms as i64,
        started_ms: now,
        next_check_ms: now,
        replay_driven,
        ..VerifyRecord::new(id.clone())
    }
}

async fn verify(ctx: &Arc<Ctx>, d: NodeDeployed, src: Source) -> Result<(), HandleError> {
    let op = d.op.clone().ok_or_else(|| HandleError::fail("NodeDeployed without an operation"))?;
    let id = OpId::parse(&op.operation_id).ok().filter(|_| d.node_name.starts_with("pn-") && subjects::is_token(&d.node_name));
    let Some(id) = id else {
        return Err(HandleError::fail("deployed event with an unusable operation id or node name"));
    };
    let _guard = ctx.locks.lock(&id).await;
    let existing = ctx.ops.get(&id).map_err(transient)?;
    let before = existing.as_ref().is_some_and(VerifyRecord::degraded_open);
    let mut rec = match (existing, src) {
        (Some(r), Source::Deployed) if op.claim_attempt < r.claim_attempt => {
            tracing::info!(op = %id, attempt = op.claim_attempt, current = r.claim_attempt, "deployment of an earlier claim attempt; ignored");
            return Ok(());
        }
        (Some(r), Source::Deployed) if op.claim_attempt == r.claim_attempt => {
            if r.replay_driven {
                tracing::debug!(op = %id, "a replay drives this verification");
                return Ok(());
            }
            r
        }
        (Some(r), Source::Replay { first: false }) if r.replay_driven => r,
        (_, src) => fresh(&id, &d, ctx, src.replay()),
    };
    let res = step(ctx, &d, &mut rec, src).await;
    ctx.degraded_moved(before, rec.degraded_open());
    res
}

/// One round for `rec`: republish a recorded outcome, or wait until the next check is due, or
/// run the checks and decide.
async fn step(ctx: &Arc<Ctx>, d: &NodeDeployed, rec: &mut VerifyRecord, src: Source) -> Result<(), HandleError> {
    let id = rec.operation_id.clone();
    if let Some(v) = rec.verified.clone() {
        return publish_verified(ctx, d, v, src.replay()).await;
    }
    if let Some(reason) = rec.failed.clone() {
        return Err(fail(d, reason));
    }
    if rec.gave_up.is_some() {
        return Ok(());
    }
    let now = kit::now_ms();
    if now + 20 < rec.next_check_ms {
        // Delivered early (a restart, a duplicate): the record says when to look.
        return Err(park("next round not due yet", rec.next_check_ms));
    }

    let round = checks::round(ctx, d, &mut rec.held).await;
    rec.rounds = rec.rounds.saturating_add(1);
    let (unmet, fatal) = match round {
        checks::Round::AllHeld(seen) => {
            let op = d.op.clone().unwrap_or_default();
            let v = NodeVerified {
                op: Some(op.clone()),
                instance: d.instance.clone(),
                node_name: d.node_name.clone(),
                domain: seen.domain,
                tunnel_count: seen.tunnels,
                time_to_active_ms: kit::now_ms() - if op.queued_at_ms > 0 { op.queued_at_ms } else { op.claimed_at_ms },
                verified_at_ms: kit::now_ms(),
            };
            if let Some(g) = &rec.degraded {
                tracing::info!(op = %id, degraded_for_ms = kit::now_ms() - g.since_ms, "a degraded operation now passes every check");
            }
            rec.verified = Some(v.clone());
            ctx.ops.put(&id, rec).await.map_err(transient)?;
            // Once per operation: a recorded outcome is republished above, not observed again.
            metrics::histogram!("pn_time_to_active_seconds").record(v.time_to_active_ms.max(0) as f64 / 1000.0);
            return publish_verified(ctx, d, v, src.replay()).await;
        }
        checks::Round::Pending(u) => (u, false),
        checks::Round::Fatal(u) => (u, true),
    };
    rec.last_unmet = unmet.clone();
    let s = &ctx.settings;

    // Degraded already: watch slowly until the watch ends. Never failed.
    if let Some(g) = rec.degraded.clone() {
        if now >= g.watch_until_ms {
            tracing::warn!(op = %id, reason = %g.reason, still = %unmet, "degraded operation still not verified; stopped watching it (it stays degraded, never failed)");
            metrics::counter!("pn_verify_watch_ended_total", "stage" => Stage::Verify.as_str()).increment(1);
            rec.gave_up = Some(format!("still degraded when the watch ended: {unmet}"));
            ctx.ops.put(&id, rec).await.map_err(transient)?;
            return Ok(());
        }
        if !g.published {
            publish_degraded(ctx, d, rec, src).await?;
        }
        let looks = rec.rounds.saturating_sub(g.at_round);
        rec.next_check_ms = now + slow_pause(s, looks);
        ctx.ops.put(&id, rec).await.map_err(transient)?;
        return Err(park(&format!("degraded: {unmet}"), rec.next_check_ms));
    }

    if !fatal && now < rec.deadline_ms {
        let pause = (s.poll_min_ms.max(50) as f64 * 1.5f64.powi(rec.rounds.saturating_sub(1).min(64) as i32)) as i64;
        let pause = pause.min(s.poll_max_ms.max(s.poll_min_ms) as i64);
        rec.next_check_ms = (now + pause).min(rec.deadline_ms);
        ctx.ops.put(&id, rec).await.map_err(transient)?;
        return Err(park(&unmet, rec.next_check_ms));
    }

    // The deadline passed or a fatal finding: fail — unless Center says it is activated.
    let reason = if fatal { unmet.clone() } else { format!("not verified within {}s: {unmet}", (rec.deadline_ms - rec.started_ms) / 1000) };
    match kit::world::activation(ctx.rt.center.as_ref(), id.as_str(), &d.node_name).await {
        Activation::Active { why } => {
            tracing::warn!(op = %id, node = %d.node_name, %reason, activation = %why, "activated at Center but not verified: degraded, not failed");
            metrics::counter!("pn_ops_degraded_total", "stage" => Stage::Verify.as_str()).increment(1);
            rec.degraded = Some(Degraded {
                reason: reason.clone(),
                activation: why,
                since_ms: now,
                published: false,
                watch_until_ms: now.saturating_add(s.degraded_watch_ms as i64),
                at_round: rec.rounds,
            });
            rec.unknown_looks = 0;
            rec.next_check_ms = now + slow_pause(s, 0);
            ctx.ops.put(&id, rec).await.map_err(transient)?;
            publish_degraded(ctx, d, rec, src).await?;
            ctx.ops.put(&id, rec).await.map_err(transient)?;
            Err(park(&format!("degraded: {unmet}"), rec.next_check_ms))
        }
        Activation::Unknown { why } => {
            rec.unknown_looks = rec.unknown_looks.saturating_add(1);
            if now >= rec.deadline_ms.saturating_add(s.degraded_watch_ms as i64) {
                tracing::error!(op = %id, %reason, center = %why, "Center never said whether the operation is activated; stopped watching it (not failed: it may be live)");
                metrics::counter!("pn_verify_watch_ended_total", "stage" => Stage::Verify.as_str()).increment(1);
                rec.gave_up = Some(format!("activation unknown when the watch ended ({why}): {reason}"));
                ctx.ops.put(&id, rec).await.map_err(transient)?;
                return Ok(());
            }
            tracing::warn!(op = %id, %reason, center = %why, looks = rec.unknown_looks, "would fail, but Center cannot say whether it is activated; asking again later");
            rec.next_check_ms = now + slow_pause(s, rec.unknown_looks.saturating_sub(1));
            ctx.ops.put(&id, rec).await.map_err(transient)?;
            Err(park(&format!("activation unknown: {why}"), rec.next_check_ms))
        }
        Activation::InFlight { .. } | Activation::Failed { .. } => {
            rec.failed = Some(reason.clone());
            ctx.ops.put(&id, rec).await.map_err(transient)?;
            Err(fail(d, reason))
        }
    }
}

/// The pause before the `looks`-th slow round: `poll_max_ms` doubled per look, at most
/// `degraded_poll_max_ms`.
fn slow_pause(s: &Settings, looks: u32) -> i64 {
    let base = s.poll_max_ms.max(s.poll_min_ms).max(50);
    let cap = s.degraded_poll_max_ms.max(base);
    base.saturating_mul(1u64 << looks.min(30)).min(cap) as i64
}

async fn publish_degraded(ctx: &Ctx, d: &NodeDeployed, rec: &mut VerifyRecord, src: Source) -> Result<(), HandleError> {
    let Some(g) = rec.degraded.clone() else { return Ok(()) };
    let op = d.op.clone().unwrap_or_default();
    let attempt = op.claim_attempt.max(1);
    let mut meta = Meta::outcome(&op.operation_id, &op.sub_id, Stage::Verify, attempt);
    meta.msg_id = subjects::degraded_msg_id(&op.operation_id, attempt);
    if src.replay() || rec.replay_driven {
        meta.msg_id = subjects::replay_msg_id(&meta.msg_id, g.since_ms);
    }
    let body = OpDegraded {
        op: Some(op.clone()),
        node_name: d.node_name.clone(),
        stage: Stage::Verify.as_str().into(),
        reason: g.reason.clone(),
        degraded_at_ms: g.since_ms,
        instance_id: d.instance.as_ref().map(|i| i.instance_id.clone()).unwrap_or_default(),
    };
    ctx.rt
        .bus
        .publish(subjects::op_event(subjects::DEGRADED, &op.operation_id), Body::Degraded(body), &meta)
        .await
        .map_err(transient)?;
    if let Some(g) = rec.degraded.as_mut() {
        g.published = true;
    }
    tracing::info!(op = %op.operation_id, node = %d.node_name, "pn.op.degraded published");
    Ok(())
}

async fn publish_verified(ctx: &Ctx, d: &NodeDeployed, v: NodeVerified, replay: bool) -> Result<(), HandleError> {
    let op = d.op.clone().unwrap_or_default();
    let mut meta = Meta::outcome(&op.operation_id, &op.sub_id, Stage::Verify, op.claim_attempt.max(1));
    if replay {
        meta.msg_id = subjects::replay_msg_id(&meta.msg_id, kit::now_ms());
    }
    ctx.rt
        .bus
        .publish(subjects::op_event(subjects::VERIFIED, &op.operation_id), Body::Verified(v.clone()), &meta)
        .await
        .map_err(transient)?;
    tracing::info!(node = %v.node_name, domain = %v.domain, time_to_active_ms = v.time_to_active_ms, "verified");
    Ok(())
}
