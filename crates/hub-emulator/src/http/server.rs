//! The HTTPS port's [`Handler`] for the shared [`crate::listener`]: HTTP/1.1 with upgrades on each
//! TLS connection, so MQTT-over-WebSocket shares the port. Every request carries its
//! connection's [`Admission`]: the authentication middleware admits the connection once a
//! request's token checks out, and an upgraded WebSocket session keeps counting against this
//! port's budgets after hyper has let go of the connection.
//! Timeouts: [`HEADER_READ_TIMEOUT`] bounds both a request's headers and an idle keep-alive
//! connection (hyper starts it whenever it waits for a request head); bodies are bounded by
//! [`super::BODY_READ_TIMEOUT`] where they are read.
//! Shutdown: stop accepting at once; idle connections close; in-flight requests get
//! [`IN_FLIGHT_DEADLINE`] (a second less than the hub's [`crate::DRAIN_DEADLINE`], so the hub's
//! drain sees these tasks end) before their connection is dropped.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use hyper::Request;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::{Service as _, service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Span;

use crate::listener::{Accepted, Admission, ConnectionBudget, Handler, Listener};

/// Most authenticated HTTPS connections held at once by default
/// ([`crate::Config::max_https_connections`]), MQTT-over-WebSocket sessions included; a request
/// that authenticates beyond it is still answered, then its connection is closed.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most HTTPS connections not authenticated yet (TLS handshake, a first request not yet
/// checked, a WebSocket before CONNECT) by default
/// ([`crate::Config::max_pending_https_connections`]); beyond it the oldest is closed.
pub const MAX_PENDING_CONNECTIONS: usize = 256;
/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight requests may run once shutdown has begun.
pub const IN_FLIGHT_DEADLINE: Duration =
    crate::DRAIN_DEADLINE.saturating_sub(Duration::from_secs(1));
/// How long a client may take to send a request's headers, and how long a keep-alive
/// connection may stay idle between requests.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `router` over TLS until `shutdown`, within `budget`; each connection runs on `tracker`.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    budget: ConnectionBudget,
    router: Router,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let handler = Https {
        router,
        shutdown: shutdown.clone(),
    };
    Listener::new(listener, acceptor, budget, handler, shutdown, tracker)
        .run()
        .await;
}

/// Serves HTTP/1.1 on a TLS connection until the client or the hub closes it.
#[derive(Debug, Clone)]
struct Https {
    router: Router,
    shutdown: CancellationToken,
}

impl Handler for Https {
    const NAME: &'static str = "HTTPS";
    const HANDSHAKE_TIMEOUT: Duration = HANDSHAKE_TIMEOUT;

    fn span(&self, peer: SocketAddr) -> Span {
        tracing::debug_span!("https", %peer)
    }

    async fn handle(self, connection: Accepted) {
        let admission: Admission = connection.admission;
        let router = TowerToHyperService::new(self.router);
        let service = service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(admission.clone());
            router.call(request)
        });
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(connection.stream), service)
            .with_upgrades();
        tokio::pin!(connection);
        let result = tokio::select! {
            result = connection.as_mut() => result,
            () = self.shutdown.cancelled() => {
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
