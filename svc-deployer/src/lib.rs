//! svc-deployer: takes a ready instance (`pn.op.instance.<op>`) to a node running the k2s
//! stack — OS prep, `.env`, stack files, `docker compose pull` + `up -d` over one pinned SSH
//! session — and publishes `pn.op.deployed.<op>`. `pn.replay.deploy` re-runs it from state.
//!
//! Invariant: the claim token and K2_NODE_SECRET reach the node only over SSH stdin; they are
//! sealed in sled, absent from NATS, logs, reasons and command lines. The deployer never
//! runs `docker compose down`.

pub mod app;
pub mod deploy;
pub mod handlers;
pub mod node_env;
pub mod record;
pub mod remote;
pub mod scrub;
pub mod settings;
pub mod stack;

pub use app::App;
pub use settings::Settings;
