//! One async lock per operation, so two consumers of one service (the stage's input and its
//! replay, say) never work on the same operation at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use proto::OpId;

/// A map of per-operation async locks. Entries nobody holds are dropped once the map grows
/// past a thousand, so it stays small however many operations pass.
#[derive(Default)]
pub struct OpLocks(Mutex<HashMap<OpId, Arc<tokio::sync::Mutex<()>>>>);

impl OpLocks {
    /// Waits for the operation's lock; it is released when the guard is dropped.
    pub async fn lock(&self, op: &OpId) -> tokio::sync::OwnedMutexGuard<()> {
        let m = {
            let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() > 1024 {
                map.retain(|_, m| Arc::strong_count(m) > 1);
            }
            map.entry(op.clone()).or_default().clone()
        };
        m.lock_owned().await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn one_holder_per_operation_others_free() {
        let locks = Arc::new(OpLocks::default());
        let (a, b) = (OpId::parse("op-a").unwrap(), OpId::parse("op-b").unwrap());
        let g = locks.lock(&a).await;
        // Another operation is not blocked.
        assert!(tokio::time::timeout(Duration::from_secs(5), locks.lock(&b)).await.is_ok());
        // The same operation waits until the guard is dropped.
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move { l2.lock(&a).await; });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        drop(g);
        let joined = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert!(matches!(joined, Ok(Ok(()))));
    }
}
