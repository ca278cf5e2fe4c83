//! Fault knobs and timings (`GET/PUT /admin/faults`) and the seeded dice that decide when a
//! fault fires. For a given seed and the same sequence of decisions the outcomes are the same;
//! a PUT that names `seed` restarts the sequence. Decisions with probability 0 or 1 draw no
//! number, so switching one knob on does not shift the others.
//!
//! Never used for secrets: claim tokens and host keys come from the OS generator, not from here.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Every knob; JSON camelCase. `PUT /admin/faults` merges a partial object into this.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Faults {
    /// Probability that a `tools/call` answers a transient 503 (before doing anything).
    pub center_error_rate: f64,
    /// Added to every `tools/call`.
    pub center_latency_ms: u64,
    /// Probability that Center's node ingress (`/slave/register`, `/slave/usage`) answers a
    /// transient 503 before doing anything: a Center outage as the nodes see it (the ingress in
    /// front still mirrors `/slave/usage` to the meter).
    pub slave_error_rate: f64,
    /// Probability that a claim of a queued operation answers 409 anyway.
    pub claim_conflict_rate: f64,
    /// Probability that a new SSH connection, or an exec on one, is dropped (nothing runs).
    pub ssh_drop_rate: f64,
    /// Probability that `sudo bash -s` (the prep) exits 1 after its delay, leaving the host as it was.
    pub prep_fail_rate: f64,
    /// From `create_cloud_instance` to `running`.
    pub boot_delay_ms: u64,
    /// From `up -d` to the sidecar's registration call.
    pub registration_delay_ms: u64,
    /// Sidecars never register (so the timeout sweep fails their operations).
    pub never_register: bool,
    /// How long the prep script runs.
    pub prep_delay_ms: u64,
    /// The sidecars' usage reporting interval.
    pub usage_interval_ms: u64,
    /// An operation not `done` this long after its first claim is failed by the sweep.
    pub operation_timeout_ms: u64,
    /// The dice's seed.
    pub seed: u64,
    /// Probability that `create_cloud_instance` answers 503 "plan unavailable".
    pub create_fail_rate: f64,
    /// Probability that an instance reaches `running` without an ipv4.
    pub no_ip_rate: f64,
    /// Probability that `update_node_operation` alone answers a transient 503 (before doing
    /// anything); the other tools and the nodes' registration are unaffected.
    pub update_operation_error_rate: f64,
    /// Extra lines the emulated k2s and k2-sidecar log right after their start-up lines (so
    /// `server ready` is far out of any `docker logs --tail`). At most 10,000,000.
    pub log_noise_lines: u64,
    // ---- Center assumptions (issue #19): each knob turns one guess about Center off. ----
    /// Every list tool answers at most this many items per page, whatever `pageSize` asks
    /// (1–100; 100 is the sim's own cap). Below the client's page size, a short page is not
    /// the last one.
    pub max_page_size: u64,
    /// `update_node_operation(in_progress)` by the holder extends the lease. False: it does
    /// not; only a claim does (a claim by the current holder renews the lease).
    pub lease_extends_on_progress: bool,
    /// `list_node_operations` honours its `id` filter. False: the filter is accepted and
    /// ignored — the whole list comes back.
    pub id_filter: bool,
    /// Center has the `update_node` tool (the meter's hide/show). False: the tool does not
    /// exist (not in `tools/list`; a call is an unknown-tool error).
    pub update_node_tool: bool,
    /// Center has the `delete_cloud_instance` tool (the reaper). False: as `updateNodeTool`.
    pub delete_instance_tool: bool,
    /// The argument names the tools' schemas publish and accept (see `ArgCase`).
    pub arg_case: ArgCase,
    // ---- The cloud's side (issue #19, item 4) and the nodes (item 3). ----
    /// The provider's firewall in front of every instance: only 22/tcp is open until a port
    /// is opened through the cloud tool `open_cloud_instance_ports`; a connection to a closed
    /// port (the sim's fresh SSH port plays 22, the hardened one 1022) is refused.
    pub provider_firewall: bool,
    /// Center has the `open_cloud_instance_ports` tool (an assumption: the seeds do not list
    /// it). False: the tool does not exist.
    pub firewall_tool: bool,
    /// Probability that an instance comes up with cloud-init in error: on the host,
    /// `cloud-init status` says `status: error` and exits 1 (the provider itself reports a
    /// `running` instance, as real ones do).
    pub cloud_init_error_rate: f64,
    /// Cloud accounts whose every `create_cloud_instance` answers 503 "plan unavailable"
    /// (a provider down in every region).
    pub create_fail_accounts: Vec<String>,
    /// When above `bootDelayMs`, each instance boots after a delay drawn uniformly from
    /// `bootDelayMs..=bootDelayMaxMs`; 0: exactly `bootDelayMs`.
    pub boot_delay_max_ms: u64,
}

