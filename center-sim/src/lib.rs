//! center-sim: one process that stands in for Center (MCP tools, leases, the timeout sweep,
//! node registration), a Lightsail-like cloud (catalogue, instances on loopback addresses) and
//! the nodes themselves (an SSH server per instance, emulated containers and sidecar), so the
//! whole pipeline runs on one machine. Tests and `pnctl` drive it through `/admin`.
//!
//! Everything lives in memory (`sim::State`) except the nodes' deploy-dir files, written under
//! `--data-dir` with mode 600 (they are the nodes' disks and hold their secrets).

pub mod admin;
pub mod center;
pub mod cloud;
pub mod faults;
pub mod ingress;
pub mod mcp;
pub mod node;
pub mod sim;
pub mod slave;

use std::ffi::OsString;
use std::future::Future;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use axum::Router;
use axum::routing::{get, post};
use clap::Parser;
use russh::keys::PublicKey;
use secrecy::{ExposeSecret, SecretString};

use crate::sim::{Sim, SimConfig};

/// Command-line flags; each also reads `PN_SIM_<NAME>`. The bearer token comes from the
/// environment only (`PN_CENTER_TOKEN`): a secret never goes on a command line.
#[derive(Debug, Clone, Parser)]
#[command(name = "center-sim", version, about = "A simulator of Center, a cloud and its nodes")]
pub struct Settings {
    /// Where the HTTP API (MCP, /slave, /admin) listens; port 0 picks one.
    #[arg(long, env = "PN_SIM_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// The nodes' disks: `<DIR>/<instance-name>/.env` etc.
    #[arg(long, env = "PN_SIM_DATA_DIR", default_value = "./.pn/sim")]
    pub data_dir: PathBuf,
    /// The URL handed out as the claim's `identity.centerUrl` (the nodes' `K2_CENTER_URL`):
    /// the ingress in front of this Center (`pn-ingress`, which mirrors `/slave/usage` to the
    /// meter). Default: this process's own address.
    #[arg(long, env = "PN_SIM_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// OpenSSH public key of the account's default keypair; without it one is generated into
    /// `<data-dir>/.admin/id_ed25519` (+ `.pub`).
    #[arg(long, env = "PN_SIM_ADMIN_PUBLIC_KEY_FILE")]
    pub admin_public_key_file: Option<PathBuf>,
    /// SSH port of a fresh instance.
    #[arg(long, env = "PN_SIM_SSH_PORT_FRESH", default_value_t = 2222)]
    pub ssh_port_fresh: u16,
    /// SSH port after the prep script hardened the host.
    #[arg(long, env = "PN_SIM_SSH_PORT_HARDENED", default_value_t = 10022)]
    pub ssh_port_hardened: u16,
    /// First loopback address handed to instances.
    #[arg(long, env = "PN_SIM_IP_START", default_value = "127.0.1.1")]
    pub ip_start: Ipv4Addr,
    /// Seed of the fault dice.
    #[arg(long, env = "PN_SIM_SEED", default_value_t = 0)]
    pub seed: u64,
    /// A cloud account's own default keypair, `ACCOUNT=PATH` (OpenSSH public key; repeatable):
    /// that account's instances accept only it. Accounts not named use the admin key.
    #[arg(long = "account-public-key-file", env = "PN_SIM_ACCOUNT_PUBLIC_KEY_FILES", value_delimiter = ',')]
    pub account_public_key_files: Vec<String>,
    /// Start with a real cloud's timings (the faults preset `realistic`: boot 30–90 s, the OS
    /// prep ~120 s, usage reports every 60 s).
    #[arg(long, env = "PN_SIM_REALISTIC")]
    pub realistic: bool,
    /// From `PN_CENTER_TOKEN`.
    #[arg(skip)]
    pub center_token: Option<SecretString>,
}

impl Settings {
    /// Flags and `PN_SIM_*` (clap exits with usage on a bad flag), plus `PN_CENTER_TOKEN`.
    pub fn load() -> Settings {
        Settings::load_from(std::env::args_os())
    }

    /// As [`Settings::load`], with the flags from `args`, whose first item is the program name
    /// (skipped, as argv[0] is): `pnp center-sim --listen …` passes `["center-sim", "--listen", …]`.
    pub fn load_from<I, T>(args: I) -> Settings
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let mut s = Settings::parse_from(args);
        s.center_token = std::env::var("PN_CENTER_TOKEN").ok().map(SecretString::from);
        s
    }
}

/// The `center-sim` process: logging, settings from `args` (argv-shaped: program name first)
/// and `PN_SIM_*`, then the first stdout line `center-sim listening on http://ADDR` (scripts
/// and tests read it) and the simulator until SIGTERM/Ctrl-C. It builds its own multi-thread
/// runtime so that `main.rs` and the multi-call binary `pnp center-sim` share it.
pub fn main_entry<I, T>(args: I) -> anyhow::Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(async {
        kit::telemetry::init(kit::config::LogFormat::from_env());
        let settings = Settings::load_from(args);
        let app = App::build(settings).await?;
        let mut out = std::io::stdout();
        writeln!(out, "center-sim listening on {}", app.base_url())?;
        out.flush()?;
        app.run(kit::shutdown::signal()).await
    })
}

