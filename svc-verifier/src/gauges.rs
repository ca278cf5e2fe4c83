//! The verifier's sampled gauges (`kit::ops::spawn_sampler`), read from the records in sled
//! (the rounds, the deadline), so they are right after a restart:
//! - `pn_ops_in_flight{stage="verify"}`: deployed operations with no outcome yet (not
//!   verified, failed, degraded or given up);
//! - `pn_ops_parked{stage="verify"}`: of those, the ones between two rounds (the next round
//!   recorded for later, the message parked);
//! - `pn_ops_overdue{stage="verify"}`: of those, the ones past their recorded deadline by more
//!   than `kit::ops::OVERDUE_GRACE_MS` (the deadline's round should have decided them; Center
//!   not saying whether the operation is activated keeps one here).
//!
//! Degraded operations (activated, watched slowly) are counted by `pn_ops_degraded` only.

use std::sync::Arc;

use kit::ops::StageCounts;
use proto::Stage;

use crate::Ctx;
use crate::record::VerifyRecord;

/// Counts one record into `c` at `now_ms`.
pub(crate) fn count(c: &mut StageCounts, rec: &VerifyRecord, now_ms: i64) {
    if rec.verified.is_some() || rec.failed.is_some() || rec.degraded.is_some() || rec.gave_up.is_some() {
        return;
    }
    c.held(rec.rounds > 0 && rec.next_check_ms > now_ms, kit::ops::overdue(now_ms, rec.deadline_ms));
}

pub(crate) async fn sample(ctx: Arc<Ctx>) {
    let ops = ctx.ops.clone();
    let counts = tokio::task::spawn_blocking(move || {
        let now = kit::now_ms();
        let mut c = StageCounts::default();
        for (_, rec) in ops.iter().filter_map(Result::ok) {
            count(&mut c, &rec, now);
        }
        c
    })
    .await;
    if let Ok(c) = counts {
        c.set(Stage::Verify.as_str());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::record::Degraded;

    #[test]
    fn held_parked_and_overdue_come_from_the_record() {
        let now = 10_000_000;
        let fresh = VerifyRecord { deadline_ms: now + 600_000, next_check_ms: now, ..VerifyRecord::new(proto::OpId::parse("op-1").unwrap()) };
        let between = VerifyRecord { rounds: 3, next_check_ms: now + 2000, ..fresh.clone() };
        let late = VerifyRecord { deadline_ms: now - 120_000, ..between.clone() };
        let mut c = StageCounts::default();
        for r in [&fresh, &between, &late] {
            count(&mut c, r, now);
        }
        assert_eq!(c, StageCounts { in_flight: 3, parked: 2, overdue: 1 });
        let mut gone = StageCounts::default();
        count(&mut gone, &VerifyRecord { failed: Some("x".into()), ..late.clone() }, now);
        count(&mut gone, &VerifyRecord { degraded: Some(Degraded::default()), ..late.clone() }, now);
        count(&mut gone, &VerifyRecord { gave_up: Some("x".into()), ..late.clone() }, now);
        assert_eq!(gone, StageCounts::default());
    }
}
