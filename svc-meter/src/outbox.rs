//! The two background tasks that carry the ledger's news out, never on a report's critical path:
//!
//! - `usage_loop`: `meter.usage.<node>` (UsageRecorded). A node's first non-zero usage goes out
//!   at once (the verifier waits for it); later ones are coalesced to at most one per node per
//!   `usage_interval_ms`, carrying the summed delta. The ledger is the record, the stream is news:
//!   a delta still pending at a crash is not re-sent (the next message's `used_bytes` is exact).
//! - `quota_loop`: `meter.quota.<node>` (QuotaChanged, msg id `<node>.quota.<seq>`) and Center's
//!   `update_node(hidden)`. Both intents are in the ledger (`published_quota_seq < quota_seq`,
//!   `hidden_synced != (state == cutoff)`) and retried until delivered, across restarts. A
//!   Center without the `update_node` tool gets the hide reported instead (a warning and
//!   `pn_meter_hide_unsupported_total`) and asked again only every 10 minutes; the meter's
//!   own admission (`/v1/admission`, 402 at cutoff) does not depend on it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kit::bus::{Bus, Meta};
use kit::center::Center;
use proto::{Body, QuotaChanged, Stage, UsageRecorded, subjects};
use tokio_util::sync::CancellationToken;

use crate::ledger::QuotaChange;
use crate::meter::Meter;

/// Publishes in flight at once (JetStream acks are awaited concurrently, not one by one).
const PUBLISH_CONCURRENCY: usize = 256;
/// Center calls in flight at once.
const CENTER_CONCURRENCY: usize = 16;
/// How often every node is re-checked for undelivered intents (a missed wake-up costs this).
const FULL_SCAN_EVERY: Duration = Duration::from_secs(30);
const QUOTA_TICK: Duration = Duration::from_millis(500);
const MAX_HIDE_BACKOFF: Duration = Duration::from_secs(60);
/// How long a node's hide/show waits before asking again when Center has no `update_node`
/// tool (it may be deployed later): slow, never a hot loop.
const UNSUPPORTED_RETRY: Duration = Duration::from_secs(600);

struct UsageMsg {
    node: String,
    operation_id: String,
    sub_id: String,
    delta: u64,
    used: u64,
    sold: u64,
    reports: u64,
    first: bool,
}

/// Runs until `shutdown`, then publishes what is pending once more (bounded) and returns.
pub async fn usage_loop(meter: Arc<Meter>, bus: Bus, shutdown: CancellationToken) {
    let interval = meter.settings().usage_interval();
    let tick = (interval / 4).clamp(Duration::from_millis(10), Duration::from_millis(500));
    loop {
        let last = tokio::select! {
            _ = shutdown.cancelled() => true,
            _ = meter.outbox.usage_wake.notified() => false,
            _ = tokio::time::sleep(tick) => false,
        };
        if last {
            let _ = tokio::time::timeout(Duration::from_secs(5), usage_round(&meter, &bus, interval, true)).await;
            break;
        }
        usage_round(&meter, &bus, interval, false).await;
    }
}

