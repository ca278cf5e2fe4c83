//! `pn.op.claimed` → a running VPS with a public IPv4 → `pn.op.instance`.
//! Probe `pn-<subId>` first (at the configured provider and the alternate one) and adopt a live
//! match; otherwise discover (plan covering the sold quota with headroom, the newest supported
//! image of `PN_IMAGE_OS`), record the intent, create, wait for `running`, open the node's
//! ports in the provider's firewall (`PN_OPEN_PORTS`), publish.
//! Fail paths (seed 001 §3.f): a failed create or an instance without an IP is retried after
//! a pause, then tried in the sibling regions, then — when every region failed — at the
//! alternate provider (`PN_ALT_PROVIDER`), and only then is the operation failed. (A broken
//! instance the deployer finds is replaced by `rebuild.rs`.)
//!
//! Nothing here sleeps: each delivery advances the operation as far as it can go now — one
//! look at a booting instance, one create — records where it stands (`CloudRecord::boot`,
//! `CloudRecord::create`) and parks the message (`HandleError::Park`) until the next look or
//! the end of a pause. A parked operation holds no handler slot. Parks are deliveries, so
//! JetStream's delivery count means nothing here: the handler keeps its own budget of
//! consecutive transient errors (`transient_failures`, up to `PN_MAX_DELIVER`).

use std::sync::Arc;
use std::time::Duration;

use kit::bus::{HandleError, Handler, Incoming, Meta};
use proto::{Body, InstanceReady, OpClaimed, OpFailed, OpId, Operation, Stage, SubId, subjects};

use kit::cloud::{PortsOpened, ProviderError, Vps};
use crate::record::{BootWait, InstanceInfo};
use crate::{CloudRecord, Ctx};

pub struct OnClaimed(pub Arc<Ctx>);
pub struct OnReplay(pub Arc<Ctx>);

#[async_trait::async_trait]
impl Handler for OnClaimed {
    async fn handle(&self, msg: Incoming) -> Result<(), HandleError> {
        let c: OpClaimed = msg.decode_as()?;
        let op = c.op.ok_or_else(|| HandleError::fail("OpClaimed without an operation"))?;
        run(&self.0, op, false).await
    }
}

#[async_trait::async_trait]
impl Handler for OnReplay {
    async fn handle(&self, msg: Incoming) -> Result<(), HandleError> {
        let (id, op): (OpId, Operation) = kit::bus::replay_lookup(&self.0.ops, &msg, crate::SERVICE, |r| r.op_pb.as_slice())?;
        tracing::info!(op = %id, "replaying the cloud stage");
        run(&self.0, op, true).await
    }
}

pub(crate) fn failed(op: &Operation, instance_id: &str, reason: String) -> HandleError {
    HandleError::Fail {
        reason: reason.clone(),
        failed: Some(OpFailed::new(&op.operation_id, Stage::Cloud.as_str(), reason, kit::now_ms()).of_op(op).on_instance(instance_id)),
    }
}

pub(crate) fn transient(e: impl std::fmt::Display) -> HandleError {
    HandleError::retry(e.to_string(), Duration::from_secs(3))
}

pub(crate) fn park(after: Duration, reason: String) -> HandleError {
    HandleError::Park { reason, after: after.max(Duration::from_millis(10)) }
}

