//! `pn.op.claimed` → a running VPS with a public IPv4 → `pn.op.instance`.
//! Probe `pn-<subId>` first and adopt a live match; otherwise discover (plan covering the sold
//! quota with headroom, newest Ubuntu LTS), record the intent, create, wait for `running`.
//! Fail paths (seed 001 §3.f): a failed create or an instance without an IP is retried after
//! a pause, then tried in the sibling regions, and only then is the operation failed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kit::bus::{HandleError, Handler, Incoming, Meta};
use proto::{Body, InstanceReady, OpFailed, Operation, Stage, subjects};

use crate::provider::{ProviderError, Vps};
use crate::record::InstanceInfo;
use crate::{CloudRecord, Ctx};

pub struct OnClaimed(pub Arc<Ctx>);
pub struct OnReplay(pub Arc<Ctx>);

#[async_trait::async_trait]
impl Handler for OnClaimed {
    #[tracing::instrument(skip_all, fields(op = msg.subject_op_id().unwrap_or(""), stage = "cloud"))]
    async fn handle(&self, msg: Incoming) -> Result<(), HandleError> {
        let Body::Claimed(c) = msg.decode()? else {
            return Err(HandleError::fail("pn.op.claimed carries another message type"));
        };
        let op = c.op.ok_or_else(|| HandleError::fail("OpClaimed without an operation"))?;
        run(&self.0, op, false).await
    }
}

#[async_trait::async_trait]
impl Handler for OnReplay {
    async fn handle(&self, msg: Incoming) -> Result<(), HandleError> {
        let (id, op): (String, Operation) = kit::bus::replay_lookup(&self.0.ops, &msg, crate::SERVICE, |r| r.op_pb.as_slice())?;
        tracing::info!(op = %id, "replaying the cloud stage");
        run(&self.0, op, true).await
    }
}

fn failed(op: &Operation, instance_id: &str, reason: String) -> HandleError {
    HandleError::Fail {
        reason: reason.clone(),
        failed: Some(OpFailed {
            operation_id: op.operation_id.clone(),
            sub_id: op.sub_id.clone(),
            stage: Stage::Cloud.as_str().into(),
            reason,
            attempt: op.claim_attempt.max(1),
            failed_at_ms: kit::now_ms(),
            instance_id: instance_id.to_string(),
            holder: op.holder.clone(),
        }),
    }
}

fn transient(e: impl std::fmt::Display) -> HandleError {
    HandleError::retry(e.to_string(), Duration::from_secs(3))
}

struct Busy<'a>(&'a Ctx, String);
impl Drop for Busy<'_> {
    fn drop(&mut self) {
        if let Ok(mut b) = self.0.busy.lock() {
            b.remove(&self.1);
        }
    }
}

async fn run(ctx: &Arc<Ctx>, op: Operation, replay: bool) -> Result<(), HandleError> {
    let id = op.operation_id.clone();
    if !subjects::is_token(&id) || !subjects::is_token(&op.sub_id) {
        return Err(HandleError::fail("operation id or subId is not a plain token"));
    }
    let _busy = {
        let mut b = ctx.busy.lock().map_err(|_| transient("busy set poisoned"))?;
        if !b.insert(id.clone()) {
            return Err(HandleError::retry("operation already being handled here", Duration::from_secs(5)));
        }
        Busy(ctx, id.clone())
    };
    let mut rec = ctx.ops.get(&id).map_err(transient)?.unwrap_or_else(|| CloudRecord {
        operation_id: id.clone(),
        sub_id: op.sub_id.clone(),
        ..Default::default()
    });
    if rec.failed {
        return Ok(());
    }
    // A newer claim attempt (lease expired and re-claimed) replaces the stored operation.
    rec.op_pb = prost::Message::encode_to_vec(&op);
    if rec.published && !replay
        && let Some(info) = rec.instance.clone() {
            return publish(ctx, &op, &info, false).await;
        }
    ctx.ops.put(&id, &rec).await.map_err(transient)?;

    let name = format!("pn-{}", op.sub_id);
    let info = match probe(ctx, &name).await.map_err(|e| match e {
        ProviderError::Transient(m) => transient(m),
        other => failed(&op, "", format!("probing {name}: {other}")),
    })? {
        Some(vps) => {
            tracing::info!(instance = %vps.id, status = %vps.status, "adopting existing {name}");
            let adopted = !rec.created.contains(&vps.id);
            let vps = wait_running(ctx, &vps.id).await.map_err(|e| wait_error(ctx, &op, &vps.id, e))?;
            info_of(&vps, adopted)
        }
        None => create_with_fallbacks(ctx, &op, &mut rec, &name).await?,
    };
    rec.instance = Some(info.clone());
    ctx.ops.put(&id, &rec).await.map_err(transient)?;
    publish(ctx, &op, &info, replay).await?;
    rec.published = true;
    ctx.ops.put(&id, &rec).await.map_err(transient)?;
    Ok(())
}

