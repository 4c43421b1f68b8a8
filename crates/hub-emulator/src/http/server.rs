//! The HTTPS listener: accepts TCP connections (capped, with backoff on accept errors) and serves
//! each one on its own task, where the TLS handshake also happens, so a slow client never stalls
//! the accept loop. HTTP/1.1 with upgrades, so MQTT-over-WebSocket shares the port.
//! Shutdown: stop accepting at once; idle connections close; in-flight requests get
//! [`IN_FLIGHT_DEADLINE`] (a second less than the hub's [`crate::DRAIN_DEADLINE`], so the hub's
//! drain sees these tasks end) before their connection is dropped.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

/// Most HTTPS connections served at once; further clients wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight requests may run once shutdown has begun.
pub const IN_FLIGHT_DEADLINE: Duration =
    crate::DRAIN_DEADLINE.saturating_sub(Duration::from_secs(1));
/// How long a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `router` over TLS until `shutdown`; each connection runs on `tracker`.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    router: Router,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = Duration::from_millis(10);
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = Arc::clone(&limit).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Usually out of file descriptors: wait for connections to close.
                    tracing::warn!(%error, "accepting an HTTPS connection failed; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        backoff = Duration::from_millis(10);
        let span = tracing::debug_span!("https", %peer);
        let connection = Connection {
            acceptor: acceptor.clone(),
            router: router.clone(),
            shutdown: shutdown.clone(),
        };
        tracker.spawn(
            async move {
                connection.run(stream).await;
                drop(permit);
            }
            .instrument(span),
        );
    }
    tracing::debug!("HTTPS listener stopped");
}

/// One client connection: TLS handshake, then HTTP/1.1 until the client or the hub closes it.
struct Connection {
    acceptor: TlsAcceptor,
    router: Router,
    shutdown: CancellationToken,
}

impl Connection {
    async fn run(self, stream: TcpStream) {
        let tls = tokio::select! {
            _ = self.shutdown.cancelled() => return,
            tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(stream)) => match tls {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::debug!(%error, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!("TLS handshake timed out");
                    return;
                }
            },
        };
        let service = TowerToHyperService::new(self.router);
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(tls), service)
            .with_upgrades();
        tokio::pin!(connection);
        let result = tokio::select! {
            result = connection.as_mut() => result,
            _ = self.shutdown.cancelled() => {
                connection.as_mut().graceful_shutdown();
                match tokio::time::timeout(IN_FLIGHT_DEADLINE, connection.as_mut()).await {
                    Ok(result) => result,
                    Err(_) => {
                        tracing::debug!("request still running at the drain deadline; closing the connection");
                        return;
                    }
                }
            }
        };
        if let Err(error) = result {
            tracing::debug!(%error, "HTTPS connection ended with an error");
        }
    }
}