async fn run(ctx: &Arc<Ctx>, op: Operation, replay: bool) -> Result<(), HandleError> {
    let (Ok(id), Ok(sub_id)) = (OpId::parse(&op.operation_id), SubId::parse(&op.sub_id)) else {
        return Err(HandleError::fail("operation id or subId is not a plain token"));
    };
    // One writer per operation: a second delivery (another claim attempt's message, a replay,
    // the reaper) comes back shortly instead of racing a create.
    let Some(_busy) = ctx.try_busy(&id) else {
        return Err(park(Duration::from_secs(2), "operation being handled here".into()));
    };
    let mut rec = ctx.ops.get(&id).map_err(transient)?.unwrap_or_else(|| CloudRecord::new(id.clone(), sub_id));
    let attempt = op.claim_attempt.max(1);
    if !replay && let Some(stored) = rec.operation().map(|o| o.claim_attempt.max(1)) && attempt < stored {
        tracing::info!(attempt, current = stored, "a stale delivery of an older claim attempt; ignored");
        return Ok(());
    }
    if rec.failed {
        if attempt <= rec.failed_attempt.unwrap_or(u32::MAX) {
            // The failure reported may be of this very attempt, seen before its claim: keep the
            // attempt so the reaper can match the failure to it.
            if rec.operation().is_none_or(|o| o.claim_attempt.max(1) < attempt) {
                rec.op_pb = prost::Message::encode_to_vec(&op);
                ctx.ops.put(&id, &rec).await.map_err(transient)?;
            }
            return Ok(());
        }
        // Center requeued the operation and it was claimed again: the new attempt owns the
        // VPS (adopted by name below); the reap planned for the failed attempt is off.
        tracing::info!(attempt, failed_attempt = ?rec.failed_attempt, "a newer claim attempt after a failure; reap cancelled");
        rec.failed = false;
        rec.boot = None;
        rec.create = Default::default();
        rec.reap_at_ms = None;
        rec.reap_pending = None;
        crate::reaper::unlist(ctx, &id);
    }
    // A newer claim attempt (lease expired and re-claimed) replaces the stored operation.
    let op_pb = prost::Message::encode_to_vec(&op);
    let changed = op_pb != rec.op_pb;
    rec.op_pb = op_pb;
    let res = drive(ctx, &op, &mut rec, replay, changed).await;
    budget(ctx, &op, &mut rec, res)
}

/// Counts consecutive transient errors in the record (the parking consumer has no delivery
/// limit) and fails the operation when they reach `PN_MAX_DELIVER`; anything else resets them.
pub(crate) fn budget(ctx: &Ctx, op: &Operation, rec: &mut CloudRecord, res: Result<(), HandleError>) -> Result<(), HandleError> {
    match res {
        Err(HandleError::Retry { reason, after, failed: f }) => {
            rec.transient_failures += 1;
            if let Err(e) = ctx.ops.put_nowait(&rec.operation_id, rec) {
                tracing::warn!(error = %e, "could not record the failed attempt");
            }
            let limit = u32::try_from(ctx.settings.common.max_deliver.max(1)).unwrap_or(u32::MAX);
            if rec.transient_failures >= limit {
                let instance = rec.boot.as_ref().map(|b| b.instance_id.clone()).unwrap_or_default();
                return Err(failed(op, &instance, format!("gave up after {} attempts: {reason}", rec.transient_failures)));
            }
            Err(HandleError::Retry { reason, after, failed: f })
        }
        other => {
            if rec.transient_failures > 0 {
                rec.transient_failures = 0;
                if let Err(e) = ctx.ops.put_nowait(&rec.operation_id, rec) {
                    tracing::warn!(error = %e, "could not reset the attempt count");
                }
            }
            other
        }
    }
}

/// Advances the operation as far as it goes now: publish a recorded outcome, look at a
/// booting instance, serve a pause, probe, create. Ends published, parked, or failed.
pub(crate) async fn drive(ctx: &Arc<Ctx>, op: &Operation, rec: &mut CloudRecord, replay: bool, changed: bool) -> Result<(), HandleError> {
    let id = rec.operation_id.clone();
    if rec.published && !replay
        && let Some(info) = rec.instance.clone() {
            if changed {
                ctx.ops.put(&id, rec).await.map_err(transient)?;
            }
            return publish(ctx, op, rec, &info, false).await;
        }
    if changed {
        ctx.ops.put(&id, rec).await.map_err(transient)?;
    }
    let name = proto::node_name(&op.sub_id);
    // Bounded: each pass either returns or moves the record on (an instance to wait on, a
    // create tried); the create cursor only advances.
    for _ in 0..64 {
        if let Some(w) = rec.boot.clone() {
            match look(ctx, op, rec, w).await? {
                Look::Ready(info) => return finish(ctx, op, rec, info, replay).await,
                Look::Wait(after, why) => return Err(park(after, why)),
                Look::Again => continue,
            }
        }
        if let Some(t) = rec.create.next_create_at_ms {
            let now = kit::now_ms();
            if t > now {
                return Err(park(Duration::from_millis((t - now) as u64), "pausing before the next create (seed 001 §3.f)".into()));
            }
        }
        if let Some((vps, alt)) = probe(ctx, &name).await.map_err(|e| match e {
            ProviderError::Transient(m) => transient(m),
            other => failed(op, "", format!("probing {name}: {other}")),
        })? {
            let adopted = !rec.created.contains(&vps.id);
            tracing::info!(instance = %vps.id, status = %vps.status, adopted, alt, "found {name}; waiting for it");
            if alt && !rec.alt_instances.contains(&vps.id) {
                rec.alt_instances.push(vps.id.clone());
            }
            rec.boot = Some(BootWait {
                instance_id: vps.id.clone(),
                started_at_ms: kit::now_ms(),
                last_status: vps.status.clone(),
                from_create: false,
                adopted,
                alt,
                ..Default::default()
            });
            ctx.ops.put_nowait(&id, rec).map_err(transient)?;
            continue;
        }
        match create_step(ctx, op, rec, &name).await? {
            Created::Boot | Created::Pause => continue,
            Created::Exhausted(reason) => return Err(failed(op, "", reason)),
        }
    }
    Err(transient("the create path made no progress"))
}

