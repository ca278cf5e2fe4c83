//! What the deployer remembers per operation (sled, via `kit::state`): the input event (its
//! claim token stays sealed), the pinned host key, which steps are done, the sealed node
//! secret and the recorded outcome. Re-entry and `pn.replay.deploy` start from here.
//!
//! Never: a plaintext secret in a record — the node secret is sealed with `PN_SEAL_KEY`,
//! the claim token is the sealed blob the claimer published.

use std::collections::BTreeMap;

use prost::Message;
use proto::{InstanceReady, Operation};
use serde::{Deserialize, Serialize};

pub const TABLE: &str = "deploy";

/// One operation's deploy state. Key: the operation id.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct DeployRecord {
    /// The `InstanceReady` this deploy works from, protobuf (base64 in the stored JSON).
    #[serde(with = "kit::state::b64", default)]
    pub input: Vec<u8>,
    /// The same, hex, in records written before `input` existed; read, never written.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub input_hex: String,
    pub claim_attempt: u32,
    /// The instance the host key and the prep belong to; a new instance resets both, and only
    /// once the provider confirmed it (`confirmed`).
    pub instance_id: String,
    /// What the provider last confirmed about the input's instance (id, name, account, IPv4):
    /// an input is worked on, and a pinned key dropped for it, only when this matches it.
    #[serde(default)]
    pub confirmed: Option<Confirmed>,
    /// TOFU: the first host key seen (OpenSSH public line).
    pub host_key: Option<String>,
    /// `provision-node.sh` finished with exit 0 on this instance.
    pub prepared: bool,
    /// When the detached prep was (last) launched on this instance, ms since the epoch.
    #[serde(default)]
    pub prep_started_at_ms: Option<i64>,
    /// Launches of the prep on this instance (a failed prep is launched again, up to
    /// `ssh.step_attempts` times).
    #[serde(default)]
    pub prep_launches: u32,
    /// Handler runs in a row that ended in a transient error; at `PN_MAX_DELIVER` the
    /// operation fails (the consumer parks, so JetStream's own delivery count is no measure).
    #[serde(default)]
    pub transient_failures: u32,
    /// K2_NODE_SECRET, sealed, hex. Made once per operation so every run writes the same one.
    pub sealed_node_secret_hex: Option<String>,
    /// `cloud-init status` on this instance said it did not fail (or the host has none).
    #[serde(default)]
    pub cloud_init_ok: bool,
    /// SSH on the hardened port answered from outside and port 22 was closed on the node.
    #[serde(default)]
    pub port22_closed: bool,
    /// This instance was found broken (cloud-init error) and svc-cloud was asked to replace it
    /// (`pn.op.rebuild`): nothing more is done on it.
    #[serde(default)]
    pub rebuild_requested: Option<String>,
    /// Handler runs that reached the node.
    pub runs: u32,
    /// When each step last succeeded (ms since the epoch), for debugging a stuck operation.
    #[serde(default)]
    pub steps: BTreeMap<String, i64>,
    pub deployed: Option<Deployed>,
    pub updated_at_ms: i64,
    /// The claim attempt this stage failed (its `pn.op.failed` went out), and when: the
    /// operation is no longer held here (`pn_ops_in_flight`) unless a newer attempt comes.
    #[serde(default)]
    pub failed_attempt: Option<u32>,
    #[serde(default)]
    pub failed_at_ms: Option<i64>,
}

/// The recorded outcome: enough to publish the same `NodeDeployed` again.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Deployed {
    pub claim_attempt: u32,
    pub instance_id: String,
    pub deployed_at_ms: i64,
    pub node_secret_sha256_hex: String,
    pub host_key: String,
    pub ssh_port: u16,
    /// The user the deployer logged in as (for the verifier).
    #[serde(default)]
    pub ssh_user: String,
}

/// An instance as the provider confirmed it for this operation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Confirmed {
    pub instance_id: String,
    /// `pn-<subId>`.
    pub name: String,
    pub account: String,
    pub ipv4: String,
    pub at_ms: i64,
    /// The user the instance's image lets in (or `PN_SSH__USER`), found when confirmed; empty
    /// in records from before it was kept (then it is found again).
    #[serde(default)]
    pub login_user: String,
}

impl Confirmed {
    /// The facts `input` states, to be confirmed (`at_ms` 0).
    pub fn facts(input: &InstanceReady) -> Confirmed {
        let op = input.op.clone().unwrap_or_default();
        let inst = input.instance.clone().unwrap_or_default();
        Confirmed {
            instance_id: inst.instance_id,
            name: crate::node_env::node_name(&op.sub_id),
            account: inst.account,
            ipv4: inst.ipv4.trim().to_string(),
            at_ms: 0,
            login_user: String::new(),
        }
    }

    /// The same instance, name, account and address (whenever confirmed).
    pub fn same(&self, other: &Confirmed) -> bool {
        (&self.instance_id, &self.name, &self.account, &self.ipv4) == (&other.instance_id, &other.name, &other.account, &other.ipv4)
    }
}

impl kit::state::Record for DeployRecord {
    const VERSION: u32 = 1;
}

impl DeployRecord {
    pub fn new(input: &InstanceReady) -> DeployRecord {
        let mut r = DeployRecord::default();
        r.set_input(input);
        r
    }

