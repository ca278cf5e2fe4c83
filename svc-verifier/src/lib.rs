//! svc-verifier waits for a deployed node to prove itself (runbook step 7) — k2s ready, the
//! sidecar registered (carrying the claim), the usage reporter started, the node listed at
//! Center with its domain, the operation `done` (set by the node, never by us), usage recorded
//! by the meter — or fails the operation naming the check that did not hold. Never hangs: the
//! deadline is recorded in sled when the node is first seen, so a restart keeps it.

mod checks;
mod record;

use std::sync::Arc;
use std::time::Duration;

use kit::app::Runtime;
use kit::bus::{ConsumerSpec, HandleError, Handler, Incoming, Meta};
use kit::config::Common;
use kit::ssh::AdminKeys;
use kit::state::Table;
use proto::{Body, NodeDeployed, NodeVerified, OpFailed, Stage, subjects};
use serde::Deserialize;
use tokio::task::JoinSet;

pub use record::VerifyRecord;

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
    /// Time a deployed node has to prove itself, from when the verifier first sees it.
    pub deadline_ms: u64,
    /// Back-off between rounds of checks.
    pub poll_min_ms: u64,
    pub poll_max_ms: u64,
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
}

pub struct App {
    ctx: Arc<Ctx>,
}

impl App {
    pub async fn build(settings: Settings) -> anyhow::Result<App> {
        let keys = AdminKeys::parse(&settings.ssh.admin_keys)?;
        let rt = Runtime::start(SERVICE, &settings.common).await?;
        let ops = rt.store.table("ops")?;
        Ok(App { ctx: Arc::new(Ctx { rt, settings, keys, ops }) })
    }

    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        let ctx = self.ctx;
        let rt = ctx.rt.clone();
        let mut set = JoinSet::new();
        let cfg = rt.loop_config(Stage::Verify);
        rt.spawn_consumer(&mut set, ConsumerSpec::ops("svc-verifier-deployed", subjects::DEPLOYED, &cfg), cfg.clone(), Arc::new(OnDeployed(ctx.clone())))
            .await?;
        rt.spawn_consumer(&mut set, ConsumerSpec::replay(SERVICE, Stage::Verify, &cfg), cfg.clone(), Arc::new(OnReplay(ctx.clone())))
            .await?;
        rt.run_until(set, shutdown).await;
        Ok(())
    }
}

struct OnDeployed(Arc<Ctx>);
struct OnReplay(Arc<Ctx>);

#[async_trait::async_trait]
impl Handler for OnDeployed {
    #[tracing::instrument(skip_all, fields(op = msg.subject_op_id().unwrap_or(""), stage = "verify"))]
    async fn handle(&self, msg: Incoming) -> Result<(), HandleError> {
        let Body::Deployed(d) = msg.decode()? else {
            return Err(HandleError::fail("pn.op.deployed carries another message type"));
        };
        verify(&self.0, d, false).await
    }
}

#[async_trait::async_trait]
impl Handler for OnReplay {
    async fn handle(&self, msg: Incoming) -> Result<(), HandleError> {
        let (id, d): (String, NodeDeployed) = kit::bus::replay_lookup(&self.0.ops, &msg, SERVICE, |r| r.deployed_pb.as_slice())?;
        tracing::info!(op = %id, "replaying verification with a new deadline");
        verify(&self.0, d, true).await
    }
}

fn transient(e: impl std::fmt::Display) -> HandleError {
    HandleError::retry(e.to_string(), Duration::from_secs(2))
}

fn fail(d: &NodeDeployed, reason: String) -> HandleError {
    let op = d.op.clone().unwrap_or_default();
    HandleError::Fail {
        reason: reason.clone(),
        failed: Some(OpFailed {
            operation_id: op.operation_id.clone(),
            sub_id: op.sub_id.clone(),
            stage: Stage::Verify.as_str().into(),
            reason,
            attempt: op.claim_attempt.max(1),
            failed_at_ms: kit::now_ms(),
            instance_id: d.instance.as_ref().map(|i| i.instance_id.clone()).unwrap_or_default(),
            holder: op.holder,
        }),
    }
}

