//! The meter's settings: `kit::config::Common` (flattened, so `PN_NATS_URL`, `PN_DATA_DIR`, …)
//! plus the ingest listener, the coalescing interval, per-provider count modes, the hostile-input
//! limits and the quota ratios. Validation happens once, at start, naming the offending key.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use kit::config::Common;
use kit::secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// Which NIC bytes count against the sold quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CountMode {
    /// Received plus transmitted bytes (most providers bill both directions).
    #[default]
    #[serde(alias = "rx+tx", alias = "rxtx", alias = "both")]
    RxTx,
    /// Transmitted bytes only (providers that bill egress only).
    #[serde(alias = "egress")]
    Tx,
}

impl CountMode {
    /// The billable part of a (rx, tx) pair; saturating, never wrapping.
    pub fn count(self, rx: u64, tx: u64) -> u64 {
        match self {
            CountMode::RxTx => rx.saturating_add(tx),
            CountMode::Tx => tx,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CountMode::RxTx => "rx_tx",
            CountMode::Tx => "tx",
        }
    }
}

/// Everything svc-meter reads from `PN_*`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Settings {
    #[serde(flatten)]
    pub common: Common,
    /// The public listener (`PN_LISTEN`): `POST /slave/usage` (the mirrored reports) and
    /// `GET /v1/admission/<node>` (200/402, nothing else), `/healthz`. Nothing else is served
    /// there.
    pub listen: SocketAddr,
    /// The internal listener (`PN_INTERNAL_LISTEN`, loopback by default): the ledger
    /// (`GET /v1/nodes`, `GET /v1/nodes/<node>/usage`) and the operator's quota change
    /// (`PUT /v1/nodes/<node>/quota`), each only with `Authorization: Bearer
    /// <PN_INTERNAL_TOKEN>`. Never on the public port.
    pub internal_listen: SocketAddr,
    /// The internal listener's bearer token (`PN_INTERNAL_TOKEN`); unset or empty, the internal
    /// listener is not started at all.
    pub internal_token: Option<SecretString>,
    /// At most one `meter.usage.<node>` per node per this many milliseconds.
    pub usage_interval_ms: u64,
    /// Per provider (lower-case name, e.g. `PN_COUNT_MODES__HETZNER=tx`); others count rx+tx.
    pub count_modes: HashMap<String, CountMode>,
    /// A counter jump above this × (seconds since the last accepted report + 1) is refused.
    pub max_link_bytes_per_sec: u64,
    /// Reports of one node closer together than this get 429.
    pub min_report_interval_ms: u64,
    /// Larger `/slave/usage` bodies get 413.
    pub body_limit_bytes: usize,
    /// Any request taking longer gets 408.
    pub request_timeout_ms: u64,
    /// `ok → warn` at this fraction of the sold quota.
    pub warn_ratio: f64,
    /// `→ cutoff` (402 + hidden at Center) at this fraction of the sold quota.
    pub cutoff_ratio: f64,
    /// A report whose `at` is further ahead of the meter's clock than this is refused (422),
    /// and a `pn.op.deployed` whose `deployed_at_ms` is that far ahead is dropped
    /// (`PN_MAX_CLOCK_AHEAD_MS`).
    pub max_clock_ahead_ms: u64,
    /// Failed authentications one source may spend at once (`PN_AUTH_FAIL_BURST`); past that
    /// its reports get 429 before their credentials are even read. 0 turns the limit off.
    pub auth_fail_burst: u32,
    /// How fast a source's failure budget refills, per second (`PN_AUTH_FAIL_PER_SEC`).
    pub auth_fail_per_sec: f64,
    /// Sources whose failures are remembered at once (`PN_AUTH_FAIL_SOURCES`); beyond, new
    /// sources share one budget.
    pub auth_fail_sources: usize,
    /// Connections from these networks are proxies whose `X-Forwarded-For` names the source
    /// (`PN_TRUSTED_PROXIES`, comma-separated addresses/CIDRs). The default trusts loopback
    /// and the private ranges, where Traefik (in k8s) and `pn-ingress` (dev stack) connect
    /// from; nodes report from public addresses. Narrow it to the pod network where other
    /// in-cluster clients could reach the meter.
    pub trusted_proxies: String,
    /// At most one "wrong secret" warning per node per this interval, with the count
    /// (`PN_WRONG_SECRET_LOG_INTERVAL_MS`).
    pub wrong_secret_log_interval_ms: u64,
    /// The cloud the nodes live in (`PN_PROVIDER`: `center` | `hetzner`), asked before a
    /// `pn.op.deployed` may change a known node's address or secret hash (or take an address
    /// another node holds): the instance must be named as the node and hold that IPv4.
    pub provider: String,
    /// The `center` provider's cloud account (`PN_ACCOUNT`); empty: any account Center lists.
    pub account: String,
    /// The `hetzner` provider's API (`PN_HETZNER__API_URL`, a read-only `PN_HETZNER__TOKEN`).
    pub hetzner: kit::cloud::hetzner::HetznerSettings,
    /// Durable consumer name on `pn.op.deployed` (`PN_DEPLOYED_CONSUMER`); only an in-process
    /// bench meter changes it, so that it never shares the real meter's consumer.
    pub deployed_consumer: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            common: Common::default(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8090)),
            internal_listen: SocketAddr::from(([127, 0, 0, 1], 8091)),
            internal_token: None,
            usage_interval_ms: 10_000,
            count_modes: HashMap::new(),
            max_link_bytes_per_sec: 1_250_000_000,
            min_report_interval_ms: 100,
            body_limit_bytes: 4096,
            request_timeout_ms: 5000,
            warn_ratio: 0.8,
            cutoff_ratio: 0.95,
            deployed_consumer: "svc-meter-deployed".into(),
            max_clock_ahead_ms: 300_000,
            auth_fail_burst: 20,
            auth_fail_per_sec: 1.0,
            auth_fail_sources: 65_536,
            trusted_proxies: "127.0.0.0/8,::1,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7".into(),
            wrong_secret_log_interval_ms: 60_000,
            provider: "center".into(),
            account: String::new(),
            hetzner: Default::default(),
        }
    }
}

