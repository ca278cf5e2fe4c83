//! Shutdown is an argument: services take a future that resolves when they must stop.
//! Production passes `signal()`; tests pass their own.

use std::sync::OnceLock;

use tokio_util::sync::CancellationToken;

static ARMED: OnceLock<CancellationToken> = OnceLock::new();

/// Starts listening for SIGTERM and Ctrl-C now, for the whole process (call it first thing
/// inside the runtime, as `kit::app::service_main` does): a signal that arrives while the
/// service is still starting — its ops endpoints may already answer — is then not lost and
/// does not kill the process; `signal()` resolves at once for it.
pub fn arm() {
    if ARMED.get().is_some() {
        return;
    }
    let token = ARMED.get_or_init(CancellationToken::new).clone();
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::spawn(async move {
        #[cfg(unix)]
        match term {
            Some(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            }
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        token.cancel();
    });
}

/// Resolves on SIGTERM or Ctrl-C (since `arm()`, when the process armed; else from the first poll).
pub async fn signal() {
    if let Some(t) = ARMED.get() {
        return t.cancelled().await;
    }
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