/// A built simulator: bound, not yet serving.
pub struct App {
    listener: tokio::net::TcpListener,
    sim: Sim,
    addr: SocketAddr,
}

impl App {
    pub async fn build(settings: Settings) -> anyhow::Result<App> {
        kit::init_crypto();
        let token = match &settings.center_token {
            Some(t) if !t.expose_secret().trim().is_empty() => t.clone(),
            _ => bail!("PN_CENTER_TOKEN is missing or empty"),
        };
        if !settings.ip_start.is_loopback() {
            bail!("--ip-start must be a loopback address (127.0.0.0/8), got {}", settings.ip_start);
        }
        if settings.ssh_port_fresh == settings.ssh_port_hardened {
            bail!("--ssh-port-fresh and --ssh-port-hardened must differ");
        }
        create_private_dir(&settings.data_dir)?;
        let admin_key = load_admin_key(&settings)?;
        let listener = tokio::net::TcpListener::bind(settings.listen).await.with_context(|| format!("listen on {}", settings.listen))?;
        let mut addr = listener.local_addr()?;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().context("http client")?;
        let public_url = match settings.public_url.as_deref().map(str::trim).filter(|u| !u.is_empty()) {
            Some(u) if u.starts_with("http://") || u.starts_with("https://") => u.trim_end_matches('/').to_string(),
            Some(_) => bail!("--public-url must be an http(s) URL"),
            None => format!("http://{addr}"),
        };
        let cfg = SimConfig {
            base_url: public_url,
            data_dir: settings.data_dir.clone(),
            ssh_port_fresh: settings.ssh_port_fresh,
            ssh_port_hardened: settings.ssh_port_hardened,
        };
        let mut account_keys = std::collections::BTreeMap::new();
        for spec in &settings.account_public_key_files {
            let Some((account, path)) = spec.split_once('=').filter(|(a, p)| !a.trim().is_empty() && !p.trim().is_empty()) else {
                bail!("--account-public-key-file takes ACCOUNT=PATH, got {spec:?}");
            };
            let account = account.trim();
            if cloud::check_account(account).is_err() {
                bail!("--account-public-key-file: no cloud account {account:?}");
            }
            account_keys.insert(account.to_string(), read_public_key(Path::new(path.trim()))?);
        }
        let sim = Sim::new(cfg, admin_key, token, settings.ip_start, settings.seed, http);
        {
            let mut st = sim.st();
            st.cloud.account_keys = account_keys;
            if settings.realistic {
                st.faults = faults::Faults::realistic(&st.faults);
            }
        }
        Ok(App { listener, sim, addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where this process listens (`http://ADDR`; the first stdout line names it).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What the claims hand out as `centerUrl` (`--public-url`, else [`App::base_url`]).
    pub fn public_url(&self) -> String {
        self.sim.cfg.base_url.clone()
    }

    /// Serves until `shutdown` resolves; then stops every node.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let sim = self.sim.clone();
        let ticker = sim.clone();
        tokio::spawn(async move {
            // The sweep also runs lazily on every read; this makes it happen without traffic.
            loop {
                tokio::select! {
                    _ = ticker.root.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(250)) => ticker.st().tick(),
                }
            }
        });
        let router = Router::new()
            .route("/mcp", post(mcp::handle).delete(mcp::end_session))
            .route("/healthz", get(|| async { "ok" }))
            .merge(slave::routes())
            .merge(admin::routes())
            .with_state(sim.clone());
        let root = sim.root.clone();
        let served = axum::serve(self.listener, router.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(async move {
                shutdown.await;
                root.cancel();
            })
            .await;
        sim.root.cancel();
        served.context("serve")
    }
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).with_context(|| format!("create {}", dir.display()))
}

/// The admin public key from `--admin-public-key-file`, or a generated keypair in the data dir.
fn load_admin_key(settings: &Settings) -> anyhow::Result<PublicKey> {
    let path = match &settings.admin_public_key_file {
        Some(p) => p.clone(),
        None => {
            let private = settings.data_dir.join(".admin/id_ed25519");
            let public = settings.data_dir.join(".admin/id_ed25519.pub");
            if !public.exists() {
                let (pem, pubkey) = kit::ssh::generate_ed25519()?;
                node::write_disk(&settings.data_dir, ".admin/id_ed25519", pem.as_bytes())?;
                node::write_disk(&settings.data_dir, ".admin/id_ed25519.pub", format!("{pubkey}\n").as_bytes())?;
                tracing::info!(private_key = %private.display(), "no --admin-public-key-file: generated the account's admin keypair");
            }
            public
        }
    };
    read_public_key(&path)
}

/// The first key line of an OpenSSH public key file.
fn read_public_key(path: &Path) -> anyhow::Result<PublicKey> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let line = text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#')).unwrap_or("");
    PublicKey::from_openssh(line).with_context(|| format!("{} is not an OpenSSH public key", path.display()))
}

/// RFC 3339 (UTC) of a Unix time in milliseconds.
pub fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

/// A fresh random id like `op-1a2b3c4d5e6f7a8b` (random, so ids never repeat across restarts
/// while the services' state persists).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", hex::encode(rand::random::<[u8; 8]>()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_ids() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_500), "1970-01-01T00:00:01.5Z");
        let (a, b) = (new_id("op"), new_id("op"));
        assert!(a.starts_with("op-") && a.len() == 19 && a != b);
    }
}
