//! Start-up and the run loop: check the settings and read the admin keys before anything
//! connects, start the shared runtime, bind the two consumers, run until shutdown.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use kit::app::Runtime;
use kit::bus::ConsumerSpec;
use proto::{Stage, subjects};
use tokio::task::JoinSet;

use crate::deploy::Deployer;
use crate::handlers::{instance::OnInstance, replay::OnReplay};
use crate::record::{DeployRecord, TABLE};
use crate::settings::Settings;
use crate::stack::Stack;

/// Service name: crate, binary, data sub-directory and durable-consumer prefix.
pub const SERVICE: &str = "svc-deployer";
/// The durable consumer of `pn.op.instance.>`.
pub const INSTANCE_DURABLE: &str = "svc-deployer-instance";

pub struct App {
    runtime: Runtime,
    set: JoinSet<()>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "App({})", self.runtime.service)
    }
}

impl App {
    pub async fn build(settings: Settings) -> anyhow::Result<App> {
        settings.validate()?;
        let (keys, accounts) = settings.ssh.load_admin_keys()?;
        if accounts.is_empty() {
            tracing::warn!("no admin SSH keys configured (PN_SSH__ADMIN_KEYS): every operation will fail");
        }
        let seal = settings.common.seal_key()?;
        let images = crate::stack::parse_images(&settings.k2_images).map_err(crate::settings::SettingsError)?;
        let stack = Stack::load(settings.prep_script.as_deref(), &images)?;
        let runtime = Runtime::start(SERVICE, &settings.common).await?;
        let table = runtime.store.table::<DeployRecord>(TABLE).context("open the deploy table")?;
        let max_parked = settings.common.max_parked;
        {
            let (table, prep_timeout_ms) = (table.clone(), settings.ssh.prep_timeout_ms);
            runtime.spawn_sampler(move || crate::gauges::sample(table.clone(), prep_timeout_ms));
        }
        // Read only: the deployer asks the provider to confirm each event's instance.
        let primary = kit::cloud::build(&settings.provider, &settings.account, &settings.hetzner, runtime.center.clone(), true)?;
        let alt = match settings.alt_provider.as_str() {
            "" => None,
            kind => Some(kit::cloud::build(kind, &settings.alt_account, &settings.hetzner, runtime.center.clone(), true)?),
        };
        let providers = kit::cloud::Providers::new(primary, alt);
        let deployer = Arc::new(Deployer::new(settings, providers, keys, seal, stack, table, runtime.bus.clone()));

        // Operations whose node is still in its OS prep wait parked (no session, no slot).
        let cfg = runtime.loop_config(Stage::Deploy).with_parking(max_parked);
        let mut set = JoinSet::new();
        runtime
            .spawn_consumer(&mut set, ConsumerSpec::ops(INSTANCE_DURABLE, subjects::INSTANCE, &cfg), cfg.clone(), Arc::new(OnInstance(deployer.clone())))
            .await?;
        runtime.spawn_consumer(&mut set, ConsumerSpec::replay(SERVICE, Stage::Deploy, &cfg), cfg, Arc::new(OnReplay(deployer))).await?;
        tracing::info!(accounts = ?accounts, "deployer ready");
        Ok(App { runtime, set })
    }

    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub fn ops_addr(&self) -> SocketAddr {
        self.runtime.ops_addr
    }

    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        self.runtime.run_until(self.set, shutdown).await;
        Ok(())
    }
}
