//! Where the operator commands find the stack: `./.pn/stack.json` written by `pnctl up`, or
//! explicit `--nats-url` / `--meter-url` / `--center-url` flags (which win). Also the small
//! HTTP and NATS client helpers the commands share.
//!
//! Never starts anything: a missing stack is a clear error naming `pnctl up` and the flags.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use secrecy::SecretString;

use crate::stack::StackFile;

// The HTTP helpers live in `crate::http` (the stack's supervisor uses them without this module).
pub use crate::http::{answers, get_json, get_json_bearer, http, post_json};

/// The operator token that svc-cloud's and svc-claimer's mutating ops routes require
/// (`pnctl reap --confirm`, `pnctl ops abandon`): `PN_OPS_TOKEN` (a deployment's, from the
/// Secret `pn-ops-token`), else the dev stack's `<data-dir>/secrets/ops-token`; none → the
/// request goes without and the service refuses it (401).
pub fn ops_token(data_dir: &Path) -> Option<SecretString> {
    if let Ok(t) = std::env::var("PN_OPS_TOKEN")
        && !t.trim().is_empty()
    {
        return Some(SecretString::from(t.trim().to_string()));
    }
    let t = std::fs::read_to_string(crate::stack::ops_token_file(&data_dir.join("secrets"))).ok()?;
    Some(SecretString::from(t.trim().to_string())).filter(|t| !secrecy::ExposeSecret::expose_secret(t).is_empty())
}

/// What an ops listener's refusal of the operator token means, for an error line.
pub fn ops_token_refusal(status: reqwest::StatusCode) -> Option<&'static str> {
    match status.as_u16() {
        401 => Some("the operator token was missing or wrong: set PN_OPS_TOKEN (a deployment: the Secret pn-ops-token) or use the dev stack's --data-dir (secrets/ops-token)"),
        403 => Some("the service has no operator token configured (PN_OPS_TOKEN unset there), so its mutating routes are off"),
        _ => None,
    }
}

/// The URLs a command may need; each is optional until a command asks for it.
#[derive(Debug, Clone, Default)]
pub struct Endpoints {
    pub data_dir: PathBuf,
    pub nats_url: Option<String>,
    pub meter_url: Option<String>,
    pub center_url: Option<String>,
    /// `--meter-url` as given (for the ledger: the meter's internal listener).
    meter_override: Option<String>,
}

impl Endpoints {
    /// Reads `<data_dir>/stack.json` when present; flags override what it says.
    pub fn resolve(
        data_dir: &Path,
        nats_url: Option<String>,
        meter_url: Option<String>,
        center_url: Option<String>,
    ) -> Endpoints {
        let stack = StackFile::read(data_dir).ok();
        let from = |f: fn(&StackFile) -> &String| stack.as_ref().map(f).filter(|s| !s.is_empty()).cloned();
        Endpoints {
            data_dir: data_dir.to_path_buf(),
            nats_url: nats_url.or_else(|| from(|s| &s.nats_url)),
            meter_override: meter_url.clone(),
            meter_url: meter_url.or_else(|| from(|s| &s.meter_url)),
            center_url: center_url.or_else(|| from(|s| &s.center_url)),
        }
    }

    fn missing(&self, what: &str, flag: &str) -> anyhow::Error {
        anyhow::anyhow!(
            "no {what}: {} has no running stack (start one with `pnctl up --detach`) and {flag} was not given",
            self.data_dir.join("stack.json").display()
        )
    }

    pub fn nats(&self) -> anyhow::Result<&str> {
        self.nats_url.as_deref().ok_or_else(|| self.missing("NATS URL", "--nats-url"))
    }

    pub fn meter(&self) -> anyhow::Result<&str> {
        self.meter_url.as_deref().ok_or_else(|| self.missing("meter URL", "--meter-url"))
    }

    pub fn center(&self) -> anyhow::Result<&str> {
        self.center_url.as_deref().ok_or_else(|| self.missing("center URL", "--center-url"))
    }

    /// svc-meter's internal listener (the ledger): `--meter-url` when given (then it names the
    /// internal listener), else stack.json's `meterInternalUrl`.
    pub fn meter_internal(&self) -> anyhow::Result<String> {
        if let Some(u) = self.meter_override.as_deref() {
            return Ok(u.to_string());
        }
        StackFile::read(&self.data_dir)
            .ok()
            .map(|s| s.meter_internal_url)
            .filter(|u| !u.is_empty())
            .ok_or_else(|| self.missing("meter internal URL", "--meter-url"))
    }

    /// The operator token (see [`ops_token`]).
    pub fn ops_token(&self) -> Option<SecretString> {
        ops_token(&self.data_dir)
    }

