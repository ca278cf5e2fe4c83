//! The runtime every Pnp service shares: configuration, telemetry, the JetStream bus and its
//! consumer loop, sled-backed state, secret sealing, the Center client, SSH, the ops HTTP
//! endpoints and shutdown. Services add only their own logic on top of this crate.
//!
//! Invariant: no service names `sled`, `reqwest` or the MCP wire format; they go through
//! `kit::state` and `kit::center`.

pub mod app;
pub mod bus;
pub mod center;
pub mod cloud;
pub mod held;
pub mod locks;
pub mod config;
pub mod nats_auth;
pub mod ops;
pub mod seal;
pub mod shutdown;
pub mod ssh;
pub mod state;
pub mod telemetry;
pub mod trace;
pub mod world;

pub use secrecy;

/// Milliseconds since the Unix epoch (wall clock, for records and events).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Installs the process-wide rustls crypto provider (ring). Idempotent.
pub fn init_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The release image's allocator (feature `mimalloc`); a library's `#[global_allocator]`
/// applies to every binary that links it.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
