//! `<data_dir>/stack.json`: where everything of a running dev stack is (pids, URLs, ports).

use std::collections::BTreeMap;
use std::fs::{self};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::*;

// ---------------------------------------------------------------------------------------------
// stack.json

/// `./.pn/stack.json`.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StackFile {
    pub nats_url: String,
    /// `null` while nats-server is being restarted.
    pub nats_pid: Option<u32>,
    pub center_url: String,
    pub meter_url: String,
    /// svc-meter's internal listener (the ledger, quota changes; a bearer token from
    /// `secrets/meter-internal-token`). Empty in files of older stacks.
    #[serde(default)]
    pub meter_internal_url: String,
    /// `pn-ingress`, Center's public host as the nodes see it (their `K2_CENTER_URL`).
    #[serde(default)]
    pub ingress_url: String,
    /// The five services, center-sim and pn-ingress, by name.
    pub services: BTreeMap<String, ServiceEntry>,
    /// How many times each child (services, center-sim, nats-server) was restarted.
    pub restarts: BTreeMap<String, u32>,
    pub supervisor_pid: u32,
    /// `starting` → `ready` → `stopping` → `stopped`.
    #[serde(default)]
    pub state: StackState,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntry {
    /// `null` while the child is being restarted.
    pub pid: Option<u32>,
    pub ops_url: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StackState {
    #[default]
    Starting,
    Ready,
    Stopping,
    Stopped,
}

impl StackFile {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("stack.json")
    }

    pub fn read(data_dir: &Path) -> anyhow::Result<StackFile> {
        let p = StackFile::path(data_dir);
        let text = fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not a pnctl stack file", p.display()))
    }

    /// Written to a temporary file and renamed, so a reader never sees half a file.
    pub(super) fn write(&self, data_dir: &Path) -> anyhow::Result<()> {
        let p = StackFile::path(data_dir);
        let tmp = data_dir.join(".stack.json.tmp");
        let text = serde_json::to_string_pretty(self)?;
        fs::write(&tmp, text + "\n").with_context(|| format!("write {}", tmp.display()))?;
        fs::rename(&tmp, &p).with_context(|| format!("rename to {}", p.display()))?;
        Ok(())
    }

    /// Every child pid the file records, with the child's name.
    pub fn child_pids(&self) -> Vec<(String, u32)> {
        let mut v: Vec<(String, u32)> =
            self.services.iter().filter_map(|(n, s)| s.pid.map(|p| (n.clone(), p))).collect();
        if let Some(p) = self.nats_pid {
            v.push((NATS.to_string(), p));
        }
        v
    }
}

/// The stack in `data_dir` when its supervisor is alive and reports it ready.
pub fn running(data_dir: &Path) -> Option<StackFile> {
    let s = StackFile::read(data_dir).ok()?;
    (s.state == StackState::Ready && is_supervisor(s.supervisor_pid)).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stack_file_has_the_documented_shape() {
        let mut s = StackFile {
            nats_url: "nats://127.0.0.1:1".into(),
            nats_pid: Some(7),
            center_url: "http://127.0.0.1:2".into(),
            meter_url: "http://127.0.0.1:3".into(),
            ingress_url: "http://127.0.0.1:5".into(),
            supervisor_pid: 9,
            state: StackState::Ready,
            ..Default::default()
        };
        s.services.insert("svc-cloud".into(), ServiceEntry { pid: Some(8), ops_url: "http://127.0.0.1:4".into() });
        s.restarts.insert("svc-cloud".into(), 1);
        let v = serde_json::to_value(&s).unwrap_or_default();
        for k in ["natsUrl", "natsPid", "centerUrl", "meterUrl", "ingressUrl", "services", "restarts", "supervisorPid", "state"] {
            assert!(v.get(k).is_some(), "{k} missing in {v}");
        }
        assert_eq!(v["services"]["svc-cloud"]["opsUrl"], "http://127.0.0.1:4");
        assert_eq!(v["services"]["svc-cloud"]["pid"], 8);
        assert_eq!(v["state"], "ready");
        let back: StackFile = serde_json::from_value(v).unwrap_or_default();
        assert_eq!(back, s);
        assert_eq!(back.child_pids().len(), 2);
    }
}
