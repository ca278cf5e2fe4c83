//! `pn.replay.deploy` (payload: the plain operation id): re-run the deploy from the record.

use std::sync::Arc;

use kit::bus::{HandleError, Handler, Incoming};

use crate::deploy::Deployer;

pub struct OnReplay(pub Arc<Deployer>);

#[async_trait::async_trait]
impl Handler for OnReplay {
    async fn handle(&self, msg: Incoming) -> Result<(), HandleError> {
        let op_id = msg.replay_op_id()?;
        let res = self.0.on_replay(&op_id).await;
        if matches!(res, Err(HandleError::Fail { .. })) {
            self.0.record_failed(&op_id).await;
        }
        res
    }
}
