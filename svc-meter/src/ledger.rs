//! The durable per-node record (`Table<NodeLedger>` in `kit::state`, key = node name): who the
//! node is (ipv4, provider, hash of its secret — never the secret), what was sold, what was
//! used (epochs), its quota state, and the outbox of intents that must reach NATS and Center
//! (quota changes not yet published, the hide/show not yet confirmed by Center).
//!
//! Also `Deployment`, the validated form of a `pn.op.deployed` event.

use std::net::Ipv4Addr;

use kit::state::Record;
use serde::{Deserialize, Serialize};

use crate::delta::{Outcome, Usage};
use crate::quota::{State, Thresholds};

/// Quota changes kept in the record (unpublished ones are never dropped before these).
const MAX_CHANGES_KEPT: usize = 8;

/// A node as the deployer announced it. Cannot hold an invalid value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployment {
    pub node: String,
    pub ipv4: Ipv4Addr,
    pub secret_sha256: [u8; 32],
    pub sold_bytes: u64,
    pub provider: String,
    pub operation_id: String,
    pub sub_id: String,
    pub deployed_at_ms: i64,
    pub private_node: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeploymentError {
    #[error("node name {0:?} is not a subject token")]
    NodeName(String),
    #[error("instance has no valid IPv4 ({0:?})")]
    Ipv4(String),
    #[error("node_secret_sha256 has {0} bytes, not 32")]
    SecretHash(usize),
}

impl TryFrom<&proto::NodeDeployed> for Deployment {
    type Error = DeploymentError;

    fn try_from(d: &proto::NodeDeployed) -> Result<Self, Self::Error> {
        if !proto::subjects::is_token(&d.node_name) {
            return Err(DeploymentError::NodeName(d.node_name.chars().take(64).collect()));
        }
        let inst = d.instance.clone().unwrap_or_default();
        let ipv4: Ipv4Addr = inst.ipv4.trim().parse().map_err(|_| DeploymentError::Ipv4(inst.ipv4.chars().take(64).collect()))?;
        let secret_sha256: [u8; 32] =
            d.node_secret_sha256.as_slice().try_into().map_err(|_| DeploymentError::SecretHash(d.node_secret_sha256.len()))?;
        let op = d.op.clone().unwrap_or_default();
        Ok(Deployment {
            node: d.node_name.clone(),
            ipv4,
            secret_sha256,
            sold_bytes: d.sold_bytes,
            provider: inst.provider.trim().to_ascii_lowercase(),
            operation_id: op.operation_id,
            sub_id: op.sub_id,
            deployed_at_ms: d.deployed_at_ms,
            private_node: d.private_node,
        })
    }
}

/// The last accepted report, for the operator's view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LastReport {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub boot_id: String,
    pub at: Option<String>,
    pub received_at_ms: i64,
    pub delta_bytes: u64,
    pub outcome: String,
}

/// One quota state change; published as `QuotaChanged` with msg id `<node>.quota.<seq>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QuotaChange {
    pub seq: u64,
    pub from: State,
    pub to: State,
    pub used_bytes: u64,
    pub sold_bytes: u64,
    pub at_ms: i64,
}

/// Everything the meter knows about one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeLedger {
    pub node: String,
    pub ipv4: Ipv4Addr,
    /// Hex SHA-256 of the node secret's text.
    pub secret_sha256: String,
    pub provider: String,
    pub operation_id: String,
    pub sub_id: String,
    pub sold_bytes: u64,
    /// When `sold_bytes` was last set (deployment time, or an operator's change): an older
    /// deployed event redelivered later does not undo a newer quota.
    pub quota_set_at_ms: i64,
    pub deployed_at_ms: i64,
    pub registered_at_ms: i64,
    pub usage: Usage,
    pub last_report: Option<LastReport>,
    pub state: State,
    pub quota_seq: u64,
    pub published_quota_seq: u64,
    pub quota_changes: Vec<QuotaChange>,
    /// What Center last confirmed for `update_node(hidden)`. The wanted value is
    /// `state == Cutoff`; a difference is an intent still to deliver.
    pub hidden_synced: bool,
    /// The node's first non-zero usage has been published (the verifier waits for it).
    pub usage_announced: bool,
}

