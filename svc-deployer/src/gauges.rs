//! The deployer's sampled gauges (`kit::ops::spawn_sampler`), read from the deploy records in
//! sled so they are right after a restart:
//! - `pn_ops_in_flight{stage="deploy"}`: operations with an instance to deploy and no outcome
//!   yet — not deployed, not handed back to svc-cloud for a rebuild, not failed here;
//! - `pn_ops_parked{stage="deploy"}`: of those, the ones whose OS prep runs on the node (the
//!   message parked until it should be done);
//! - `pn_ops_overdue{stage="deploy"}`: of those, the ones on which nothing moved for longer than
//!   `PN_SSH__PREP_TIMEOUT_MS` (the longest wait the stage allows) plus
//!   `kit::ops::OVERDUE_GRACE_MS`.

use kit::ops::StageCounts;
use kit::state::Table;
use proto::Stage;

use crate::record::DeployRecord;

/// Counts one record into `c` at `now_ms`.
pub fn count(c: &mut StageCounts, rec: &DeployRecord, prep_timeout_ms: i64, now_ms: i64) {
    let has_input = !rec.input.is_empty() || !rec.input_hex.is_empty();
    let deployed = rec.deployed.as_ref().is_some_and(|d| d.instance_id == rec.instance_id && d.claim_attempt >= rec.claim_attempt);
    let rebuilding = rec.rebuild_requested.as_deref() == Some(rec.instance_id.as_str());
    let failed = rec.failed_attempt.is_some_and(|a| a >= rec.claim_attempt);
    if !has_input || deployed || rebuilding || failed {
        return;
    }
    let parked = rec.prep_started_at_ms.is_some() && !rec.prepared;
    let last_move = [rec.updated_at_ms, rec.prep_started_at_ms.unwrap_or(0), rec.confirmed.as_ref().map(|c| c.at_ms).unwrap_or(0)]
        .into_iter()
        .max()
        .unwrap_or(0);
    let due = if last_move > 0 { last_move.saturating_add(prep_timeout_ms) } else { 0 };
    c.held(parked, kit::ops::overdue(now_ms, due));
}

pub async fn sample(table: Table<DeployRecord>, prep_timeout_ms: u64) {
    let counts = tokio::task::spawn_blocking(move || {
        let now = kit::now_ms();
        let mut c = StageCounts::default();
        for (_, rec) in table.iter().filter_map(Result::ok) {
            count(&mut c, &rec, prep_timeout_ms as i64, now);
        }
        c
    })
    .await;
    if let Ok(c) = counts {
        c.set(Stage::Deploy.as_str());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::record::Deployed;
    use proto::{Instance, InstanceReady, Operation};

    fn rec(instance: &str, attempt: u32) -> DeployRecord {
        DeployRecord::new(&InstanceReady {
            op: Some(Operation { operation_id: "op-1".into(), claim_attempt: attempt, ..Default::default() }),
            instance: Some(Instance { instance_id: instance.into(), ..Default::default() }),
            ready_at_ms: 1,
        })
    }

    #[test]
    fn held_parked_and_overdue_come_from_the_record() {
        let now = 10_000_000;
        let mut c = StageCounts::default();
        let mut working = rec("i-1", 1);
        working.updated_at_ms = now - 1000;
        count(&mut c, &working, 300_000, now);
        let mut prepping = working.clone();
        prepping.prep_started_at_ms = Some(now - 60_000);
        count(&mut c, &prepping, 300_000, now);
        let mut stuck = prepping.clone();
        stuck.prep_started_at_ms = Some(now - 400_000);
        stuck.updated_at_ms = now - 400_000;
        count(&mut c, &stuck, 300_000, now);
        assert_eq!(c, StageCounts { in_flight: 3, parked: 2, overdue: 1 });

        let mut gone = StageCounts::default();
        let mut deployed = working.clone();
        deployed.deployed = Some(Deployed {
            claim_attempt: 1,
            instance_id: "i-1".into(),
            deployed_at_ms: now,
            node_secret_sha256_hex: String::new(),
            host_key: String::new(),
            ssh_port: 22,
            ssh_user: String::new(),
        });
        count(&mut gone, &deployed, 300_000, now);
        let mut rebuilding = working.clone();
        rebuilding.rebuild_requested = Some("i-1".into());
        count(&mut gone, &rebuilding, 300_000, now);
        let mut failed = stuck.clone();
        failed.failed_attempt = Some(1);
        count(&mut gone, &failed, 300_000, now);
        count(&mut gone, &DeployRecord::default(), 300_000, now);
        assert_eq!(gone, StageCounts::default());

        // A newer claim attempt of a failed operation, or the instance that replaced a broken
        // one, is held again.
        let mut again = StageCounts::default();
        let mut retried = failed.clone();
        retried.set_input(&InstanceReady {
            op: Some(Operation { operation_id: "op-1".into(), claim_attempt: 2, ..Default::default() }),
            instance: Some(Instance { instance_id: "i-1".into(), ..Default::default() }),
            ready_at_ms: 2,
        });
        count(&mut again, &retried, 300_000, now);
        let mut rebuilt = rebuilding.clone();
        rebuilt.set_input(&InstanceReady {
            op: Some(Operation { operation_id: "op-1".into(), claim_attempt: 1, ..Default::default() }),
            instance: Some(Instance { instance_id: "i-2".into(), ..Default::default() }),
            ready_at_ms: 2,
        });
        count(&mut again, &rebuilt, 300_000, now);
        assert_eq!(again.in_flight, 2);
    }
}
