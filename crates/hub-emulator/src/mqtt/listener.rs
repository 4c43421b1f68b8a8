//! The MQTT-over-TLS port's [`Handler`] for the shared [`crate::listener`]: no ALPN, and each
//! connection runs one device session under the connect deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{Span, info_span};

use super::transport::ByteStream;
use super::{CONNECT_TIMEOUT, session};
use crate::hub::Hub;
use crate::listener::{Accepted, Handler};

/// Serves MQTT sessions on TLS connections.
#[derive(Debug, Clone)]
pub(super) struct Mqtt {
    pub(super) hub: Hub,
    pub(super) throttles: crate::throttle::Throttles,
    pub(super) shutdown: CancellationToken,
}

/// `acceptor` without ALPN. The shared server config advertises ALPN `http/1.1` for the HTTPS
/// port; a device that offers ALPN (e.g. `mqtt`) would then fail the handshake, so MQTT
/// negotiates none.
pub(super) fn without_alpn(acceptor: &TlsAcceptor) -> TlsAcceptor {
    let mut config = (**acceptor.config()).clone();
    config.alpn_protocols.clear();
    TlsAcceptor::from(Arc::new(config))
}

impl Handler for Mqtt {
    const NAME: &'static str = "MQTT";
    // The handshake and CONNECT share one deadline, so the handshake may use all of it.
    const HANDSHAKE_TIMEOUT: Duration = CONNECT_TIMEOUT;

    fn span(&self, peer: SocketAddr) -> Span {
        info_span!("mqtt", %peer, device_id = tracing::field::Empty)
    }

    async fn handle(self, connection: Accepted) {
        let deadline = connection.accepted_at + CONNECT_TIMEOUT;
        session::run(
            ByteStream(connection.stream),
            self.hub,
            self.shutdown,
            deadline,
            connection.admission,
            self.throttles,
        )
        .await;
    }
}