async fn finish(ctx: &Ctx, op: &Operation, rec: &mut CloudRecord, info: InstanceInfo, replay: bool) -> Result<(), HandleError> {
    let id = rec.operation_id.clone();
    rec.instance = Some(info.clone());
    rec.boot = None;
    ctx.ops.put(&id, rec).await.map_err(transient)?;
    if !rec.ports_opened {
        open_ports(ctx, rec, &info).await?;
    }
    publish(ctx, op, rec, &info, replay).await?;
    rec.published = true;
    ctx.ops.put(&id, rec).await.map_err(transient)?;
    Ok(())
}

/// Opens `PN_OPEN_PORTS` in the instance's provider firewall before it is handed on (the
/// deployer needs 1022, k2s 443). A provider (or Center) without a firewall API is recorded
/// and warned about: the deployer's outside check keeps 22 open if 1022 stays shut.
async fn open_ports(ctx: &Ctx, rec: &mut CloudRecord, info: &InstanceInfo) -> Result<(), HandleError> {
    if ctx.ports.is_empty() {
        rec.ports_opened = true;
        return Ok(());
    }
    let provider = ctx.provider_for(info.alt);
    match provider.open_ports(&info.id, &ctx.ports).await {
        Ok(PortsOpened::Opened) => {
            let ports: Vec<String> = ctx.ports.iter().map(ToString::to_string).collect();
            tracing::info!(instance = %info.id, ports = %ports.join(","), "ports opened in the provider's firewall");
            metrics::counter!("pn_firewall_opens_total", "result" => "opened").increment(1);
        }
        Ok(PortsOpened::Unsupported(why)) => {
            tracing::warn!(instance = %info.id, %why, "cannot open ports at this provider; the deployer checks the hardened port from outside");
            metrics::counter!("pn_firewall_opens_total", "result" => "unsupported").increment(1);
        }
        Err(ProviderError::Transient(m)) => return Err(transient(format!("opening ports of {}: {m}", info.id))),
        Err(e) => {
            tracing::warn!(instance = %info.id, error = %e, "opening ports failed; the deployer checks the hardened port from outside");
            metrics::counter!("pn_firewall_opens_total", "result" => "failed").increment(1);
        }
    }
    rec.ports_opened = true;
    ctx.ops.put(&rec.operation_id, rec).await.map_err(transient)
}

fn info_of(v: &Vps, adopted: bool, alt: bool) -> InstanceInfo {
    InstanceInfo {
        id: v.id.clone(),
        name: v.name.clone(),
        ipv4: v.ipv4.clone().unwrap_or_default(),
        account: v.account.clone(),
        region: v.region.clone(),
        plan: v.plan.clone(),
        image: v.image.clone(),
        adopted,
        alt,
    }
}