/// A setting that cannot work; the message names its `PN_` variable.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("configuration: {0}")]
pub struct SettingsError(pub String);

impl Settings {
    /// Checks the values that serde cannot (ranges, relations).
    pub fn validate(&self) -> Result<(), SettingsError> {
        let ratio_ok = |r: f64| r.is_finite() && r > 0.0 && r <= 100.0;
        if !ratio_ok(self.warn_ratio) {
            return Err(SettingsError("PN_WARN_RATIO must be a number in (0, 100]".into()));
        }
        if !ratio_ok(self.cutoff_ratio) {
            return Err(SettingsError("PN_CUTOFF_RATIO must be a number in (0, 100]".into()));
        }
        if self.warn_ratio > self.cutoff_ratio {
            return Err(SettingsError("PN_WARN_RATIO must not exceed PN_CUTOFF_RATIO".into()));
        }
        if self.body_limit_bytes == 0 {
            return Err(SettingsError("PN_BODY_LIMIT_BYTES must be positive".into()));
        }
        if self.request_timeout_ms == 0 {
            return Err(SettingsError("PN_REQUEST_TIMEOUT_MS must be positive".into()));
        }
        if !proto::subjects::is_token(&self.deployed_consumer) {
            return Err(SettingsError("PN_DEPLOYED_CONSUMER must be a NATS name token".into()));
        }
        if self.internal_listen == self.listen {
            return Err(SettingsError("PN_INTERNAL_LISTEN must differ from PN_LISTEN (the internal API is never public)".into()));
        }
        if self.internal_token.as_ref().is_some_and(|t| !t.expose_secret().is_empty() && t.expose_secret().len() < 16) {
            return Err(SettingsError("PN_INTERNAL_TOKEN must have at least 16 characters".into()));
        }
        if let Err(e) = crate::auth::TrustedProxies::parse(&self.trusted_proxies) {
            return Err(SettingsError(format!("PN_TRUSTED_PROXIES: {e}")));
        }
        if !self.auth_fail_per_sec.is_finite() || self.auth_fail_per_sec < 0.0 {
            return Err(SettingsError("PN_AUTH_FAIL_PER_SEC must be a non-negative number".into()));
        }
        if !matches!(self.provider.as_str(), "center" | "hetzner") {
            return Err(SettingsError("PN_PROVIDER must be center or hetzner".into()));
        }
        if self.max_link_bytes_per_sec == 0 {
            return Err(SettingsError("PN_MAX_LINK_BYTES_PER_SEC must be positive".into()));
        }
        Ok(())
    }

    /// The count mode of a provider (case-insensitive); rx+tx when not configured.
    pub fn count_mode(&self, provider: &str) -> CountMode {
        let p = provider.trim();
        self.count_modes.iter().find(|(k, _)| k.trim().eq_ignore_ascii_case(p)).map(|(_, m)| *m).unwrap_or_default()
    }

    /// The internal listener's token, when the internal API is enabled.
    pub fn internal_token(&self) -> Option<SecretString> {
        self.internal_token.clone().filter(|t| !t.expose_secret().is_empty())
    }

    pub fn usage_interval(&self) -> Duration {
        Duration::from_millis(self.usage_interval_ms.max(1))
    }

    pub fn thresholds(&self) -> crate::quota::Thresholds {
        crate::quota::Thresholds::new(self.warn_ratio, self.cutoff_ratio)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let s = Settings::default();
        assert_eq!(s.listen.port(), 8090);
        assert_eq!(s.usage_interval_ms, 10_000);
        assert_eq!(s.body_limit_bytes, 4096);
        assert_eq!(s.count_mode("anything"), CountMode::RxTx);
        assert!(s.validate().is_ok());
    }

    #[test]
    fn count_modes_are_per_provider_and_case_insensitive() {
        let mut s = Settings::default();
        s.count_modes.insert("hetzner".into(), CountMode::Tx);
        assert_eq!(s.count_mode("Hetzner"), CountMode::Tx);
        assert_eq!(s.count_mode("lightsail"), CountMode::RxTx);
        assert_eq!(CountMode::Tx.count(5, 7), 7);
        assert_eq!(CountMode::RxTx.count(u64::MAX, 7), u64::MAX);
    }

    #[test]
    fn bad_ratios_are_refused_by_name() {
        let s = Settings { warn_ratio: 0.99, cutoff_ratio: 0.95, ..Settings::default() };
        assert!(s.validate().err().is_some_and(|e| e.0.contains("PN_WARN_RATIO")));
        let s = Settings { cutoff_ratio: f64::NAN, ..Settings::default() };
        assert!(s.validate().err().is_some_and(|e| e.0.contains("PN_CUTOFF_RATIO")));
    }
}
