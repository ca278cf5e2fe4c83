//! The poller (runbook step 1: list queued provisions, lease one, on conflict move on) and the
//! lease keeper. The poller claims only within the claim budget (`Settings::max_claimed`).
//!
//! Leases: an in-flight operation's lease is renewed every third of it with `in_progress`,
//! and the answer checked for the extension. At a Center that does not extend a lease on
//! progress (the answer shows the old end), it is renewed by a claim of its holder instead —
//! before it runs out, so no deploy goes on under a lease Pnp has lost. If the renewal is
//! refused, Center is asked where the operation stands: terminal → left to its outcome;
//! requeued (the lease ran out) → forgotten here, so the poller claims it again as claim
//! attempt n+1 with a new token (the old token is revoked: Center refuses a node that
//! registers with it); held by another holder → not ours any more; still ours → kept (logged
//! and counted: the lease may run out). A renewal answered with a new identity (a Center
//! that issues a new token on a claim) is claim attempt n+1 at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use kit::bus::Meta;
use kit::center::{CenterError, Claimed, NodeOperation, OpFilter};
use proto::{Body, OpClaimed, OpId, Operation, Stage, SubId, subjects};
use tokio_util::sync::CancellationToken;

use crate::{Ctx, OpRecord, jitter};

pub async fn poll_loop(ctx: Arc<Ctx>, token: CancellationToken) {
    let base = Duration::from_millis(ctx.settings.poll_interval_ms.max(50));
    loop {
        match poll_once(&ctx).await {
            Ok(n) if n > 0 => tracing::info!(claimed = n, "claimed operations"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "poll failed"),
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(jitter(base)) => {}
        }
    }
}

/// One pass over the queue. Returns how many operations this replica claimed: at most the
/// claim budget minus the operations it holds in flight (those only go down meanwhile).
pub async fn poll_once(ctx: &Arc<Ctx>) -> Result<usize, CenterError> {
    let budget = ctx.settings.claim_budget();
    let held = ctx.in_flight();
    let room = budget.saturating_sub(held);
    if room == 0 {
        tracing::debug!(held, budget, "claim budget used up; queued operations stay at Center");
        return Ok(0);
    }
    let filter = OpFilter { action: Some("provision".into()), status: Some("queued".into()), id: None };
    let queued = ctx.rt.center.list_node_operations(&filter).await?;
    let slots = Arc::new(AtomicUsize::new(room));
    let results = futures::stream::iter(queued)
        .map(|op| {
            let ctx = ctx.clone();
            let slots = slots.clone();
            async move {
                // A slot is taken before the claim and given back unless a lease was taken.
                if slots.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_err() {
                    return false;
                }
                // The claim starts the operation's trace (kit::trace): its id is the operation's.
                let span = kit::trace::operation_span("claim", "claim", &op.id);
                let leased = tracing::Instrument::instrument(claim_one(&ctx, op), span).await;
                if !leased {
                    slots.fetch_add(1, Ordering::SeqCst);
                }
                leased
            }
        })
        .buffer_unordered(ctx.settings.claim_concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
    Ok(results.into_iter().filter(|r| *r).count())
}

/// Claims one queued operation. True when Center leased it to this replica.
async fn claim_one(ctx: &Arc<Ctx>, op: NodeOperation) -> bool {
    let (Ok(id), Ok(_)) = (OpId::parse(&op.id), SubId::parse(&op.sub_id)) else {
        tracing::error!(operation = %op.id.chars().take(64).collect::<String>(), "queued operation has an id or subId unfit for a subject; skipped");
        return false;
    };
    let prior = match ctx.ops.get(id.as_str()) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(op = %op.id, error = %e, "state read failed");
            return false;
        }
    };
    // Terminal here stays terminal — except a lease lost to another holder: requeued again,
    // the operation may be claimed anew (the next claim attempt adopts the VPS by name).
    if prior.as_ref().is_some_and(|p| p.terminal.as_deref().is_some_and(|t| t != crate::record::LOST)) {
        return false;
    }
    let claimed = match ctx.rt.center.claim_node_operation(id.as_str(), &ctx.holder, ctx.settings.lease_seconds).await {
        Ok(c) => c,
        Err(e) if e.is_conflict() => {
            tracing::debug!(op = %op.id, "someone else took it; moving on");
            return false;
        }
        Err(e) => {
            tracing::warn!(op = %op.id, error = %e, "claim failed");
            return false;
        }
    };
    take_claim(ctx, id, &op, claimed, prior.as_ref()).await
}