impl Record for NodeLedger {
    const VERSION: u32 = 1;
}

impl NodeLedger {
    pub fn new(d: &Deployment, now_ms: i64) -> NodeLedger {
        NodeLedger {
            node: d.node.clone(),
            ipv4: d.ipv4,
            secret_sha256: hex::encode(d.secret_sha256),
            provider: d.provider.clone(),
            operation_id: d.operation_id.clone(),
            sub_id: d.sub_id.clone(),
            sold_bytes: d.sold_bytes,
            quota_set_at_ms: d.deployed_at_ms,
            deployed_at_ms: d.deployed_at_ms,
            registered_at_ms: now_ms,
            usage: Usage::default(),
            last_report: None,
            state: State::Ok,
            quota_seq: 0,
            published_quota_seq: 0,
            quota_changes: Vec::new(),
            hidden_synced: false,
            usage_announced: false,
        }
    }

    /// Applies a (re)deployment: the newest deployment defines the node's address and
    /// credential, and its quota unless an operator set one later.
    pub fn redeploy(&mut self, d: &Deployment) {
        if d.deployed_at_ms >= self.deployed_at_ms {
            self.ipv4 = d.ipv4;
            self.secret_sha256 = hex::encode(d.secret_sha256);
            self.provider = d.provider.clone();
            self.operation_id = d.operation_id.clone();
            self.sub_id = d.sub_id.clone();
            self.deployed_at_ms = d.deployed_at_ms;
        }
        if d.deployed_at_ms >= self.quota_set_at_ms && d.sold_bytes != self.sold_bytes {
            self.sold_bytes = d.sold_bytes;
            self.quota_set_at_ms = d.deployed_at_ms;
        }
    }