fn info_of(v: &Vps, adopted: bool) -> InstanceInfo {
    InstanceInfo {
        id: v.id.clone(),
        name: v.name.clone(),
        ipv4: v.ipv4.clone().unwrap_or_default(),
        account: v.account.clone(),
        region: v.region.clone(),
        plan: v.plan.clone(),
        image: v.image.clone(),
        adopted,
    }
}

/// The live `pn-<subId>` instance, if any; the oldest-listed when (wrongly) several exist.
async fn probe(ctx: &Ctx, name: &str) -> Result<Option<Vps>, ProviderError> {
    let live: Vec<Vps> = ctx.provider.find_by_name(name).await?.into_iter().filter(|v| !v.is_gone()).collect();
    if live.len() > 1 {
        tracing::error!(count = live.len(), "{name} exists more than once; adopting the first, leaving the rest for an operator");
    }
    Ok(live.into_iter().next())
}

enum WaitError {
    NoIp,
    Timeout(String),
    Gone,
}

fn wait_error(ctx: &Ctx, op: &Operation, id: &str, e: WaitError) -> HandleError {
    let secs = ctx.settings.boot_timeout_ms / 1000;
    match e {
        WaitError::NoIp => failed(op, id, format!("instance {id} is running without a public IPv4")),
        WaitError::Timeout(status) => failed(op, id, format!("instance {id} not running after {secs}s (status {status})")),
        WaitError::Gone => failed(op, id, format!("instance {id} disappeared while booting")),
    }
}

async fn wait_running(ctx: &Ctx, id: &str) -> Result<Vps, WaitError> {
    let started = Instant::now();
    let timeout = Duration::from_millis(ctx.settings.boot_timeout_ms);
    let no_ip = Duration::from_millis(ctx.settings.no_ip_timeout_ms);
    let poll = Duration::from_millis(ctx.settings.boot_poll_ms.max(50));
    let mut running_since: Option<Instant> = None;
    let mut last_status = String::from("unknown");
    loop {
        match ctx.provider.get(id).await {
            Ok(v) if v.is_running() && v.ipv4.is_some() => return Ok(v),
            Ok(v) if v.is_gone() => return Err(WaitError::Gone),
            Ok(v) => {
                if v.is_running() {
                    let since = *running_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= no_ip {
                        return Err(WaitError::NoIp);
                    }
                }
                last_status = v.status;
            }
            Err(e) => tracing::debug!(error = %e, "instance status unavailable; polling on"),
        }
        if started.elapsed() >= timeout {
            return Err(WaitError::Timeout(last_status));
        }
        tokio::time::sleep(poll).await;
    }
}

