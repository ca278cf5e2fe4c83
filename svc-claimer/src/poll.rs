//! The poller (runbook step 1: list queued provisions, lease one, on conflict move on) and the
//! lease keeper (an in-flight operation's lease is renewed with `in_progress`).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kit::bus::Meta;
use kit::center::{CenterError, NodeOperation, OpFilter};
use proto::{Body, OpClaimed, Operation, Stage, subjects};
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

/// One pass over the queue. Returns how many operations this replica claimed.
pub async fn poll_once(ctx: &Arc<Ctx>) -> Result<usize, CenterError> {
    let filter = OpFilter { action: Some("provision".into()), status: Some("queued".into()), id: None };
    let queued = ctx.rt.center.list_node_operations(&filter).await?;
    let results = futures::stream::iter(queued)
        .map(|op| {
            let ctx = ctx.clone();
            async move { claim_one(&ctx, op).await }
        })
        .buffer_unordered(ctx.settings.claim_concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
    Ok(results.into_iter().filter(|r| *r).count())
}

async fn claim_one(ctx: &Arc<Ctx>, op: NodeOperation) -> bool {
    if !subjects::is_token(&op.id) || !subjects::is_token(&op.sub_id) {
        tracing::error!(operation = %op.id.chars().take(64).collect::<String>(), "queued operation has an id or subId unfit for a subject; skipped");
        return false;
    }
    let prior = match ctx.ops.get(&op.id) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(op = %op.id, error = %e, "state read failed");
            return false;
        }
    };
    if prior.as_ref().is_some_and(|p| p.terminal.is_some()) {
        return false;
    }
    let claimed = match ctx.rt.center.claim_node_operation(&op.id, &ctx.holder, ctx.settings.lease_seconds).await {
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
    let Some(identity) = claimed.identity else {
        tracing::error!(op = %op.id, "claim answered without an identity; cannot provision");
        return false;
    };
    // Sealed at once: from here on the token exists only sealed (and in `identity`, dropped soon).
    let sealed = ctx.seal.seal_str(&identity.claim_token);
    let attempt = prior.as_ref().map(|p| p.claim_attempt + 1).unwrap_or(1);
    let o = &claimed.operation;
    let params = if o.params.region.is_empty() { &op.params } else { &o.params };
    let pb = Operation {
        operation_id: op.id.clone(),
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
        operation_id: op.id.clone(),
        sub_id: pb.sub_id.clone(),
        holder: ctx.holder.clone(),
        claim_attempt: attempt,
        lease_seconds: ctx.settings.lease_seconds,
        op_pb: prost::Message::encode_to_vec(&pb),
        ..Default::default()
    };
    if let Err(e) = ctx.ops.put(&op.id, &rec).await {
        tracing::error!(op = %op.id, error = %e, "could not record the claim; the lease will expire and Center requeues it");
        return false;
    }
    if let Ok(mut a) = ctx.active.lock() {
        a.insert(op.id.clone(), kit::now_ms());
    }
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
    let meta = Meta::outcome(&rec.operation_id, &rec.sub_id, Stage::Claim, rec.claim_attempt);
    let subject = subjects::op_event(subjects::CLAIMED, &rec.operation_id);
    match ctx.rt.bus.publish(subject, Body::Claimed(OpClaimed { op: Some(op) }), &meta).await {
        Ok(()) => {
            rec.published = true;
            if let Err(e) = ctx.ops.put(&rec.operation_id, &rec).await {
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
        let due: Vec<String> = match ctx.active.lock() {
            Ok(a) => a.iter().filter(|(_, last)| now - **last >= lease_ms / 3).map(|(id, _)| id.clone()).collect(),
            Err(_) => continue,
        };
        for id in due {
            renew(&ctx, &id).await;
        }
    }
}

async fn renew(ctx: &Ctx, id: &str) {
    let Ok(Some(mut rec)) = ctx.ops.get(id) else {
        if let Ok(mut a) = ctx.active.lock() {
            a.remove(id);
        }
        return;
    };
    if !rec.is_active() {
        if let Ok(mut a) = ctx.active.lock() {
            a.remove(id);
        }
        return;
    }
    let result = crate::handlers::progress_result(&rec);
    match ctx.rt.center.update_node_operation(id, &rec.holder, "in_progress", result, None).await {
        Ok(_) => {
            if let Ok(mut a) = ctx.active.lock() {
                a.insert(id.to_string(), kit::now_ms());
            }
        }
        Err(e) if matches!(e, CenterError::Conflict { .. } | CenterError::Rejected { .. }) => {
            // Terminal at Center (done by the node, or failed by its sweep) or no longer ours.
            tracing::info!(op = %id, reason = %e, "lease no longer renewable; operation left to its outcome");
            rec.terminal = Some("center".into());
            let _ = ctx.ops.put(id, &rec).await;
            if let Ok(mut a) = ctx.active.lock() {
                a.remove(id);
            }
        }
        Err(e) => tracing::warn!(op = %id, error = %e, "lease renewal failed; will retry"),
    }
}
