//! `pn.op.deployed.<op>` (durable consumer `svc-meter-deployed`): learn a private node — name,
//! ipv4, provider, sold quota, SHA-256 of its secret — or update it (a later deployment with a
//! different quota re-evaluates the state; a raise lifts a cutoff).
//!
//! The meter is a side consumer of the pipeline: an unusable event is dropped (logged), never
//! turned into `pn.op.failed` — the verifier owns the operation's verdict. Shared-pool nodes
//! (`private_node = false`) never report usage and are ignored.
//!
//! An event is a hint, not an order: one whose `deployed_at_ms` is further in the future than
//! `PN_MAX_CLOCK_AHEAD_MS` is dropped (a huge time must not win the "newest deployment" rule),
//! and one that would change a known node's address or secret hash, or take an address another
//! node holds, is applied only when the provider shows the event's instance named as the node
//! with that IPv4 — else dropped (counted in `pn_instance_checks_total`), the node unchanged; a
//! provider that does not answer is asked again.

use std::sync::Arc;
use std::time::Duration;

use kit::bus::{HandleError, Handler, Incoming};
use proto::NodeDeployed;

use kit::cloud::Confirmation;

use crate::ledger::Deployment;
use crate::meter::{Meter, Registered};

pub struct DeployedHandler {
    pub meter: Arc<Meter>,
}

#[async_trait::async_trait]
impl Handler for DeployedHandler {
    async fn handle(&self, msg: Incoming) -> Result<(), HandleError> {
        let d: NodeDeployed = msg.observe_as()?;
        if !d.private_node {
            tracing::debug!(node = %d.node_name, "shared-pool node: not metered");
            return Ok(());
        }
        let dep = Deployment::try_from(&d).map_err(|e| HandleError::Drop(format!("unusable deployed event: {e}")))?;
        let ahead = dep.deployed_at_ms.saturating_sub(kit::now_ms());
        let max_ahead = i64::try_from(self.meter.settings().max_clock_ahead_ms).unwrap_or(i64::MAX);
        if ahead > max_ahead {
            tracing::warn!(node = %dep.node, ahead_s = ahead / 1000, "deployed event from the future dropped");
            return Err(HandleError::Drop(format!("deployed_at_ms is {} s in the future (at most {} s allowed)", ahead / 1000, max_ahead / 1000)));
        }
        let mut confirmed = false;
        if let Some(change) = self.meter.needs_confirmation(&dep).await {
            let inst = d.instance.clone().unwrap_or_default();
            match self.meter.confirm(&dep, &inst.instance_id, &inst.account).await {
                Confirmation::Confirmed(_) => {
                    tracing::info!(node = %dep.node, instance = %inst.instance_id, %change, "identity change confirmed by the provider");
                    confirmed = true;
                }
                Confirmation::Mismatch(why) => {
                    tracing::warn!(node = %dep.node, %change, %why, "deployed event not confirmed by the provider; node unchanged");
                    return Err(HandleError::Drop(format!("{change}, and the provider does not confirm it: {why}")));
                }
                Confirmation::Unanswered(why) => return Err(HandleError::retry(format!("cannot confirm a node's identity change yet: {why}"), Duration::from_secs(2))),
            }
        }
        let r = self
            .meter
            .register(&dep, confirmed)
            .await
            .map_err(|e| HandleError::retry(format!("ledger write failed: {e}"), Duration::from_secs(1)))?;
        if r == Registered::Refused {
            // Raced with another deployment of the node: look again, with the provider.
            return Err(HandleError::retry("the node changed meanwhile; checking again", Duration::from_millis(200)));
        }
        Ok(())
    }
}