/// How strictly tool argument names are checked, and which spelling the schemas publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ArgCase {
    /// Exactly the names runbook 000 shows — `account_name`, `image_id` (snake) beside
    /// `leaseSeconds`, `pageSize` (camel) — and nothing else.
    #[default]
    Runbook,
    /// Every multi-word name in camelCase (`accountName`, `imageId`, `leaseSeconds`,
    /// `pageSize`); the snake spelling is unknown.
    Camel,
    /// Every multi-word name in snake_case (`account_name`, `image_id`, `lease_seconds`,
    /// `page_size`); the camel spelling is unknown.
    Snake,
    /// Forgiving: the published (runbook) names in either spelling.
    Any,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            center_error_rate: 0.0,
            center_latency_ms: 0,
            slave_error_rate: 0.0,
            claim_conflict_rate: 0.0,
            ssh_drop_rate: 0.0,
            prep_fail_rate: 0.0,
            boot_delay_ms: 500,
            registration_delay_ms: 200,
            never_register: false,
            prep_delay_ms: 300,
            usage_interval_ms: 2000,
            operation_timeout_ms: 1_800_000,
            seed: 0,
            create_fail_rate: 0.0,
            no_ip_rate: 0.0,
            update_operation_error_rate: 0.0,
            log_noise_lines: 0,
            max_page_size: 100,
            lease_extends_on_progress: true,
            id_filter: true,
            update_node_tool: true,
            delete_instance_tool: true,
            arg_case: ArgCase::Runbook,
            provider_firewall: false,
            firewall_tool: true,
            cloud_init_error_rate: 0.0,
            create_fail_accounts: Vec::new(),
            boot_delay_max_ms: 0,
        }
    }
}

