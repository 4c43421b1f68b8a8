//! The accept loop both ports share (MQTT over TLS and HTTPS): the connection cap, one backoff
//! policy for accept errors, and one task per connection that does the TLS handshake under a
//! deadline and then hands the stream to the port's [`Handler`].
//!
//! Invariants: the loop never awaits a client (no handshake, no read), so one slow or hostile
//! client cannot stall accepting others; a permit is taken before `accept`, so at the cap new
//! clients wait in the kernel's backlog; a connection holds its permit for as long as anything
//! serves it ([`ConnectionPermit`]); the loop, its backoff and pending handshakes all stop at
//! shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, Span, debug, warn};

/// First and longest pause after a failed `accept`. The usual cause is running out of file
/// descriptors, which ends as soon as some connection closes, so the first retry comes soon; the
/// cap keeps the log quiet while still noticing recovery within a second.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(1));

/// What one port does with a connection once its TLS handshake is done.
pub(crate) trait Handler: Clone + Send + Sync + 'static {
    /// The port's name in logs.
    const NAME: &'static str;
    /// How long a client has, from `accept`, to finish the TLS handshake.
    const HANDSHAKE_TIMEOUT: Duration;

    /// The span the connection's task runs in, handshake included.
    fn span(&self, peer: SocketAddr) -> Span;

    /// Serves one connection; it closes when this returns (unless something kept its permit).
    fn handle(self, connection: Accepted) -> impl Future<Output = ()> + Send;
}

/// A connection that passed its TLS handshake.
#[derive(Debug)]
pub(crate) struct Accepted {
    pub(crate) stream: TlsStream<TcpStream>,
    /// When `accept` returned: the start of any connect deadline.
    pub(crate) accepted_at: Instant,
    pub(crate) permit: ConnectionPermit,
}

/// A connection's place under its port's cap, freed when the last clone is dropped. Whatever
/// outlives the connection's task (an upgraded WebSocket session) keeps a clone, so it still
/// counts against the cap.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionPermit {
    _held: Arc<OwnedSemaphorePermit>,
}

/// Accepts TLS connections on one port and runs each on its own task.
pub(crate) struct Listener<H> {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    limit: Arc<Semaphore>,
    handler: H,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl<H: Handler> Listener<H> {
    /// A listener holding at most `max_connections` connections at once (at least one).
    pub(crate) fn new(
        listener: TcpListener,
        acceptor: TlsAcceptor,
        max_connections: usize,
        handler: H,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Listener<H> {
        Listener {
            listener,
            acceptor,
            limit: Arc::new(Semaphore::new(max_connections.max(1))),
            handler,
            shutdown,
            tracker,
        }
    }

    /// Runs until `shutdown`; the port closes when this returns.
    pub(crate) async fn run(self) {
        let mut backoff = ACCEPT_BACKOFF.0;
        loop {
            let permit = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break,
                permit = Arc::clone(&self.limit).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break, // the semaphore is never closed
                },
            };
            let accepted = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break,
                accepted = self.listener.accept() => accepted,
            };
            let (socket, peer) = match accepted {
                Ok(accepted) => {
                    backoff = ACCEPT_BACKOFF.0;
                    accepted
                }
                Err(error) => {
                    warn!(%error, "cannot accept an {} connection; retrying in {backoff:?}", H::NAME);
                    tokio::select! {
                        biased;
                        () = self.shutdown.cancelled() => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                    continue;
                }
            };
            let accepted_at = Instant::now();
            let permit = ConnectionPermit {
                _held: Arc::new(permit),
            };
            let span = self.handler.span(peer);
            let task = connection(
                socket,
                accepted_at,
                permit,
                self.acceptor.clone(),
                self.handler.clone(),
                self.shutdown.clone(),
            );
            self.tracker.spawn(task.instrument(span));
        }
        debug!("{} listener stopped", H::NAME);
    }
}

/// One connection's task: the TLS handshake, then the handler.
async fn connection<H: Handler>(
    socket: TcpStream,
    accepted_at: Instant,
    permit: ConnectionPermit,
    acceptor: TlsAcceptor,
    handler: H,
    shutdown: CancellationToken,
) {
    // Both ports carry small request/response exchanges (MQTT packets, also over WebSocket on
    // the HTTPS port): do not let Nagle delay them.
    let _ = socket.set_nodelay(true);
    let deadline = accepted_at + H::HANDSHAKE_TIMEOUT;
    let handshake = tokio::select! {
        biased;
        () = shutdown.cancelled() => return,
        handshake = tokio::time::timeout_at(deadline, acceptor.accept(socket)) => handshake,
    };
    let stream = match handshake {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            debug!(%error, "TLS handshake failed");
            return;
        }
        Err(_) => {
            debug!(
                "TLS handshake did not finish within {:?}",
                H::HANDSHAKE_TIMEOUT
            );
            return;
        }
    };
    // This task keeps its own clone, so the slot stays taken until the handler is done even if
    // the handler drops the one it gets.
    let connection = Accepted {
        stream,
        accepted_at,
        permit: permit.clone(),
    };
    handler.handle(connection).await;
    drop(permit);
}