async fn create_with_fallbacks(ctx: &Arc<Ctx>, op: &Operation, rec: &mut CloudRecord, name: &str) -> Result<InstanceInfo, HandleError> {
    let s = &ctx.settings;
    let min_transfer = (op.traffic_total_bytes as f64 * s.transfer_headroom.max(1.0)) as u64;
    let regions = s.regions_for(&op.region);
    let mut reasons: Vec<String> = Vec::new();
    let pause = Duration::from_millis(s.create_retry_pause_ms);
    for (ri, region) in regions.iter().enumerate() {
        let choice = match ctx.provider.choose(region, min_transfer).await {
            Ok(c) => c,
            Err(ProviderError::Transient(m)) => return Err(transient(m)),
            Err(e) => {
                reasons.push(e.to_string());
                continue;
            }
        };
        for attempt in 0..s.create_attempts_per_region.max(1) {
            if attempt > 0 || (ri > 0 && !reasons.is_empty()) {
                tokio::time::sleep(pause).await;
            }
            if rec.create_started_at_ms.is_none() {
                rec.create_started_at_ms = Some(kit::now_ms());
            }
            ctx.ops.put(&rec.operation_id, rec).await.map_err(transient)?;
            let vps = match ctx.provider.create(&choice, name).await {
                Ok(v) => v,
                Err(e) => {
                    // The create may have happened despite the error: probe before anything else.
                    if let Ok(Some(v)) = probe(ctx, name).await {
                        v
                    } else {
                        tracing::warn!(region = %region, error = %e, "create failed");
                        reasons.push(format!("{region}: {e}"));
                        if matches!(e, ProviderError::Transient(_)) {
                            continue;
                        }
                        break;
                    }
                }
            };
            if !rec.created.contains(&vps.id) {
                rec.created.push(vps.id.clone());
            }
            ctx.ops.put(&rec.operation_id, rec).await.map_err(transient)?;
            tracing::info!(instance = %vps.id, region = %region, plan = %choice.plan, image = %choice.image, "created {name}");
            match wait_running(ctx, &vps.id).await {
                Ok(v) => return Ok(info_of(&v, false)),
                Err(WaitError::NoIp) => {
                    // Seed 001 §3.f: no IP → remove our broken VPS, pause, try again/elsewhere.
                    reasons.push(format!("{region}: instance {} got no public IPv4", vps.id));
                    delete_own(ctx, rec, &vps.id).await?;
                }
                Err(e) => return Err(wait_error(ctx, op, &vps.id, e)),
            }
        }
    }
    let reason = if reasons.is_empty() { format!("no provider region for job region {}", op.region) } else { reasons.join("; ") };
    Err(failed(op, "", reason))
}

async fn delete_own(ctx: &Ctx, rec: &mut CloudRecord, id: &str) -> Result<(), HandleError> {
    ctx.provider.delete(id).await.map_err(transient)?;
    rec.deleted.push(id.to_string());
    ctx.ops.put(&rec.operation_id, rec).await.map_err(transient)?;
    Ok(())
}

async fn publish(ctx: &Ctx, op: &Operation, info: &InstanceInfo, replay: bool) -> Result<(), HandleError> {
    let mut meta = Meta::outcome(&op.operation_id, &op.sub_id, Stage::Cloud, op.claim_attempt.max(1));
    if replay {
        meta.msg_id = format!("{}.replay.{}", meta.msg_id, kit::now_ms());
    }
    let ev = InstanceReady {
        op: Some(op.clone()),
        instance: Some(proto::Instance {
            instance_id: info.id.clone(),
            name: info.name.clone(),
            ipv4: info.ipv4.clone(),
            provider: ctx.provider.name().to_string(),
            account: info.account.clone(),
            provider_region: info.region.clone(),
            plan: info.plan.clone(),
            image: info.image.clone(),
            adopted: info.adopted,
        }),
        ready_at_ms: kit::now_ms(),
    };
    ctx.rt
        .bus
        .publish(subjects::op_event(subjects::INSTANCE, &op.operation_id), Body::Instance(ev), &meta)
        .await
        .map_err(transient)?;
    tracing::info!(instance = %info.id, ipv4 = %info.ipv4, adopted = info.adopted, "instance ready");
    Ok(())
}
