//! Layered configuration: serde defaults → optional TOML file (`PN_CONFIG`) → `PN_…`
//! environment (`__` nests: `PN_SSH__FRESH_PORT` is `ssh.fresh_port`). A bad value fails at
//! start naming its key. Secrets are `SecretString`s and print as redacted.

use std::net::SocketAddr;
use std::path::PathBuf;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// A configuration that could not be loaded; the message names the offending key.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

/// Loads `T` from the TOML file named by `PN_CONFIG` (if any) and the `PN_` environment.
pub fn load<T: DeserializeOwned>() -> Result<T, ConfigError> {
    let mut fig = Figment::new();
    if let Ok(path) = std::env::var("PN_CONFIG") {
        fig = fig.merge(Toml::file(path));
    }
    fig = fig.merge(Env::prefixed("PN_").split("__"));
    fig.extract().map_err(|e| {
        // figment's message names the key ("for key `default.x`"); values of secret fields are
        // strings and can never fail to parse, so no secret is echoed here.
        ConfigError(e.to_string())
    })
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human on a terminal, JSON otherwise (containers, log files).
    #[default]
    Auto,
    Human,
    Json,
}

impl LogFormat {
    /// `PN_LOG_FORMAT` (`json`, `human`; anything else is `Auto`), for the processes that
    /// read no service settings (center-sim, pn-ingress).
    pub fn from_env() -> LogFormat {
        match std::env::var("PN_LOG_FORMAT").unwrap_or_default().as_str() {
            "json" => LogFormat::Json,
            "human" => LogFormat::Human,
            _ => LogFormat::Auto,
        }
    }
}

/// What every service needs. Flattened into each service's settings, so the keys are
/// top-level: `PN_NATS_URL`, `PN_SEAL_KEY`, `PN_CENTER_TOKEN`, …
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Common {
    pub nats_url: String,
    /// This service's NATS identity (`PN_NATS_USER`, e.g. `svc-claimer`); with
    /// `PN_NATS_PASSWORD`. Both unset: no credentials (only a server without authorization
    /// accepts that; every Pnp server has it, see `kit::nats_auth`).
    pub nats_user: Option<String>,
    /// The password of `PN_NATS_USER` (`PN_NATS_PASSWORD`); never logged.
    pub nats_password: Option<SecretString>,
    /// PEM file with the CA that signed the NATS server's certificate (`PN_NATS_CA_FILE`); when
    /// set the connection must be TLS and the server's certificate is checked against it.
    pub nats_ca_file: Option<PathBuf>,
    pub data_dir: PathBuf,
    pub ops_listen: SocketAddr,
    pub center_url: String,
    pub center_token: Option<SecretString>,
    pub seal_key: Option<SecretString>,
    /// `PN_OPS_TOKEN`: the operator token. Every mutating (non-GET) route of the ops listener
    /// (svc-cloud's `POST /v1/reap/<op>/confirm`, svc-claimer's `POST /v1/ops/<op>/abandon`)
    /// requires `Authorization: Bearer <PN_OPS_TOKEN>` (else 401); unset or empty, those routes
    /// answer 403 "operator token not configured" — never open. `/healthz`, `/readyz`,
    /// `/metrics` and the read-only GETs stay open. At least 16 characters. Only the services
    /// with such routes get it (k8s Secret `pn-ops-token`: svc-cloud, svc-claimer); `pnctl`
    /// sends it from `PN_OPS_TOKEN` or the dev stack's `secrets/ops-token`.
    pub ops_token: Option<SecretString>,
    pub log_format: LogFormat,
    /// Messages handled at once per consumer.
    pub max_in_flight: usize,
    /// Center call timeout, milliseconds.
    pub center_timeout_ms: u64,
    /// JetStream AckWait for this service's consumers, milliseconds (progress acks extend it).
    pub ack_wait_ms: u64,
    /// Deliveries of one message before the operation fails.
    pub max_deliver: i64,
    /// Operations a stage may keep parked while they wait on something slow outside (a node's
    /// OS prep): each costs a stored record and a pending JetStream message, not a handler.
    pub max_parked: i64,
    /// sled's page cache, MiB: how much of the stored records stays in memory.
    pub state_cache_mb: u64,
    /// JetStream replicas for the streams this service creates (3 on a 3-server cluster).
    pub stream_replicas: usize,
    /// `PN_GAUGE_SAMPLE_MS`: how often the gauges read from the service's own state are
    /// sampled (`pn_ops_in_flight`, `pn_ops_parked`, `pn_ops_overdue`, `pn_meter_nodes`,
    /// `pn_relay_backlog`; `kit::ops::spawn_sampler`). Each sample reads the service's table
    /// once, off the message path.
    pub gauge_sample_ms: u64,
}

