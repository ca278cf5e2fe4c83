//! svc-cloud's sampled gauges (`kit::ops::spawn_sampler`), read from the records in sled so
//! they are right after a restart:
//! - `pn_ops_in_flight{stage="cloud"}`: claimed operations with no instance published yet and
//!   not failed;
//! - `pn_ops_parked{stage="cloud"}`: of those, the ones waiting parked — on a booting instance
//!   (`CloudRecord::boot`) or in a seed-001 §3.f pause before the next create;
//! - `pn_ops_overdue{stage="cloud"}`: of those, the ones whose wait ended more than
//!   `kit::ops::OVERDUE_GRACE_MS` ago with nothing decided: a boot wait older than
//!   `PN_BOOT_TIMEOUT_MS`, or a pause over.

use std::sync::Arc;

use kit::ops::StageCounts;
use proto::Stage;

use crate::{CloudRecord, Ctx};

/// Counts one record into `c` at `now_ms`.
pub(crate) fn count(c: &mut StageCounts, rec: &CloudRecord, boot_timeout_ms: i64, now_ms: i64) {
    if rec.published || rec.failed || rec.op_pb.is_empty() {
        return;
    }
    let pause_end = rec.create.next_create_at_ms.filter(|t| *t > 0);
    let (parked, due) = match (&rec.boot, pause_end) {
        (Some(b), _) => (true, b.started_at_ms.saturating_add(boot_timeout_ms)),
        (None, Some(t)) => (t > now_ms, t),
        (None, None) => (false, 0),
    };
    c.held(parked, kit::ops::overdue(now_ms, due));
}

pub(crate) async fn sample(ctx: Arc<Ctx>) {
    let ops = ctx.ops.clone();
    let boot_timeout_ms = ctx.settings.boot_timeout_ms as i64;
    let counts = tokio::task::spawn_blocking(move || {
        let now = kit::now_ms();
        let mut c = StageCounts::default();
        for (_, rec) in ops.iter().filter_map(Result::ok) {
            count(&mut c, &rec, boot_timeout_ms, now);
        }
        c
    })
    .await;
    if let Ok(c) = counts {
        c.set(Stage::Cloud.as_str());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{BootWait, InstanceInfo};

    #[test]
    fn held_parked_and_overdue_come_from_the_record() {
        let now = 10_000_000;
        let base = CloudRecord { op_pb: vec![1], ..crate::record::tests::blank() };
        let mut c = StageCounts::default();
        // Claimed, probing or creating now: held, neither parked nor overdue.
        count(&mut c, &base, 300_000, now);
        // Booting for a minute: parked.
        let booting = CloudRecord { boot: Some(BootWait { started_at_ms: now - 60_000, ..Default::default() }), ..base.clone() };
        count(&mut c, &booting, 300_000, now);
        // Booting past the boot timeout and its grace: parked and overdue.
        let stuck = CloudRecord { boot: Some(BootWait { started_at_ms: now - 400_000, ..Default::default() }), ..base.clone() };
        count(&mut c, &stuck, 300_000, now);
        // In a pause: parked.
        let mut pausing = base.clone();
        pausing.create.next_create_at_ms = Some(now + 1000);
        count(&mut c, &pausing, 300_000, now);
        assert_eq!(c, StageCounts { in_flight: 4, parked: 3, overdue: 1 });
        // Handed on, failed, or never claimed: not held.
        let mut gone = StageCounts::default();
        count(&mut gone, &CloudRecord { published: true, instance: Some(InstanceInfo::default()), ..base.clone() }, 300_000, now);
        count(&mut gone, &CloudRecord { failed: true, ..stuck.clone() }, 300_000, now);
        count(&mut gone, &crate::record::tests::blank(), 300_000, now);
        assert_eq!(gone, StageCounts::default());
    }
}