/// Records a claim Center granted with an identity (its token sealed at once), marks the
/// operation held and publishes `pn.op.claimed` as the next claim attempt after `prior`'s.
/// `op` is the operation as listed (fallbacks for fields the claim's answer leaves empty), `id`
/// its id, parsed. True when the operation is held (a lease was taken).
async fn take_claim(ctx: &Arc<Ctx>, id: OpId, op: &NodeOperation, claimed: Claimed, prior: Option<&OpRecord>) -> bool {
    let lease_expires_ms = claimed.operation.lease_expires_at.as_deref().and_then(parse_rfc3339_ms);
    let Some(identity) = claimed.identity else {
        // Held at Center until the lease runs out: it counts against the budget meanwhile.
        tracing::error!(op = %op.id, "claim answered without an identity; cannot provision");
        return true;
    };
    // Sealed at once: from here on the token exists only sealed (and in `identity`, dropped soon).
    let sealed = ctx.seal.seal_str(&identity.claim_token);
    let attempt = prior.map(|p| p.claim_attempt + 1).unwrap_or(1);
    let o = &claimed.operation;
    let params = if o.params.region.is_empty() { &op.params } else { &o.params };
    let pb = Operation {
        operation_id: id.to_string(),
        sub_id: if o.sub_id.is_empty() { op.sub_id.clone() } else { o.sub_id.clone() },
        region: params.region.clone(),
        traffic_total_bytes: params.traffic_total_bytes,
        ip_type: params.ip_type.clone(),
        center_url: identity.center_url.clone(),
        domain: identity.domain.clone(),
        sealed_claim_token: sealed,
        holder: ctx.holder.clone(),
        claimed_at_ms: kit::now_ms(),
        claim_attempt: attempt,
        queued_at_ms: op.created_at.as_deref().and_then(parse_rfc3339_ms).unwrap_or(0),
    };
    let rec = OpRecord {
        holder: ctx.holder.clone(),
        claim_attempt: attempt,
        lease_seconds: ctx.settings.lease_seconds,
        op_pb: prost::Message::encode_to_vec(&pb),
        ..OpRecord::new(id.clone(), pb.sub_id.clone())
    };
    if let Err(e) = ctx.ops.put(id.as_str(), &rec).await {
        tracing::error!(op = %id, error = %e, "could not record the claim; the lease will expire and Center requeues it");
        return true;
    }
    ctx.hold(&id, lease_expires_ms);
    publish_claimed(ctx, rec).await;
    true
}

/// Publishes `pn.op.claimed` for a recorded claim and marks it published.
pub async fn publish_claimed(ctx: &Ctx, mut rec: OpRecord) {
    let op: Operation = match prost::Message::decode(rec.op_pb.as_slice()) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(op = %rec.operation_id, error = %e, "stored operation undecodable");
            return;
        }
    };
    let meta = Meta::outcome(rec.operation_id.as_str(), &rec.sub_id, Stage::Claim, rec.claim_attempt);
    let subject = subjects::op_event(subjects::CLAIMED, rec.operation_id.as_str());
    match ctx.rt.bus.publish(subject, Body::Claimed(OpClaimed { op: Some(op) }), &meta).await {
        Ok(()) => {
            rec.published = true;
            if rec.holder == ctx.holder && rec.terminal.is_none() {
                // A claim republished after a restart is in flight too (its lease renewed).
                let known = ctx.active.lock().map(|a| a.contains_key(&rec.operation_id)).unwrap_or(true);
                if !known {
                    ctx.hold(&rec.operation_id, None);
                }
            }
            if let Err(e) = ctx.ops.put(rec.operation_id.as_str(), &rec).await {
                tracing::warn!(op = %rec.operation_id, error = %e, "could not mark published (a restart republishes; dedup absorbs it)");
            }
            tracing::info!(op = %rec.operation_id, sub = %rec.sub_id, attempt = rec.claim_attempt, "claimed");
        }
        Err(e) => tracing::error!(op = %rec.operation_id, error = %e, "publish pn.op.claimed failed; will retry at next start or poll"),
    }
}

pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    Some((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

/// Renews the lease of every in-flight operation this replica holds, every third of the lease.
pub async fn lease_keeper(ctx: Arc<Ctx>, token: CancellationToken) {
    let lease_ms = i64::from(ctx.settings.lease_seconds.max(3)) * 1000;
    let every = Duration::from_millis((lease_ms / 6).clamp(500, 60_000) as u64);
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let now = kit::now_ms();
        let due: Vec<OpId> = match ctx.active.lock() {
            Ok(a) => a.iter().filter(|(_, h)| now - h.renewed_ms >= lease_ms / 3).map(|(id, _)| id.clone()).collect(),
            Err(_) => continue,
        };
        ctx.in_flight();
        for id in due {
            // A renewal is part of the operation's trace (kit::trace).
            tracing::Instrument::instrument(renew(&ctx, &id), kit::trace::operation_span("renew", "claim", id.as_str())).await;
        }
    }
}

async fn renew(ctx: &Arc<Ctx>, id: &OpId) {
    let Ok(Some(rec)) = ctx.ops.get(id.as_str()) else {
        ctx.forget(id);
        return;
    };
    if !rec.is_active() {
        ctx.forget(id);
        return;
    }
    let lease_ms = i64::from(ctx.settings.lease_seconds.max(1)) * 1000;
    let before = ctx.active.lock().ok().and_then(|a| a.get(id).and_then(|h| h.lease_expires_ms));
    if ctx.progress_extends.load(std::sync::atomic::Ordering::Relaxed) {
        let result = rec.progress_result();
        let asked_at = kit::now_ms();
        match ctx.rt.center.update_node_operation(id.as_str(), &rec.holder, "in_progress", result, None).await {
            Ok(op) => {
                let after = op.lease_expires_at.as_deref().and_then(parse_rfc3339_ms);
                match lease_extended(before, after, asked_at, lease_ms) {
                    Ok(()) => {
                        metrics::counter!("pn_lease_renewals_total", "how" => "progress").increment(1);
                        ctx.hold(id, after);
                        return;
                    }
                    Err(why) if after.is_none() => {
                        // Center does not say where the lease ends: nothing shows progress does
                        // not extend it; keep renewing this way (and say so).
                        metrics::counter!("pn_lease_not_extended_total").increment(1);
                        tracing::warn!(op = %id, why, "lease renewal accepted; Center does not show the lease's end, so its extension is unknown");
                        ctx.hold(id, None);
                        return;
                    }
                    Err(why) => {
                        metrics::counter!("pn_lease_not_extended_total").increment(1);
                        tracing::warn!(op = %id, why, before = ?before, answered = ?op.lease_expires_at, asked_at_ms = asked_at, lease_ms,
                            "lease renewal by in_progress accepted but the lease was not extended; renewing by claim");
                        ctx.progress_does_not_extend(id);
                    }
                }
            }
            Err(e @ (CenterError::Conflict { .. } | CenterError::Rejected { .. })) => {
                renewal_refused(ctx, id, rec, &e).await;
                return;
            }
            // Still due: the next round of the keeper tries again; a renewal never fails the operation.
            Err(e) => {
                tracing::warn!(op = %id, error = %e, "lease renewal failed; will retry");
                return;
            }
        }
    }
    renew_by_claim(ctx, id, rec, before, lease_ms).await;
}

/// Renews `id`'s lease with a claim of its holder (a Center where progress does not extend a lease).
async fn renew_by_claim(ctx: &Arc<Ctx>, id: &OpId, rec: OpRecord, before: Option<i64>, lease_ms: i64) {
    let asked_at = kit::now_ms();
    match ctx.rt.center.claim_node_operation(id.as_str(), &rec.holder, ctx.settings.lease_seconds).await {
        Ok(c) if c.identity.is_some() => {
            // A new token: the old one is revoked (the lease had run out and this was a new
            // claim, or this Center issues one per claim). The pipeline goes on as the next
            // claim attempt, with the new token; the old attempt's node is refused by Center.
            metrics::counter!("pn_lease_lost_total").increment(1);
            tracing::warn!(op = %id, attempt = rec.claim_attempt + 1, "the renewal claim issued a new token; the operation goes on as the next claim attempt");
            let listed = c.operation.clone();
            take_claim(ctx, id.clone(), &listed, c, Some(&rec)).await;
        }
        Ok(c) => {
            let after = c.operation.lease_expires_at.as_deref().and_then(parse_rfc3339_ms);
            if let Err(why) = lease_extended(before, after, asked_at, lease_ms) {
                metrics::counter!("pn_lease_not_extended_total").increment(1);
                tracing::warn!(op = %id, why, before = ?before, answered = ?c.operation.lease_expires_at, "lease renewal by claim accepted but the lease was not extended; it may run out");
            } else {
                metrics::counter!("pn_lease_renewals_total", "how" => "claim").increment(1);
            }
            ctx.hold(id, after);
        }
        Err(e @ (CenterError::Conflict { .. } | CenterError::Rejected { .. })) => renewal_refused(ctx, id, rec, &e).await,
        Err(e) => tracing::warn!(op = %id, error = %e, "lease renewal by claim failed; will retry"),
    }
}

/// Center refused a renewal of `id`: asks where the operation stands and acts on it.
async fn renewal_refused(ctx: &Arc<Ctx>, id: &OpId, mut rec: OpRecord, e: &CenterError) {
    let found = kit::world::find_operation(ctx.rt.center.as_ref(), id.as_str(), &kit::world::STATUS_ORDER).await;
    match found {
        Ok(Some(op)) if matches!(op.status.as_str(), "done" | "failed") => {
            // Terminal at Center (done by the node, or failed by its sweep).
            tracing::info!(op = %id, status = %op.status, reason = %e, "lease no longer renewable; operation left to its outcome");
            rec.terminal = Some("center".into());
            let _ = ctx.ops.put(id.as_str(), &rec).await;
            ctx.forget(id);
        }
        Ok(Some(op)) if op.status == "queued" => {
            // The lease ran out and Center requeued it (the token is revoked): the poller
            // claims it again as the next attempt.
            metrics::counter!("pn_lease_lost_total").increment(1);
            tracing::warn!(op = %id, attempt = rec.claim_attempt, reason = %e, "lease lost: Center requeued the operation; it will be claimed again as the next attempt");
            ctx.forget(id);
        }
        Ok(Some(op)) if op.holder.as_deref().is_some_and(|h| h != rec.holder) => {
            metrics::counter!("pn_lease_lost_total").increment(1);
            tracing::warn!(op = %id, status = %op.status, reason = %e, "lease lost: another holder holds the operation now; no longer ours");
            rec.terminal = Some(crate::record::LOST.into());
            let _ = ctx.ops.put(id.as_str(), &rec).await;
            ctx.forget(id);
        }
        Ok(Some(op)) => {
            metrics::counter!("pn_lease_not_extended_total").increment(1);
            tracing::error!(op = %id, status = %op.status, lease_expires_at = ?op.lease_expires_at, reason = %e,
                "Center holds the operation for us but refuses to renew its lease; it may run out (then it is claimed again)");
        }
        Ok(None) => tracing::warn!(op = %id, reason = %e, "lease renewal refused and Center does not list the operation; will look again"),
        Err(le) => tracing::warn!(op = %id, reason = %e, error = %le, "lease renewal refused and Center could not be asked where the operation stands; will look again"),
    }
}

/// Whether a renewal's answer shows the lease extended: Center answered the lease's end
/// (`after`), later than the end it answered before (`before`, when known), and at least half
/// a lease beyond the moment we asked (`asked_at_ms`; half, so a skewed clock at Center does
/// not cry wolf). `Err` says what is wrong.
pub fn lease_extended(before: Option<i64>, after: Option<i64>, asked_at_ms: i64, lease_ms: i64) -> Result<(), &'static str> {
    let Some(after) = after else { return Err("the answer has no leaseExpiresAt") };
    if before.is_some_and(|b| after <= b) {
        return Err("leaseExpiresAt did not move");
    }
    if after < asked_at_ms.saturating_add(lease_ms / 2) {
        return Err("leaseExpiresAt is less than half a lease away");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renewal_extends_the_lease_only_when_the_answer_shows_it() {
        let lease = 600_000;
        let now = 1_000_000;
        // The simulator's answer: now + lease, later than before.
        assert_eq!(lease_extended(Some(now + 400_000), Some(now + lease), now, lease), Ok(()));
        // First renewal after a restart: nothing known before.
        assert_eq!(lease_extended(None, Some(now + lease + 50), now, lease), Ok(()));
        // Center's clock a minute behind ours still counts as extended.
        assert_eq!(lease_extended(Some(now + 300_000), Some(now + lease - 60_000), now, lease), Ok(()));
        assert!(lease_extended(Some(now + 400_000), None, now, lease).is_err(), "no leaseExpiresAt");
        assert!(lease_extended(Some(now + 400_000), Some(now + 400_000), now, lease).is_err(), "unchanged");
        assert!(lease_extended(Some(now + 400_000), Some(now + 399_000), now, lease).is_err(), "earlier");
        assert!(lease_extended(None, Some(now + 10_000), now, lease).is_err(), "far short of a lease");
        assert!(lease_extended(Some(now + 5_000), Some(now + 10_000), now, lease).is_err(), "moved, but not by a lease");
    }
}