async fn usage_round(meter: &Meter, bus: &Bus, interval: Duration, final_round: bool) {
    let names = meter.outbox.take_usage();
    if names.is_empty() {
        return;
    }
    let now = Instant::now();
    let mut msgs = Vec::new();
    for name in names {
        let Some(slot) = meter.slot(&name) else { continue };
        // A report holds the lock only for microseconds; never wait behind one here.
        let Ok(mut st) = slot.st.try_lock() else {
            meter.outbox.usage_dirty(&name, false);
            continue;
        };
        if st.pending_delta == 0 {
            continue;
        }
        let first = !st.ledger.usage_announced;
        let due = first || final_round || st.last_usage_pub.is_none_or(|t| now.saturating_duration_since(t) >= interval);
        if !due {
            drop(st);
            meter.outbox.usage_dirty(&name, false);
            continue;
        }
        let l = &st.ledger;
        msgs.push(UsageMsg {
            node: name.clone(),
            operation_id: l.operation_id.clone(),
            sub_id: l.sub_id.clone(),
            delta: st.pending_delta,
            used: l.usage.used_bytes,
            sold: l.sold_bytes,
            reports: l.usage.reports,
            first,
        });
        st.pending_delta = 0;
        st.last_usage_pub = Some(now);
    }
    if msgs.is_empty() {
        return;
    }
    let results: Vec<(UsageMsg, bool)> = futures::stream::iter(msgs)
        .map(|m| async move {
            let ok = match publish_usage(bus, &m).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(node = %m.node, error = %e, "usage not published; will retry");
                    false
                }
            };
            (m, ok)
        })
        .buffer_unordered(PUBLISH_CONCURRENCY)
        .collect()
        .await;
    let mut wrote = false;
    for (m, ok) in results {
        let Some(slot) = meter.slot(&m.node) else { continue };
        let mut st = slot.st.lock().await;
        if ok {
            metrics::counter!("pn_meter_usage_published_total").increment(1);
            if m.first && !st.ledger.usage_announced {
                st.ledger.usage_announced = true;
                match meter.table.put_nowait(&m.node, &st.ledger) {
                    Ok(()) => wrote = true,
                    Err(e) => tracing::error!(node = %m.node, error = %e, "could not record the first usage as published"),
                }
                tracing::info!(node = %m.node, used = m.used, "first usage published");
            }
        } else {
            st.pending_delta = st.pending_delta.saturating_add(m.delta);
            if m.first {
                // The verifier waits for this one: retry at the next tick, not the next interval.
                st.last_usage_pub = None;
            }
            drop(st);
            meter.outbox.usage_dirty(&m.node, false);
        }
    }
    if wrote && let Err(e) = meter.store.flush().await {
        tracing::error!(error = %e, "ledger flush failed after publishing usage");
    }
}

async fn publish_usage(bus: &Bus, m: &UsageMsg) -> Result<(), kit::bus::BusError> {
    let meta = Meta {
        operation_id: m.operation_id.clone(),
        sub_id: m.sub_id.clone(),
        stage: Stage::Meter,
        // Unique per distinct message: `reports` only grows, and a retry of the same message
        // keeps its id (deduplicated by JetStream if the first attempt did land).
        msg_id: proto::subjects::usage_msg_id(&m.node, m.reports),
    };
    let body = Body::Usage(UsageRecorded {
        node: m.node.clone(),
        delta_bytes: m.delta,
        used_bytes: m.used,
        sold_bytes: m.sold,
        reports: m.reports,
        at_ms: kit::now_ms(),
    });
    bus.publish(subjects::meter_usage(&m.node), body, &meta).await
}

/// Runs until `shutdown`. Undelivered intents stay in the ledger for the next start.
pub async fn quota_loop(meter: Arc<Meter>, bus: Bus, center: Arc<dyn Center>, shutdown: CancellationToken) {
    let mut last_scan = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = meter.outbox.quota_wake.notified() => {},
            _ = tokio::time::sleep(QUOTA_TICK) => {},
        }
        if last_scan.elapsed() >= FULL_SCAN_EVERY {
            last_scan = Instant::now();
            for slot in meter.slots() {
                if let Ok(st) = slot.st.try_lock()
                    && st.ledger.has_outbox_work()
                {
                    meter.outbox.quota_dirty(&slot.name);
                }
            }
        }
        let names = meter.outbox.take_quota();
        if names.is_empty() {
            continue;
        }
        let work = futures::stream::iter(names)
            .map(|name| {
                let (meter, bus, center) = (&meter, &bus, center.clone());
                async move { sync_node(meter, bus, center.as_ref(), name).await }
            })
            .buffer_unordered(CENTER_CONCURRENCY);
        let results: Vec<(String, bool, bool)> = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = work.collect() => r,
        };
        let mut wrote = false;
        for (name, remaining, w) in results {
            wrote |= w;
            if remaining {
                // Not re-notified: the next tick (or the node's back-off) retries it.
                meter.outbox.requeue_quota(&name);
            }
        }
        if wrote && let Err(e) = meter.store.flush().await {
            tracing::error!(error = %e, "ledger flush failed after delivering quota intents");
        }
    }
}

