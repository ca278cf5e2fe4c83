//! The claimer's sampled gauges (`kit::ops::spawn_sampler`), read from its own state, not
//! counted in handlers, so they are right after a restart:
//! - `pn_ops_in_flight{stage="claim"}`: operations this holder claimed and has not yet handed
//!   on (`pn.op.claimed` not published) nor ended; `pn_ops_overdue{stage="claim"}`: of those,
//!   claimed longer than a lease ago (`lease_seconds`: the hand-on takes a publish, not a
//!   lease). Nothing parks at the claim stage: `pn_ops_parked{stage="claim"}` is 0.
//!   (`pn_claimed_in_flight` counts every operation the claimer holds, handed on or not.)
//! - `pn_relay_backlog{relay="claimer-<input>"}`: the report consumers' pending and
//!   unacknowledged messages (reports to Center not yet delivered; a refused one waits
//!   nak'ed, unacknowledged).

use std::sync::Arc;

use kit::ops::StageCounts;
use proto::{Stage, subjects};

use crate::Ctx;

/// The report consumers, by the relay label they are exported under.
const RELAYS: [(&str, &str); 3] =
    [("claimer-instance", "svc-claimer-instance"), ("claimer-failed", "svc-claimer-failed"), ("claimer-verified", "svc-claimer-verified")];

pub(crate) async fn sample(ctx: Arc<Ctx>) {
    let ops = ctx.ops.clone();
    let holder = ctx.holder.clone();
    let lease_ms = i64::from(ctx.settings.lease_seconds) * 1000;
    let counts = tokio::task::spawn_blocking(move || {
        let now = kit::now_ms();
        let mut c = StageCounts::default();
        for (_, rec) in ops.iter().filter_map(Result::ok) {
            if rec.holder != holder || rec.terminal.is_some() || rec.published {
                continue;
            }
            let claimed_at = prost::Message::decode(rec.op_pb.as_slice()).map(|o: proto::Operation| o.claimed_at_ms).unwrap_or(0);
            c.held(false, claimed_at > 0 && kit::ops::overdue(now, claimed_at.saturating_add(lease_ms)));
        }
        c
    })
    .await;
    if let Ok(c) = counts {
        c.set(Stage::Claim.as_str());
    }
    for (relay, durable) in RELAYS {
        if let Some(n) = kit::ops::consumer_backlog(&ctx.rt.bus, subjects::OPS_STREAM, durable).await {
            kit::ops::relay_backlog(relay, n);
        }
    }
}