    /// The stored hash, decoded (a corrupt value matches nothing).
    pub fn secret_hash(&self) -> Option<[u8; 32]> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(&self.secret_sha256, &mut out).ok().map(|_| out)
    }

    /// Recomputes the quota state; a change is recorded (to be published) and returned.
    pub fn evaluate(&mut self, th: &Thresholds, now_ms: i64) -> Option<QuotaChange> {
        let to = th.state(self.usage.used_bytes, self.sold_bytes);
        if to == self.state {
            return None;
        }
        self.quota_seq += 1;
        let change = QuotaChange {
            seq: self.quota_seq,
            from: self.state,
            to,
            used_bytes: self.usage.used_bytes,
            sold_bytes: self.sold_bytes,
            at_ms: now_ms,
        };
        self.state = to;
        if to == State::Cutoff {
            metrics::counter!("pn_meter_cutoffs_total").increment(1);
        }
        self.quota_changes.push(change.clone());
        let published = self.published_quota_seq;
        while self.quota_changes.len() > MAX_CHANGES_KEPT {
            // Drop the oldest published change; if none is published yet, the oldest at all
            // (its successor supersedes it: consumers care about the current state).
            let i = self.quota_changes.iter().position(|c| c.seq <= published).unwrap_or(0);
            self.quota_changes.remove(i);
        }
        Some(change)
    }

    /// Changes not yet published, oldest first.
    pub fn unpublished_changes(&self) -> Vec<QuotaChange> {
        self.quota_changes.iter().filter(|c| c.seq > self.published_quota_seq).cloned().collect()
    }

    pub fn hidden_wanted(&self) -> bool {
        self.state == State::Cutoff
    }

    /// Something must still reach NATS or Center.
    pub fn has_outbox_work(&self) -> bool {
        self.published_quota_seq < self.quota_seq || self.hidden_wanted() != self.hidden_synced
    }

    pub fn record_report(&mut self, rep: &crate::report::UsageReport, outcome: Outcome, now_ms: i64) {
        if outcome == Outcome::Stale {
            return;
        }
        self.last_report = Some(LastReport {
            rx_bytes: rep.rx_bytes,
            tx_bytes: rep.tx_bytes,
            boot_id: rep.boot_id.clone(),
            at: rep.at.clone(),
            received_at_ms: now_ms,
            delta_bytes: outcome.delta(),
            outcome: outcome.as_str().to_string(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dep(sold: u64, at: i64) -> Deployment {
        Deployment {
            node: "pn-a".into(),
            ipv4: Ipv4Addr::new(127, 0, 1, 1),
            secret_sha256: [7; 32],
            sold_bytes: sold,
            provider: "lightsail".into(),
            operation_id: "op".into(),
            sub_id: "sub".into(),
            deployed_at_ms: at,
            private_node: true,
        }
    }

    #[test]
    fn state_changes_are_numbered_and_kept_until_published() {
        let th = Thresholds::default();
        let mut l = NodeLedger::new(&dep(1000, 1), 1);
        assert_eq!(l.evaluate(&th, 2), None);
        l.usage.used_bytes = 800;
        let c = l.evaluate(&th, 3);
        assert_eq!(c.map(|c| (c.seq, c.from, c.to)), Some((1, State::Ok, State::Warn)));
        l.usage.used_bytes = 960;
        assert_eq!(l.evaluate(&th, 4).map(|c| c.to), Some(State::Cutoff));
        assert!(l.hidden_wanted() && l.has_outbox_work());
        assert_eq!(l.unpublished_changes().len(), 2);
        l.published_quota_seq = 2;
        l.hidden_synced = true;
        assert!(!l.has_outbox_work());
        // A raised quota lifts the cutoff.
        l.redeploy(&dep(2000, 5));
        assert_eq!(l.sold_bytes, 2000);
        assert_eq!(l.evaluate(&th, 6).map(|c| (c.from, c.to)), Some((State::Cutoff, State::Ok)));
        assert!(!l.hidden_wanted() && l.has_outbox_work());
        // An older deployment redelivered later changes nothing.
        l.redeploy(&dep(1000, 1));
        assert_eq!(l.sold_bytes, 2000);
    }

    #[test]
    fn the_change_list_stays_bounded() {
        let th = Thresholds::default();
        let mut l = NodeLedger::new(&dep(1000, 1), 1);
        for i in 0..50u64 {
            l.usage.used_bytes = if i % 2 == 0 { 990 } else { 0 };
            l.sold_bytes = 1000;
            l.evaluate(&th, i as i64);
        }
        assert!(l.quota_changes.len() <= MAX_CHANGES_KEPT);
        assert_eq!(l.unpublished_changes().last().map(|c| c.seq), Some(50));
    }

    #[test]
    fn deployment_validation() {
        let mut d = proto::NodeDeployed {
            node_name: "pn-x".into(),
            instance: Some(proto::Instance { ipv4: "127.0.1.9".into(), provider: "Hetzner".into(), ..Default::default() }),
            node_secret_sha256: vec![1; 32],
            sold_bytes: 5,
            private_node: true,
            ..Default::default()
        };
        let ok = Deployment::try_from(&d);
        assert_eq!(ok.as_ref().map(|d| d.provider.as_str()), Ok("hetzner"));
        d.node_secret_sha256 = vec![1; 31];
        assert_eq!(Deployment::try_from(&d).err(), Some(DeploymentError::SecretHash(31)));
        d.node_secret_sha256 = vec![1; 32];
        d.node_name = "pn.x".into();
        assert!(matches!(Deployment::try_from(&d), Err(DeploymentError::NodeName(_))));
        d.node_name = "pn-x".into();
        d.instance = None;
        assert!(matches!(Deployment::try_from(&d), Err(DeploymentError::Ipv4(_))));
    }
}
