//! `pn.op.instance.<operationId>` (InstanceReady from svc-cloud): decode, check that the body
//! is for the subject's operation, deploy.

use std::sync::Arc;

use kit::bus::{HandleError, Handler, Incoming};
use proto::InstanceReady;

use crate::deploy::Deployer;

pub struct OnInstance(pub Arc<Deployer>);

#[async_trait::async_trait]
impl Handler for OnInstance {
    async fn handle(&self, msg: Incoming) -> Result<(), HandleError> {
        let op_id = msg.op_id().ok_or_else(|| HandleError::Drop("subject carries no operation id".into()))?;
        let res = match msg.decode_as::<InstanceReady>() {
            Ok(ir) => self.0.on_instance(&op_id, ir, msg.delivered).await,
            Err(e) => Err(e),
        };
        if matches!(res, Err(HandleError::Fail { .. })) {
            self.0.record_failed(&op_id).await;
        }
        res
    }
}