    pub fn input(&self) -> Option<InstanceReady> {
        if !self.input.is_empty() {
            return InstanceReady::decode(self.input.as_slice()).ok();
        }
        let bytes = hex::decode(&self.input_hex).ok()?;
        InstanceReady::decode(bytes.as_slice()).ok()
    }

    /// Takes `input` as the event to work from. A different instance forgets the pin and
    /// the prep (they belonged to the old machine); the node secret stays.
    pub fn set_input(&mut self, input: &InstanceReady) {
        let instance_id = input.instance.as_ref().map(|i| i.instance_id.clone()).unwrap_or_default();
        if instance_id != self.instance_id {
            self.host_key = None;
            self.prepared = false;
            self.prep_started_at_ms = None;
            self.prep_launches = 0;
            self.cloud_init_ok = false;
            self.port22_closed = false;
            self.instance_id = instance_id;
        }
        self.claim_attempt = input.op.as_ref().map(|o| o.claim_attempt).unwrap_or(0);
        self.input = input.encode_to_vec();
        self.input_hex.clear();
    }

    /// The provider confirmed exactly what `input` states.
    pub fn confirms(&self, input: &InstanceReady) -> bool {
        self.confirmed.as_ref().is_some_and(|c| c.same(&Confirmed::facts(input)))
    }

    /// The login user found when the instance was confirmed (empty: not known yet).
    pub fn login_user(&self) -> &str {
        self.confirmed.as_ref().map(|c| c.login_user.as_str()).unwrap_or("")
    }

    /// The subscription this operation is for, as first recorded (empty before any input).
    pub fn sub_id(&self) -> Option<String> {
        self.input().and_then(|i| i.op).map(|o| o.sub_id).filter(|s| !s.is_empty())
    }

    /// The outcome is recorded for this input (same instance, same or newer claim).
    pub fn deployed_for(&self, op: &Operation, instance_id: &str) -> Option<&Deployed> {
        self.deployed.as_ref().filter(|d| d.instance_id == instance_id && d.claim_attempt >= op.claim_attempt)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proto::Instance;

    fn ir(instance: &str, attempt: u32) -> InstanceReady {
        InstanceReady {
            op: Some(Operation { operation_id: "op-1".into(), claim_attempt: attempt, ..Default::default() }),
            instance: Some(Instance { instance_id: instance.into(), ..Default::default() }),
            ready_at_ms: 1,
        }
    }

    #[test]
    fn records_from_before_the_base64_input_still_load() {
        let old = serde_json::json!({
            "input_hex": hex::encode(ir("i-1", 3).encode_to_vec()), "claim_attempt": 3, "instance_id": "i-1",
            "host_key": null, "prepared": true, "sealed_node_secret_hex": null, "runs": 1, "deployed": null, "updated_at_ms": 5
        });
        let r: DeployRecord = serde_json::from_value(old).unwrap();
        assert_eq!(r.input().unwrap(), ir("i-1", 3));
        assert!(r.prepared && r.prep_started_at_ms.is_none());
        let mut r = r;
        r.set_input(&ir("i-1", 4));
        let text = serde_json::to_string(&r).unwrap();
        assert!(!text.contains("input_hex"), "{text}");
        let back: DeployRecord = serde_json::from_str(&text).unwrap();
        assert_eq!(back.input().unwrap(), ir("i-1", 4));
    }

    #[test]
    fn only_exactly_the_confirmed_facts_are_confirmed() {
        let mut input = ir("i-1", 1);
        if let Some(i) = input.instance.as_mut() {
            (i.ipv4, i.account) = ("203.0.113.7".into(), "acct".into());
        }
        if let Some(o) = input.op.as_mut() {
            o.sub_id = "s1".into();
        }
        let mut r = DeployRecord::new(&input);
        assert!(!r.confirms(&input), "nothing is confirmed by being recorded");
        r.confirmed = Some(Confirmed { at_ms: 5, ..Confirmed::facts(&input) });
        assert_eq!(r.confirmed.as_ref().map(|c| c.name.as_str()), Some("pn-s1"));
        assert!(r.confirms(&input));
        let mut other = input.clone();
        if let Some(i) = other.instance.as_mut() {
            i.ipv4 = "127.250.0.1".into();
        }
        assert!(!r.confirms(&other), "another address is not confirmed");
        let mut other = input.clone();
        if let Some(o) = other.op.as_mut() {
            o.sub_id = "s2".into();
        }
        assert!(!r.confirms(&other), "another subscription is not confirmed");
        assert_eq!(r.sub_id().as_deref(), Some("s1"));
    }

    #[test]
    fn a_new_instance_forgets_pin_and_prep_but_keeps_the_secret() {
        let mut r = DeployRecord::new(&ir("i-1", 1));
        r.host_key = Some("ssh-ed25519 AAAA".into());
        r.prepared = true;
        r.sealed_node_secret_hex = Some("00".into());
        r.set_input(&ir("i-1", 2));
        assert!(r.prepared && r.host_key.is_some());
        assert_eq!(r.claim_attempt, 2);
        r.cloud_init_ok = true;
        r.port22_closed = true;
        r.set_input(&ir("i-2", 2));
        assert!(!r.prepared && r.host_key.is_none());
        assert!(!r.cloud_init_ok && !r.port22_closed, "a new machine is checked again");
        assert_eq!(r.sealed_node_secret_hex.as_deref(), Some("00"));
        assert_eq!(r.input().unwrap(), ir("i-2", 2));
    }
}