/// Delivers one node's pending quota events and hide/show. Returns (node, work remains, wrote).
async fn sync_node(meter: &Meter, bus: &Bus, center: &dyn Center, name: String) -> (String, bool, bool) {
    let Some(slot) = meter.slot(&name) else { return (name, false, false) };
    let (changes, op, sub, want_hidden, synced, may_call) = {
        let st = slot.st.lock().await;
        let l = &st.ledger;
        let may_call = st.hide_retry_at.is_none_or(|t| Instant::now() >= t);
        (l.unpublished_changes(), l.operation_id.clone(), l.sub_id.clone(), l.hidden_wanted(), l.hidden_synced, may_call)
    };
    let mut wrote = false;

    let mut published = 0u64;
    for c in &changes {
        match publish_quota(bus, &name, c, &op, &sub).await {
            Ok(()) => published = c.seq,
            Err(e) => {
                tracing::warn!(node = %name, seq = c.seq, error = %e, "quota change not published; will retry");
                break;
            }
        }
    }
    if published > 0 {
        let mut st = slot.st.lock().await;
        if published > st.ledger.published_quota_seq {
            st.ledger.published_quota_seq = published;
            wrote |= put(meter, &name, &st.ledger);
        }
    }

    if want_hidden != synced && may_call {
        match center.update_node(&name, want_hidden).await {
            Ok(_) => {
                let mut st = slot.st.lock().await;
                st.ledger.hidden_synced = want_hidden;
                st.hide_failures = 0;
                st.hide_retry_at = None;
                wrote |= put(meter, &name, &st.ledger);
                tracing::info!(node = %name, hidden = want_hidden, "Center updated the node's visibility");
            }
            Err(e) if e.is_unsupported() => {
                // Center has no update_node: the node stays listed there (Center's own cut-off
                // at ≥ 95 % still hides it), and the meter's /v1/admission keeps answering 402.
                // Reported, kept in the ledger, asked again only after a long pause.
                let mut st = slot.st.lock().await;
                st.hide_failures = st.hide_failures.saturating_add(1);
                st.hide_retry_at = Some(Instant::now() + UNSUPPORTED_RETRY);
                metrics::counter!("pn_meter_hide_unsupported_total").increment(1);
                tracing::warn!(node = %name, hidden = want_hidden, error = %e, retry_in_ms = UNSUPPORTED_RETRY.as_millis() as u64,
                    "Center has no update_node tool: the node's visibility at Center is not changed (the meter's admission still answers 402 over quota)");
            }
            Err(e) => {
                let mut st = slot.st.lock().await;
                st.hide_failures = st.hide_failures.saturating_add(1);
                let backoff = Duration::from_millis(500u64.saturating_mul(1 << st.hide_failures.min(8))).min(MAX_HIDE_BACKOFF);
                st.hide_retry_at = Some(Instant::now() + backoff);
                tracing::warn!(node = %name, hidden = want_hidden, error = %e, retry_in_ms = backoff.as_millis() as u64, "Center update_node failed; will retry");
            }
        }
    }
    let remaining = slot.st.lock().await.ledger.has_outbox_work();
    (name, remaining, wrote)
}

fn put(meter: &Meter, name: &str, l: &crate::ledger::NodeLedger) -> bool {
    match meter.table.put_nowait(name, l) {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(node = %name, error = %e, "ledger write failed");
            false
        }
    }
}

async fn publish_quota(bus: &Bus, node: &str, c: &QuotaChange, op: &str, sub: &str) -> Result<(), kit::bus::BusError> {
    let meta = Meta { operation_id: op.to_string(), sub_id: sub.to_string(), stage: Stage::Meter, msg_id: proto::subjects::quota_msg_id(node, c.seq) };
    let body = Body::Quota(QuotaChanged {
        node: node.to_string(),
        from: c.from.to_proto() as i32,
        to: c.to.to_proto() as i32,
        used_bytes: c.used_bytes,
        sold_bytes: c.sold_bytes,
        at_ms: c.at_ms,
    });
    bus.publish(subjects::meter_quota(node), body, &meta).await
}
