//! `pn.op.deployed.<op>` (durable consumer `svc-meter-deployed`): learn a private node — name,
//! ipv4, provider, sold quota, SHA-256 of its secret — or update it (a later deployment with a
//! different quota re-evaluates the state; a raise lifts a cutoff).
//!
//! The meter is a side consumer of the pipeline: an unusable event is dropped (logged), never
//! turned into `pn.op.failed` — the verifier owns the operation's verdict. Shared-pool nodes
//! (`private_node = false`) never report usage and are ignored.

use std::sync::Arc;
use std::time::Duration;

use kit::bus::{HandleError, Handler, Incoming};
use proto::Body;

use crate::ledger::Deployment;
use crate::meter::Meter;

pub struct DeployedHandler {
    pub meter: Arc<Meter>,
}

#[async_trait::async_trait]
impl Handler for DeployedHandler {
    #[tracing::instrument(skip_all, fields(subject = %msg.subject, stage = "meter"))]
    async fn handle(&self, msg: Incoming) -> Result<(), HandleError> {
        let body = msg.decode().map_err(|e| match e {
            HandleError::Fail { reason, .. } => HandleError::Drop(reason),
            other => other,
        })?;
        let Body::Deployed(d) = body else {
            return Err(HandleError::Drop(format!("expected NodeDeployed, got {}", body.type_name())));
        };
        if !d.private_node {
            tracing::debug!(node = %d.node_name, "shared-pool node: not metered");
            return Ok(());
        }
        let dep = Deployment::try_from(&d).map_err(|e| HandleError::Drop(format!("unusable deployed event: {e}")))?;
        self.meter
            .register(&dep)
            .await
            .map_err(|e| HandleError::retry(format!("ledger write failed: {e}"), Duration::from_secs(1)))?;
        Ok(())
    }
}
