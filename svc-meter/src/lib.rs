//! svc-meter: ingests node usage (`POST /slave/usage`, Basic `ipv4:secret`, cumulative NIC
//! counters), keeps the durable quota ledger (sled via `kit::state`), moves nodes through
//! `ok → warn → cutoff`, answers admission (`402` at cutoff), publishes `meter.usage.<node>`
//! (coalesced) and `meter.quota.<node>`, and tells Center to hide a cut-off node.
//!
//! Invariants: a report is acknowledged only once its ledger write is durable; the meter never
//! sees or stores a node secret beyond one request (only its SHA-256, from the deployer);
//! nothing on the report path waits for NATS or Center.

pub mod app;
pub mod auth;
pub mod delta;
pub mod gauges;
pub mod handlers;
pub mod http;
pub mod ledger;
pub mod meter;
pub mod outbox;
pub mod quota;
pub mod report;
pub mod settings;

pub use app::{App, SERVICE};
pub use settings::{CountMode, Settings};

/// The `svc-meter` process: settings from `PN_*`, logging, then the service until SIGTERM/Ctrl-C.
/// It builds its own multi-thread runtime (what `#[tokio::main]` would) so that both `main.rs`
/// and the multi-call binary `pnp svc-meter` can call it from a plain, synchronous `main`.
pub fn main_entry() -> anyhow::Result<()> {
    kit::app::service_main(|s: &Settings| s.common.log_format, |s| async move { App::build(s).await?.run(kit::shutdown::signal()).await })
}
