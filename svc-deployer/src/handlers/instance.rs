//! `pn.op.instance.<operationId>` (InstanceReady from svc-cloud): decode, check that the body
//! is for the subject's operation, deploy.

use std::sync::Arc;

use kit::bus::{HandleError, Handler, Incoming};
use proto::Body;

use crate::deploy::Deployer;

pub struct OnInstance(pub Arc<Deployer>);

#[async_trait::async_trait]
impl Handler for OnInstance {
    async fn handle(&self, msg: Incoming) -> Result<(), HandleError> {
        let op_id = msg
            .subject_op_id()
            .filter(|s| proto::subjects::is_token(s))
            .map(str::to_string)
            .ok_or_else(|| HandleError::Drop("subject carries no operation id".into()))?;
        let res = match msg.decode()? {
            Body::Instance(ir) => self.0.on_instance(&op_id, ir, msg.delivered).await,
            other => Err(HandleError::fail(format!("expected pn.v1.InstanceReady, got {}", other.type_name()))),
        };
        if matches!(res, Err(HandleError::Fail { .. })) {
            self.0.record_failed(&op_id).await;
        }
        res
    }
}