/// The live `pn-<subId>` instance, if any — at the configured provider, then at the alternate
/// one (true: found there); the oldest-listed when (wrongly) several exist.
pub(crate) async fn probe(ctx: &Ctx, name: &str) -> Result<Option<(Vps, bool)>, ProviderError> {
    for (alt, provider) in [(false, Some(ctx.provider())), (true, ctx.providers.alt.clone())] {
        let Some(provider) = provider else { continue };
        let live: Vec<Vps> = provider.find_by_name(name).await?.into_iter().filter(|v| !v.is_gone()).collect();
        if live.len() > 1 {
            tracing::error!(count = live.len(), "{name} exists more than once; adopting the first, leaving the rest for an operator");
        }
        if let Some(v) = live.into_iter().next() {
            return Ok(Some((v, alt)));
        }
    }
    Ok(None)
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

enum Look {
    /// Running with a public IPv4.
    Ready(InstanceInfo),
    /// Not yet: look again after this long.
    Wait(Duration, String),
    /// Our own instance got no IP and was deleted; the create path goes on.
    Again,
}

/// One look at the instance being waited on (what one turn of the old polling loop did).
async fn look(ctx: &Ctx, op: &Operation, rec: &mut CloudRecord, mut w: BootWait) -> Result<Look, HandleError> {
    let s = &ctx.settings;
    let now = kit::now_ms();
    match ctx.provider_for(w.alt).get(&w.instance_id).await {
        Ok(v) if v.is_running() && v.ipv4.is_some() => return Ok(Look::Ready(info_of(&v, w.adopted, w.alt))),
        Ok(v) if v.is_gone() => return Err(wait_error(ctx, op, &w.instance_id, WaitError::Gone)),
        Ok(v) => {
            if v.is_running() {
                let since = *w.running_since_ms.get_or_insert(now);
                if now - since >= s.no_ip_timeout_ms as i64 {
                    if !w.from_create {
                        return Err(wait_error(ctx, op, &w.instance_id, WaitError::NoIp));
                    }
                    // Seed 001 §3.f: no IP → remove our broken VPS, pause, try again/elsewhere.
                    rec.create.reasons.push(format!("{}: instance {} got no public IPv4", w.region, w.instance_id));
                    rec.create.tries_in_region += 1;
                    delete_own(ctx, rec, &w.instance_id).await?;
                    rec.boot = None;
                    ctx.ops.put(&rec.operation_id, rec).await.map_err(transient)?;
                    return Ok(Look::Again);
                }
            }
            w.last_status = v.status;
        }
        Err(e) => tracing::debug!(error = %e, "instance status unavailable; looking again later"),
    }
    if now - w.started_at_ms >= s.boot_timeout_ms as i64 {
        return Err(wait_error(ctx, op, &w.instance_id, WaitError::Timeout(w.last_status)));
    }
    let why = format!("instance {} booting (status {})", w.instance_id, w.last_status);
    let changed = rec.boot.as_ref() != Some(&w);
    rec.boot = Some(w);
    if changed {
        ctx.ops.put_nowait(&rec.operation_id, rec).map_err(transient)?;
    }
    Ok(Look::Wait(Duration::from_millis(s.boot_poll_ms.max(50)), why))
}

enum Created {
    /// An instance was created (or found after a failed create call): wait for it.
    Boot,
    /// A pause is due before the next create.
    Pause,
    /// Every region tried: the reasons.
    Exhausted(String),
}

/// The next create of the seed-001 §3.f path: the cursor's region (a sibling when the
/// preferred one is used up), a pause before any retry or sibling, the intent flushed first.
async fn create_step(ctx: &Ctx, op: &Operation, rec: &mut CloudRecord, name: &str) -> Result<Created, HandleError> {
    let s = &ctx.settings;
    let min_transfer = (op.traffic_total_bytes as f64 * s.transfer_headroom.max(1.0)) as u64;
    let attempts = s.create_attempts_per_region.max(1);
    let families = s.image_families();
    loop {
        let alt = rec.create.alt;
        let provider = ctx.provider_for(alt);
        let regions = if alt { s.alt_regions_for(&op.region) } else { s.regions_for(&op.region) };
        if rec.create.tries_in_region >= attempts {
            rec.create.region_idx += 1;
            rec.create.tries_in_region = 0;
        }
        let Some(region) = regions.get(rec.create.region_idx).cloned() else {
            if !alt && let Some(a) = &ctx.providers.alt {
                // Seed 001 §3.f (C): every sibling region failed — fall through to the
                // alternate provider (after the pause).
                tracing::warn!(alternate = a.name(), "the configured provider failed in every region; trying the alternate provider");
                rec.create.reasons.push(format!("every region of the {} provider failed; trying the alternate provider ({})", provider.name(), a.name()));
                rec.create.alt = true;
                rec.create.region_idx = 0;
                rec.create.tries_in_region = 0;
                ctx.ops.put(&rec.operation_id, rec).await.map_err(transient)?;
                continue;
            }
            let reasons = &rec.create.reasons;
            let reason = if reasons.is_empty() { format!("no provider region for job region {}", op.region) } else { reasons.join("; ") };
            return Ok(Created::Exhausted(reason));
        };
        let choice = match provider.choose_os(&region, min_transfer, &families).await {
            Ok(c) => c,
            Err(ProviderError::Transient(m)) => return Err(transient(m)),
            Err(e) => {
                rec.create.reasons.push(e.to_string());
                rec.create.region_idx += 1;
                rec.create.tries_in_region = 0;
                ctx.ops.put_nowait(&rec.operation_id, rec).map_err(transient)?;
                continue;
            }
        };
        // A retry in this region, or a sibling (or the alternate provider) after a failure,
        // waits the pause first.
        let needs_pause = rec.create.tries_in_region > 0 || ((rec.create.region_idx > 0 || alt) && !rec.create.reasons.is_empty());
        let now = kit::now_ms();
        if needs_pause {
            match rec.create.next_create_at_ms {
                None => {
                    rec.create.next_create_at_ms = Some(now + s.create_retry_pause_ms as i64);
                    ctx.ops.put(&rec.operation_id, rec).await.map_err(transient)?;
                    if s.create_retry_pause_ms > 0 {
                        tracing::info!(region = %region, pause_ms = s.create_retry_pause_ms, "pausing before the next create");
                        return Ok(Created::Pause);
                    }
                }
                Some(t) if t > now => return Ok(Created::Pause),
                Some(_) => {}
            }
        }
        if rec.create_started_at_ms.is_none() {
            rec.create_started_at_ms = Some(now);
        }
        rec.create.next_create_at_ms = None;
        // The intent is durable before the call: a crash after it makes any pn-<subId> ours.
        ctx.ops.put(&rec.operation_id, rec).await.map_err(transient)?;
        let vps = match provider.create(&choice, name).await {
            Ok(v) => v,
            Err(e) => {
                // The create may have happened despite the error: probe before anything else.
                if let Ok(Some((v, _))) = probe(ctx, name).await {
                    v
                } else {
                    tracing::warn!(region = %region, error = %e, "create failed");
                    rec.create.reasons.push(format!("{region}: {e}"));
                    if matches!(e, ProviderError::Transient(_)) {
                        rec.create.tries_in_region += 1;
                    } else {
                        rec.create.region_idx += 1;
                        rec.create.tries_in_region = 0;
                    }
                    ctx.ops.put(&rec.operation_id, rec).await.map_err(transient)?;
                    continue;
                }
            }
        };
        if !rec.created.contains(&vps.id) {
            rec.created.push(vps.id.clone());
        }
        if alt && !rec.alt_instances.contains(&vps.id) {
            rec.alt_instances.push(vps.id.clone());
        }
        rec.boot = Some(BootWait {
            instance_id: vps.id.clone(),
            started_at_ms: kit::now_ms(),
            last_status: vps.status.clone(),
            region: region.clone(),
            from_create: true,
            adopted: false,
            alt,
            ..Default::default()
        });
        ctx.ops.put(&rec.operation_id, rec).await.map_err(transient)?;
        tracing::info!(instance = %vps.id, region = %region, plan = %choice.plan, image = %choice.image, "created {name}");
        return Ok(Created::Boot);
    }
}

pub(crate) async fn delete_own(ctx: &Ctx, rec: &mut CloudRecord, id: &str) -> Result<(), HandleError> {
    match ctx.provider_of(rec, id).delete(id).await {
        Ok(()) | Err(ProviderError::NotFound(_)) => {}
        Err(e) => return Err(transient(e)),
    }
    rec.deleted.push(id.to_string());
    ctx.ops.put(&rec.operation_id, rec).await.map_err(transient)?;
    Ok(())
}

async fn publish(ctx: &Ctx, op: &Operation, rec: &CloudRecord, info: &InstanceInfo, replay: bool) -> Result<(), HandleError> {
    let mut meta = Meta::outcome(&op.operation_id, &op.sub_id, Stage::Cloud, op.claim_attempt.max(1));
    if !rec.rebuilt.is_empty() {
        // Another instance for the same attempt (a broken one was replaced): a new message.
        meta.msg_id = subjects::rebuilt_msg_id(&meta.msg_id, rec.rebuilt.len());
    }
    if replay {
        meta.msg_id = subjects::replay_msg_id(&meta.msg_id, kit::now_ms());
    }
    let ev = InstanceReady {
        op: Some(op.clone()),
        instance: Some(proto::Instance {
            instance_id: info.id.clone(),
            name: info.name.clone(),
            ipv4: info.ipv4.clone(),
            provider: ctx.provider_for(info.alt).name().to_string(),
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