impl Default for Common {
    fn default() -> Self {
        Common {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_user: None,
            nats_password: None,
            nats_ca_file: None,
            data_dir: PathBuf::from("./data"),
            ops_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            center_url: "http://127.0.0.1:8080".into(),
            center_token: None,
            seal_key: None,
            ops_token: None,
            log_format: LogFormat::Auto,
            max_in_flight: 256,
            center_timeout_ms: 10_000,
            ack_wait_ms: 30_000,
            max_deliver: 8,
            max_parked: 20_000,
            state_cache_mb: crate::state::DEFAULT_CACHE_MB,
            stream_replicas: 1,
            gauge_sample_ms: crate::ops::DEFAULT_SAMPLE_MS,
        }
    }
}

impl Common {
    /// The Center token, or a clear error naming the variable.
    pub fn center_token(&self) -> Result<SecretString, ConfigError> {
        match &self.center_token {
            Some(t) if !t.expose_secret().trim().is_empty() => Ok(t.clone()),
            _ => Err(ConfigError("PN_CENTER_TOKEN is missing or empty".into())),
        }
    }

    /// How this service authenticates to NATS: `PN_NATS_USER` and `PN_NATS_PASSWORD` go
    /// together (one without the other is an error naming both), `PN_NATS_CA_FILE` optional.
    pub fn nats_auth(&self) -> Result<crate::bus::NatsAuth, ConfigError> {
        let user = self.nats_user.as_ref().map(|u| u.trim().to_string()).filter(|u| !u.is_empty());
        let password = self.nats_password.clone().filter(|p| !p.expose_secret().is_empty());
        if user.is_some() != password.is_some() {
            return Err(ConfigError("PN_NATS_USER and PN_NATS_PASSWORD must be set together".into()));
        }
        Ok(crate::bus::NatsAuth { user, password, ca_file: self.nats_ca_file.clone() })
    }

    /// The operator token (`PN_OPS_TOKEN`), if one is set and not empty; one shorter than 16
    /// characters is an error naming the variable (never the value).
    pub fn ops_token(&self) -> Result<Option<SecretString>, ConfigError> {
        match self.ops_token.as_ref().map(|t| t.expose_secret().trim().to_string()).filter(|t| !t.is_empty()) {
            None => Ok(None),
            Some(t) if t.len() < 16 => Err(ConfigError("PN_OPS_TOKEN must have at least 16 characters".into())),
            Some(t) => Ok(Some(SecretString::from(t))),
        }
    }

    /// The seal key, parsed, or a clear error naming the variable.
    pub fn seal_key(&self) -> Result<crate::seal::SealKey, ConfigError> {
        match &self.seal_key {
            Some(k) => crate::seal::SealKey::parse(k).map_err(|e| ConfigError(format!("PN_SEAL_KEY: {e}"))),
            None => Err(ConfigError("PN_SEAL_KEY is missing".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct S {
        #[serde(flatten)]
        common: Common,
        #[serde(default)]
        n: u32,
    }

    #[test]
    fn env_overrides_and_bad_values_name_their_key() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("PN_NATS_URL", "nats://10.0.0.1:1");
            jail.set_env("PN_N", "7");
            jail.set_env("PN_CENTER_TOKEN", "tok-very-secret");
            let s: S = load().map_err(|e| e.0)?;
            assert_eq!(s.common.nats_url, "nats://10.0.0.1:1");
            assert_eq!(s.n, 7);
            let dbg = format!("{s:?}");
            assert!(!dbg.contains("tok-very-secret"), "{dbg}");
            let auth = s.common.nats_auth().map_err(|e| e.0)?;
            assert!(auth.user.is_none() && auth.password.is_none());
            jail.set_env("PN_NATS_USER", "svc-claimer");
            let err = load::<S>().map_err(|e| e.0)?.common.nats_auth().err().map(|e| e.0).unwrap_or_default();
            assert!(err.contains("PN_NATS_PASSWORD"), "{err}");
            jail.set_env("PN_NATS_PASSWORD", "nats-very-secret");
            let s: S = load().map_err(|e| e.0)?;
            let auth = s.common.nats_auth().map_err(|e| e.0)?;
            assert_eq!(auth.user.as_deref(), Some("svc-claimer"));
            let dbg = format!("{s:?} {auth:?}");
            assert!(!dbg.contains("nats-very-secret"), "{dbg}");
            jail.set_env("PN_N", "not-a-number");
            let err = load::<S>().err().map(|e| e.0).unwrap_or_default();
            assert!(err.contains("n"), "{err}");
            Ok(())
        });
    }
}
