//! The MQTT-over-TLS accept loop: a connection cap, backoff on accept errors, and one task per
//! connection that does the TLS handshake and then runs the session.
//!
//! Invariant: the loop itself never awaits a client (no handshake, no read), so one slow or
//! hostile client cannot stall accepting others.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, debug, info_span, warn};

use super::transport::ByteStream;
use super::{CONNECT_TIMEOUT, MAX_CONNECTIONS, session};
use crate::hub::Hub;

/// First and longest pause after a failed `accept` (e.g. out of file descriptors).
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(2));

/// Accepts TLS connections and hands each to its own session task.
pub(super) struct Listener {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    hub: Hub,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    limit: Arc<Semaphore>,
}

impl Listener {
    pub(super) fn new(
        listener: TcpListener,
        acceptor: TlsAcceptor,
        hub: Hub,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Listener {
        // The shared server config advertises ALPN `http/1.1` for the HTTPS port; a device that
        // offers ALPN (e.g. `mqtt`) would then fail the handshake, so MQTT negotiates none.
        let mut config = (**acceptor.config()).clone();
        config.alpn_protocols.clear();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        Listener {
            listener,
            acceptor,
            hub,
            shutdown,
            tracker,
            limit: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        }
    }

    /// Runs until `shutdown`.
    pub(super) async fn run(self) {
        let mut backoff = ACCEPT_BACKOFF.0;
        loop {
            // Take a permit before accepting: at the cap, new clients wait in the backlog.
            let permit = tokio::select! {
                permit = Arc::clone(&self.limit).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return, // the semaphore is never closed
                },
                () = self.shutdown.cancelled() => return,
            };
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                () = self.shutdown.cancelled() => return,
            };
            let (socket, peer) = match accepted {
                Ok(accepted) => {
                    backoff = ACCEPT_BACKOFF.0;
                    accepted
                }
                Err(e) => {
                    warn!(error = %e, "cannot accept an MQTT connection; retrying in {backoff:?}");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = self.shutdown.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                    continue;
                }
            };
            let deadline = Instant::now() + CONNECT_TIMEOUT;
            let span = info_span!("mqtt", %peer, device_id = tracing::field::Empty);
            let connection = connection(
                socket,
                peer,
                self.acceptor.clone(),
                self.hub.clone(),
                self.shutdown.clone(),
                deadline,
            );
            self.tracker.spawn(
                async move {
                    connection.await;
                    drop(permit);
                }
                .instrument(span),
            );
        }
    }
}

/// One connection: TLS handshake (bounded by the connect deadline), then the session.
async fn connection(
    socket: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    hub: Hub,
    shutdown: CancellationToken,
    deadline: Instant,
) {
    // Device traffic is small request/response packets: do not let Nagle delay them.
    let _ = socket.set_nodelay(true);
    let handshake = tokio::select! {
        handshake = tokio::time::timeout_at(deadline, acceptor.accept(socket)) => handshake,
        () = shutdown.cancelled() => return,
    };
    let stream = match handshake {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            debug!(%peer, "TLS handshake did not finish within {CONNECT_TIMEOUT:?}");
            return;
        }
    };
    session::run(ByteStream(stream), hub, shutdown, deadline).await;
}