    /// The meter's internal token: `PN_INTERNAL_TOKEN`, else the dev stack's
    /// `secrets/meter-internal-token`.
    pub fn meter_token(&self) -> anyhow::Result<SecretString> {
        if let Ok(t) = std::env::var("PN_INTERNAL_TOKEN")
            && !t.trim().is_empty()
        {
            return Ok(SecretString::from(t.trim().to_string()));
        }
        let f = self.data_dir.join("secrets").join("meter-internal-token");
        let t = std::fs::read_to_string(&f).with_context(|| format!("no meter token: set PN_INTERNAL_TOKEN or start the dev stack ({})", f.display()))?;
        Ok(SecretString::from(t.trim().to_string()))
    }

    /// The operator's NATS identity (see [`operator_auth`]).
    pub fn nats_auth(&self) -> kit::bus::NatsAuth {
        operator_auth(&self.data_dir)
    }

    /// Connects to NATS as the operator and returns the client and its JetStream context.
    pub async fn connect(&self) -> anyhow::Result<(async_nats::Client, async_nats::jetstream::Context)> {
        connect_nats(self.nats()?, &self.nats_auth()).await
    }
}

/// How `pnctl` logs in to NATS: `PN_NATS_USER` + `PN_NATS_PASSWORD` (and `PN_NATS_CA_FILE`)
/// from the environment when set — e.g. against a cluster through `kubectl port-forward` —
/// else the dev stack's operator identity (`<data_dir>/secrets/nats/pn-operator`), else none
/// (which a Pnp NATS refuses).
pub fn operator_auth(data_dir: &Path) -> kit::bus::NatsAuth {
    let ca_file = std::env::var_os("PN_NATS_CA_FILE").filter(|v| !v.is_empty()).map(PathBuf::from);
    if let (Ok(user), Ok(pw)) = (std::env::var("PN_NATS_USER"), std::env::var("PN_NATS_PASSWORD"))
        && !user.trim().is_empty()
    {
        return kit::bus::NatsAuth { user: Some(user.trim().to_string()), password: Some(SecretString::from(pw)), ca_file };
    }
    let mut auth = crate::stack::operator_auth(data_dir).unwrap_or_default();
    auth.ca_file = ca_file;
    auth
}

/// Connects as `auth` (credentials in `url`, `nats://user:password@host:port`, win); never
/// prints the password.
pub async fn connect_nats(url: &str, auth: &kit::bus::NatsAuth) -> anyhow::Result<(async_nats::Client, async_nats::jetstream::Context)> {
    use secrecy::ExposeSecret;
    let (plain, in_url) = kit::bus::split_credentials(url);
    let shown = kit::bus::redact_url(url);
    let mut opts = async_nats::ConnectOptions::new().name("pnctl").connection_timeout(Duration::from_secs(3));
    let creds = in_url.or_else(|| auth.user.clone().zip(auth.password.as_ref().map(|p| p.expose_secret().to_string())));
    if let Some((user, password)) = creds {
        opts = opts.user_and_password(user, password);
    }
    if let Some(ca) = &auth.ca_file {
        opts = opts.add_root_certificates(ca.clone()).require_tls(true);
    }
    let client = tokio::time::timeout(Duration::from_secs(5), opts.connect(plain.as_str()))
        .await
        .map_err(|_| anyhow::anyhow!("NATS at {shown} did not answer within 5s (is the stack up? `pnctl up`)"))?
        .with_context(|| format!("cannot reach NATS at {shown} as {} (is the stack up? `pnctl up`)", auth.user.as_deref().unwrap_or("nobody")))?;
    let js = async_nats::jetstream::new(client.clone());
    Ok((client, js))
}

/// The one way pnctl follows a stream (PN_OPS, PN_METER): an ordered consumer on `stream`
/// filtered to `filter`, from the first message (`DeliverPolicy::All`) or from now on (`New`).
/// `status`, `ops`, `tail`, `demo` and the benches read through it.
pub async fn ordered_consumer(
    js: &async_nats::jetstream::Context,
    stream: &str,
    filter: &str,
    deliver_policy: async_nats::jetstream::consumer::DeliverPolicy,
) -> anyhow::Result<async_nats::jetstream::consumer::Consumer<async_nats::jetstream::consumer::pull::OrderedConfig>> {
    let s = js.get_stream(stream).await.with_context(|| format!("stream {stream} (have the services started?)"))?;
    s.create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
        filter_subject: filter.to_string(),
        deliver_policy,
        ..Default::default()
    })
    .await
    .with_context(|| format!("ordered consumer on {filter}"))
}