impl Faults {
    /// The `realistic` preset (`--realistic`, or `PUT /admin/faults {"preset": "realistic"}`):
    /// a real cloud's timings — boot 30–90 s, the OS prep ~120 s, usage reports every 60 s,
    /// registration a few seconds after `up -d`. Everything else as `base`.
    pub fn realistic(base: &Faults) -> Faults {
        Faults {
            boot_delay_ms: 30_000,
            boot_delay_max_ms: 90_000,
            prep_delay_ms: 120_000,
            usage_interval_ms: 60_000,
            registration_delay_ms: 5_000,
            ..base.clone()
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FaultsError {
    #[error("faults must be a JSON object")]
    NotAnObject,
    #[error("bad faults: {0}")]
    Invalid(String),
    #[error("{0} must be between 0 and 1")]
    RateOutOfRange(&'static str),
    #[error("usageIntervalMs must be at least 10")]
    IntervalTooSmall,
    #[error("logNoiseLines must be at most 10000000")]
    TooMuchNoise,
    #[error("maxPageSize must be between 1 and 100")]
    PageSizeOutOfRange,
}

impl Faults {
    /// Merges a partial JSON object into a copy of `self`; unknown keys and wrong types fail.
    pub fn merged(&self, patch: &Value) -> Result<Faults, FaultsError> {
        let patch = patch.as_object().ok_or(FaultsError::NotAnObject)?;
        // `preset` applies a named set of timings first; the other keys go on top of it.
        let base = match patch.get("preset") {
            None => self.clone(),
            Some(Value::String(p)) if p == "realistic" => Faults::realistic(self),
            Some(Value::String(p)) if p == "fast" => {
                let d = Faults::default();
                Faults {
                    boot_delay_ms: d.boot_delay_ms,
                    boot_delay_max_ms: d.boot_delay_max_ms,
                    prep_delay_ms: d.prep_delay_ms,
                    usage_interval_ms: d.usage_interval_ms,
                    registration_delay_ms: d.registration_delay_ms,
                    ..self.clone()
                }
            }
            Some(_) => return Err(FaultsError::Invalid("preset must be \"realistic\" or \"fast\"".into())),
        };
        let mut patch = patch.clone();
        patch.remove("preset");
        let mut cur = serde_json::to_value(&base).map_err(|e| FaultsError::Invalid(e.to_string()))?;
        if let Some(obj) = cur.as_object_mut() {
            for (k, v) in patch {
                obj.insert(k, v);
            }
        }
        let next: Faults = serde_json::from_value(cur).map_err(|e| FaultsError::Invalid(e.to_string()))?;
        next.validate()?;
        Ok(next)
    }

    fn validate(&self) -> Result<(), FaultsError> {
        let rates = [
            ("centerErrorRate", self.center_error_rate),
            ("slaveErrorRate", self.slave_error_rate),
            ("claimConflictRate", self.claim_conflict_rate),
            ("sshDropRate", self.ssh_drop_rate),
            ("prepFailRate", self.prep_fail_rate),
            ("createFailRate", self.create_fail_rate),
            ("noIpRate", self.no_ip_rate),
            ("updateOperationErrorRate", self.update_operation_error_rate),
            ("cloudInitErrorRate", self.cloud_init_error_rate),
        ];
        for (name, r) in rates {
            if !(0.0..=1.0).contains(&r) {
                return Err(FaultsError::RateOutOfRange(name));
            }
        }
        if self.usage_interval_ms < 10 {
            return Err(FaultsError::IntervalTooSmall);
        }
        if self.log_noise_lines > 10_000_000 {
            return Err(FaultsError::TooMuchNoise);
        }
        if !(1..=100).contains(&self.max_page_size) {
            return Err(FaultsError::PageSizeOutOfRange);
        }
        Ok(())
    }
}

/// The seeded random source behind every fault decision and the NIC chatter.
pub struct Dice {
    rng: StdRng,
}

impl Dice {
    pub fn new(seed: u64) -> Dice {
        Dice { rng: StdRng::seed_from_u64(seed) }
    }

    /// True with probability `p`.
    pub fn roll(&mut self, p: f64) -> bool {
        if p <= 0.0 {
            false
        } else if p >= 1.0 {
            true
        } else {
            self.rng.random::<f64>() < p
        }
    }

    /// A number in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo { lo } else { self.rng.random_range(lo..=hi) }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_keeps_unnamed_knobs_and_rejects_nonsense() {
        let f = Faults::default();
        let g = f.merged(&json!({"centerErrorRate": 1.0, "prepDelayMs": 5})).unwrap();
        assert_eq!(g.center_error_rate, 1.0);
        assert_eq!(g.prep_delay_ms, 5);
        assert_eq!(g.boot_delay_ms, 500);
        assert!(matches!(f.merged(&json!({"centerErrorRate": 1.5})), Err(FaultsError::RateOutOfRange(_))));
        assert!(matches!(f.merged(&json!({"bogus": 1})), Err(FaultsError::Invalid(_))));
        assert!(matches!(f.merged(&json!({"bootDelayMs": "x"})), Err(FaultsError::Invalid(_))));
        assert_eq!(f.merged(&json!([])), Err(FaultsError::NotAnObject));
    }

    #[test]
    fn the_update_operation_knob_is_a_rate() {
        let f = Faults::default();
        assert_eq!(f.update_operation_error_rate, 0.0);
        assert_eq!(f.merged(&json!({"updateOperationErrorRate": 1.0})).unwrap().update_operation_error_rate, 1.0);
        assert_eq!(f.merged(&json!({"updateOperationErrorRate": -0.1})), Err(FaultsError::RateOutOfRange("updateOperationErrorRate")));
    }

    #[test]
    fn the_assumption_knobs_default_to_the_assumption_and_validate() {
        let f = Faults::default();
        assert_eq!((f.max_page_size, f.lease_extends_on_progress, f.id_filter, f.update_node_tool, f.delete_instance_tool), (100, true, true, true, true));
        assert_eq!(f.arg_case, ArgCase::Runbook);
        let g = f.merged(&json!({"maxPageSize": 7, "leaseExtendsOnProgress": false, "idFilter": false, "updateNodeTool": false, "deleteInstanceTool": false, "argCase": "snake"})).unwrap();
        assert_eq!((g.max_page_size, g.lease_extends_on_progress, g.id_filter, g.update_node_tool, g.delete_instance_tool), (7, false, false, false, false));
        assert_eq!(g.arg_case, ArgCase::Snake);
        assert_eq!(serde_json::to_value(&g).unwrap()["argCase"], "snake");
        assert_eq!(f.merged(&json!({"maxPageSize": 0})), Err(FaultsError::PageSizeOutOfRange));
        assert_eq!(f.merged(&json!({"maxPageSize": 101})), Err(FaultsError::PageSizeOutOfRange));
        assert!(matches!(f.merged(&json!({"argCase": "kebab"})), Err(FaultsError::Invalid(_))));
    }

    #[test]
    fn the_cloud_knobs_and_the_realistic_preset() {
        let f = Faults::default();
        assert!(!f.provider_firewall && f.firewall_tool && f.create_fail_accounts.is_empty());
        let g = f
            .merged(&json!({"providerFirewall": true, "firewallTool": false, "cloudInitErrorRate": 1.0, "createFailAccounts": ["a"], "bootDelayMaxMs": 9}))
            .unwrap();
        assert!(g.provider_firewall && !g.firewall_tool);
        assert_eq!((g.cloud_init_error_rate, g.create_fail_accounts.clone(), g.boot_delay_max_ms), (1.0, vec!["a".to_string()], 9));
        assert_eq!(f.merged(&json!({"cloudInitErrorRate": 2.0})), Err(FaultsError::RateOutOfRange("cloudInitErrorRate")));
        // One switch: the preset's timings, other keys on top, the rest untouched.
        let r = g.merged(&json!({"preset": "realistic", "prepDelayMs": 100_000})).unwrap();
        assert_eq!((r.boot_delay_ms, r.boot_delay_max_ms, r.prep_delay_ms, r.usage_interval_ms), (30_000, 90_000, 100_000, 60_000));
        assert!(r.provider_firewall, "knobs outside the preset stay");
        let back = r.merged(&json!({"preset": "fast"})).unwrap();
        assert_eq!((back.boot_delay_ms, back.boot_delay_max_ms, back.prep_delay_ms), (500, 0, 300));
        assert!(matches!(f.merged(&json!({"preset": "slow"})), Err(FaultsError::Invalid(_))));
    }

    #[test]
    fn same_seed_same_decisions() {
        let mut a = Dice::new(7);
        let mut b = Dice::new(7);
        let xs: Vec<bool> = (0..64).map(|_| a.roll(0.5)).collect();
        let ys: Vec<bool> = (0..64).map(|_| b.roll(0.5)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().any(|x| *x) && xs.iter().any(|x| !*x));
        assert!((0..100).all(|_| !a.roll(0.0) && a.roll(1.0)));
    }
}
