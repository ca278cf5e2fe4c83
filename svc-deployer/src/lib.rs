//! svc-deployer: takes a ready instance (`pn.op.instance.<op>`) to a node running the k2s
//! stack — OS prep, `.env`, stack files, `docker compose pull` + `up -d` over one pinned SSH
//! session — and publishes `pn.op.deployed.<op>`. `pn.replay.deploy` re-runs it from state.
//!
//! Invariant: the claim token and K2_NODE_SECRET reach the node only over SSH stdin; they are
//! sealed in sled, absent from NATS, logs, reasons and command lines. The deployer never
//! runs `docker compose down`.

pub mod app;
pub mod deploy;
pub mod gauges;
pub mod handlers;
pub mod harden;
pub mod node_env;
pub mod prep;
pub mod record;
pub mod remote;
pub mod scrub;
pub mod settings;
pub mod stack;

pub use app::App;
pub use settings::Settings;

/// The `svc-deployer` process: settings from `PN_*`, logging, then the service until SIGTERM/Ctrl-C.
/// It builds its own multi-thread runtime (what `#[tokio::main]` would) so that both `main.rs`
/// and the multi-call binary `pnp svc-deployer` can call it from a plain, synchronous `main`.
pub fn main_entry() -> anyhow::Result<()> {
    kit::app::service_main(|s: &Settings| s.common.log_format, |s| async move { App::build(s).await?.run(kit::shutdown::signal()).await })
}
