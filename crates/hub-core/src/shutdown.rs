//! Graceful stop for our programs: Ctrl-C or SIGTERM cancels a token that every task watches.

use tokio_util::sync::CancellationToken;

/// Returns when the process receives Ctrl-C (SIGINT) or, on Unix, SIGTERM.
pub async fn signalled() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            // Without a SIGTERM handler, Ctrl-C still works.
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

/// A token cancelled on the first Ctrl-C or SIGTERM (spawns a watcher on the current runtime).
pub fn token_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let on_signal = token.clone();
    tokio::spawn(async move {
        signalled().await;
        on_signal.cancel();
    });
    token
}
