//! The simulator's whole state behind one mutex (it is a simulator: simple beats fast), and
//! the handle every part shares. Besides Center's operations and the cloud's instances it keeps
//! what only a simulator can know: the guardrail violations it saw and the secrets it handed
//! out or received, so tests can scan for leaks.
//!
//! Never: hold the lock across an `.await`, or log a secret.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::ops::Deref;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use russh::keys::PublicKey;
use secrecy::SecretString;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::center::Operations;
use crate::cloud::Cloud;
use crate::faults::{Dice, Faults};
use crate::rfc3339;

/// What the parts need from the settings, resolved at start.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The URL this Center hands out as `identity.centerUrl` (the nodes' `K2_CENTER_URL`):
    /// `--public-url` (the ingress in front of it), else its own address.
    pub base_url: String,
    pub data_dir: PathBuf,
    pub ssh_port_fresh: u16,
    pub ssh_port_hardened: u16,
}

#[derive(Clone)]
pub struct Sim(Arc<Inner>);

pub struct Inner {
    pub cfg: SimConfig,
    /// The account's default keypair: the only key the nodes accept.
    pub admin_key: PublicKey,
    pub center_token: SecretString,
    /// An HTTP client for the simulator's own outbound calls.
    pub http: reqwest::Client,
    /// Cancelled at shutdown; every instance's tasks hang below it.
    pub root: CancellationToken,
    state: Mutex<State>,
}

impl Deref for Sim {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl Sim {
    pub fn new(
        cfg: SimConfig,
        admin_key: PublicKey,
        center_token: SecretString,
        ip_start: Ipv4Addr,
        seed: u64,
        http: reqwest::Client,
    ) -> Sim {
        let faults = Faults { seed, ..Faults::default() };
        let state = State {
            ops: Operations::default(),
            cloud: Cloud::new(ip_start),
            nodes: BTreeMap::new(),
            node_by_ip: HashMap::new(),
            violations: Vec::new(),
            node_secrets: Vec::new(),
            node_secret_set: HashSet::new(),
            node_secret_lens: BTreeSet::new(),
            dice: Dice::new(seed),
            faults,
            sessions: HashSet::new(),
        };
        Sim(Arc::new(Inner { cfg, admin_key, center_token, http, root: CancellationToken::new(), state: Mutex::new(state) }))
    }

    /// The state (a poisoned lock is taken over: every writer leaves it consistent per step).
    pub fn st(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state after applying lease expiry and the timeout sweep at the current time.
    pub fn st_ticked(&self) -> MutexGuard<'_, State> {
        let mut st = self.st();
        st.tick();
        st
    }

    /// Where an instance's deploy dir lives on the simulator's disk.
    pub fn disk_dir(&self, instance_name: &str) -> PathBuf {
        self.cfg.data_dir.join(crate::node::safe_dir_name(instance_name))
    }
}

/// A node registered with Center (`list_nodes`).
#[derive(Debug, Clone)]
pub struct NodeRec {
    pub name: String,
    pub ipv4: String,
    pub region: String,
    pub class: String,
    pub ip_type: String,
    pub hidden: bool,
    pub domain: String,
    pub owner_sub_id: Option<String>,
    pub operation_id: Option<String>,
    pub instance_id: Option<String>,
    pub registered_ms: i64,
    pub registrations: u32,
    pub usage_reports: u32,
    /// The node's credential (`ipv4:secret`); never serialized here.
    pub secret: String,
    /// Center's own usage ledger of this node (`/slave/usage`).
    pub usage: crate::slave::NodeUsage,
    /// Center's own cut-off (≥ 95 % of the sold quota): hidden, new device auth gets 402.
    pub quota_cutoff: bool,
}

impl NodeRec {
    pub fn to_wire(&self) -> kit::center::Node {
        kit::center::Node {
            name: self.name.clone(),
            ipv4: self.ipv4.clone(),
            region: self.region.clone(),
            class: self.class.clone(),
            ip_type: self.ip_type.clone(),
            // Hidden by `update_node` (the meter) or by Center's own cut-off.
            hidden: self.hidden || self.quota_cutoff,
            tunnels: vec![kit::center::Tunnel { domain: self.domain.clone(), port: 443 }],
        }
    }