async fn verify(ctx: &Arc<Ctx>, d: NodeDeployed, replay: bool) -> Result<(), HandleError> {
    let op = d.op.clone().ok_or_else(|| HandleError::fail("NodeDeployed without an operation"))?;
    let id = op.operation_id.clone();
    if !subjects::is_token(&id) || !d.node_name.starts_with("pn-") || !subjects::is_token(&d.node_name) {
        return Err(HandleError::fail("deployed event with an unusable operation id or node name"));
    }
    let now = kit::now_ms();
    let mut rec = match ctx.ops.get(&id).map_err(transient)? {
        Some(r) if !replay && r.claim_attempt == op.claim_attempt => r,
        _ => VerifyRecord {
            operation_id: id.clone(),
            claim_attempt: op.claim_attempt,
            deployed_pb: prost::Message::encode_to_vec(&d),
            deadline_ms: now + ctx.settings.deadline_ms as i64,
            started_ms: now,
            ..Default::default()
        },
    };
    if let Some(v) = rec.verified.clone() {
        return publish_verified(ctx, &d, v, replay).await;
    }
    if let Some(reason) = rec.failed.clone() {
        return Err(fail(&d, reason));
    }
    ctx.ops.put(&id, &rec).await.map_err(transient)?;

    let mut backoff = Duration::from_millis(ctx.settings.poll_min_ms.max(50));
    let max = Duration::from_millis(ctx.settings.poll_max_ms.max(ctx.settings.poll_min_ms));
    let mut probe = checks::Prober::new(ctx, &d);
    loop {
        let round = probe.round().await;
        match round {
            checks::Round::AllHeld(seen) => {
                let v = NodeVerified {
                    op: Some(op.clone()),
                    instance: d.instance.clone(),
                    node_name: d.node_name.clone(),
                    domain: seen.domain,
                    tunnel_count: seen.tunnels,
                    time_to_active_ms: kit::now_ms() - if op.queued_at_ms > 0 { op.queued_at_ms } else { op.claimed_at_ms },
                    verified_at_ms: kit::now_ms(),
                };
                rec.verified = Some(v.clone());
                ctx.ops.put(&id, &rec).await.map_err(transient)?;
                return publish_verified(ctx, &d, v, replay).await;
            }
            checks::Round::Fatal(reason) => {
                rec.failed = Some(reason.clone());
                ctx.ops.put(&id, &rec).await.map_err(transient)?;
                return Err(fail(&d, reason));
            }
            checks::Round::Pending(first_unmet) => {
                if kit::now_ms() >= rec.deadline_ms {
                    let secs = (rec.deadline_ms - rec.started_ms) / 1000;
                    let reason = format!("not verified within {secs}s: {first_unmet}");
                    rec.failed = Some(reason.clone());
                    ctx.ops.put(&id, &rec).await.map_err(transient)?;
                    return Err(fail(&d, reason));
                }
                rec.last_unmet = first_unmet;
            }
        }
        let left = Duration::from_millis((rec.deadline_ms - kit::now_ms()).max(0) as u64);
        tokio::time::sleep(backoff.min(left)).await;
        backoff = (backoff.mul_f64(1.5)).min(max);
    }
}

async fn publish_verified(ctx: &Ctx, d: &NodeDeployed, v: NodeVerified, replay: bool) -> Result<(), HandleError> {
    let op = d.op.clone().unwrap_or_default();
    let mut meta = Meta::outcome(&op.operation_id, &op.sub_id, Stage::Verify, op.claim_attempt.max(1));
    if replay {
        meta.msg_id = format!("{}.replay.{}", meta.msg_id, kit::now_ms());
    }
    ctx.rt
        .bus
        .publish(subjects::op_event(subjects::VERIFIED, &op.operation_id), Body::Verified(v.clone()), &meta)
        .await
        .map_err(transient)?;
    tracing::info!(node = %v.node_name, domain = %v.domain, time_to_active_ms = v.time_to_active_ms, "verified");
    Ok(())
}