    pub fn to_admin(&self) -> AdminNode {
        AdminNode {
            name: self.name.clone(),
            ipv4: self.ipv4.clone(),
            region: self.region.clone(),
            class: self.class.clone(),
            ip_type: self.ip_type.clone(),
            hidden: self.hidden,
            domain: self.domain.clone(),
            sub_id: self.owner_sub_id.clone(),
            operation_id: self.operation_id.clone(),
            instance_id: self.instance_id.clone(),
            registered_at: rfc3339(self.registered_ms),
            registrations: self.registrations,
            usage_reports: self.usage_reports,
            traffic_used_bytes: self.usage.used_bytes,
            quota_cutoff: self.quota_cutoff,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AdminNode {
    pub name: String,
    pub ipv4: String,
    pub region: String,
    pub class: String,
    pub ip_type: String,
    pub hidden: bool,
    pub domain: String,
    pub sub_id: Option<String>,
    pub operation_id: Option<String>,
    pub instance_id: Option<String>,
    pub registered_at: String,
    pub registrations: u32,
    pub usage_reports: u32,
    /// Center's ledger: billable bytes (rx + tx) since the node's first report.
    pub traffic_used_bytes: u64,
    /// Center's own cut-off reached (≥ 95 % of the sold quota).
    pub quota_cutoff: bool,
}

/// A guardrail breach the simulator saw. `detail` never holds a secret.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Violation {
    /// `down`, `duplicate_instance`, `secret_on_command_line`, `write_outside_deploy_dir`,
    /// `foreign_claim`, `secret_in_center_call`.
    pub kind: &'static str,
    pub at: String,
    pub instance_id: Option<String>,
    pub instance_name: Option<String>,
    pub operation_id: Option<String>,
    pub detail: String,
}

impl Violation {
    pub fn new(kind: &'static str, detail: impl Into<String>) -> Violation {
        Violation { kind, at: rfc3339(kit::now_ms()), instance_id: None, instance_name: None, operation_id: None, detail: detail.into() }
    }

    pub fn on(mut self, instance_id: &str, instance_name: &str) -> Violation {
        self.instance_id = Some(instance_id.to_string());
        self.instance_name = Some(instance_name.to_string());
        self
    }

    pub fn op(mut self, operation_id: &str) -> Violation {
        self.operation_id = Some(operation_id.to_string());
        self
    }
}

pub struct State {
    pub ops: Operations,
    pub cloud: Cloud,
    /// Registered nodes by name.
    pub nodes: BTreeMap<String, NodeRec>,
    /// Registered nodes by address (the Basic `ipv4:` of `/slave/usage`).
    pub node_by_ip: HashMap<Ipv4Addr, String>,
    pub violations: Vec<Violation>,
    /// Every node secret seen (in a `.env` or a registration), in order, no duplicates.
    pub node_secrets: Vec<String>,
    /// The same secrets, for lookups, and their distinct lengths (see `contains_any`).
    node_secret_set: HashSet<String>,
    node_secret_lens: BTreeSet<usize>,
    pub faults: Faults,
    pub dice: Dice,
    /// MCP sessions handed out by `initialize`.
    pub sessions: HashSet<String>,
}

impl State {
    pub fn tick(&mut self) {
        let now = kit::now_ms();
        for ev in self.ops.tick(now, self.faults.operation_timeout_ms) {
            tracing::info!(event = ?ev, "operation sweep");
        }
    }

    /// Rolls the dice with the probability `knob` picks from the current faults.
    pub fn dice_roll(&mut self, knob: impl Fn(&Faults) -> f64) -> bool {
        let p = knob(&self.faults);
        self.dice.roll(p)
    }

    pub fn violate(&mut self, v: Violation) {
        tracing::warn!(kind = v.kind, instance = ?v.instance_id, detail = %v.detail, "guardrail violation");
        self.violations.push(v);
    }

    pub fn learn_node_secret(&mut self, secret: &str) {
        if !secret.is_empty() && self.node_secret_set.insert(secret.to_string()) {
            self.node_secret_lens.insert(secret.len());
            self.node_secrets.push(secret.to_string());
        }
    }

    /// Which kind of secret `text` contains, if any (claim tokens ever issued, node secrets seen).
    pub fn find_secret(&self, text: &str) -> Option<&'static str> {
        if self.ops.token_in(text) {
            return Some("claim token");
        }
        if contains_any(text, &self.node_secret_lens, |w| self.node_secret_set.contains(w)) {
            return Some("node secret");
        }
        None
    }
}

/// Whether `text` contains a string for which `is_secret` holds, trying every substring of the
/// given lengths: one lookup per position and length, whatever the number of secrets. (A
/// `contains` per secret made every exec and every Center update cost O(operations ever
/// claimed), under the state lock.)
pub fn contains_any(text: &str, lens: &BTreeSet<usize>, is_secret: impl Fn(&str) -> bool) -> bool {
    for &len in lens {
        if len == 0 || len > text.len() {
            continue;
        }
        for start in 0..=text.len() - len {
            if let Some(w) = text.get(start..start + len)
                && is_secret(w)
            {
                return true;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_found_anywhere_in_a_text_like_contains_would() {
        let secrets: HashSet<String> = ["a1b2c3d4".to_string(), "zz9".to_string(), "é€x".to_string()].into_iter().collect();
        let lens: BTreeSet<usize> = secrets.iter().map(String::len).collect();
        let found = |t: &str| contains_any(t, &lens, |w| secrets.contains(w));
        let naive = |t: &str| secrets.iter().any(|s| t.contains(s.as_str()));
        for t in [
            "",
            "a1b2c3d",
            "echo a1b2c3d4",
            "xa1b2c3d4y",
            "K2_NODE_SECRET=zz9",
            "zz",
            "ü€é€x…",
            "é€",
            "tee /apps/kaitu-slave/.env",
        ] {
            assert_eq!(found(t), naive(t), "{t:?}");
        }
        assert!(!contains_any("anything", &BTreeSet::new(), |_| true));
    }
}
