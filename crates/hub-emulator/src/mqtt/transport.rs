//! What a session needs from its connection: read some bytes, write a batch, close. Implemented
//! for any byte stream (TLS) here and for WebSocket binary frames in `websocket`.
//!
//! Invariant: `read_into` is cancel-safe (the session selects on it), so bytes are either
//! appended to the buffer or left in the connection, never lost.

use std::future::Future;
use std::io;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A device connection as the session sees it.
pub(crate) trait MqttIo: Send {
    /// Appends bytes from the peer to `buf` (using its spare capacity); `Ok(0)` means the peer
    /// closed. Cancel-safe.
    fn read_into(&mut self, buf: &mut BytesMut) -> impl Future<Output = io::Result<usize>> + Send;

    /// Writes and flushes everything in `buf`, leaving it empty (its capacity is kept).
    fn send(&mut self, buf: &mut BytesMut) -> impl Future<Output = io::Result<()>> + Send;

    /// Closes the connection politely (TLS close_notify, WebSocket close frame).
    fn close(&mut self) -> impl Future<Output = ()> + Send;
}

/// A byte stream (TLS over TCP) carrying MQTT directly.
#[derive(Debug)]
pub(crate) struct ByteStream<S>(pub S);

impl<S> MqttIo for ByteStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    async fn read_into(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        // `read_buf` fills only the spare capacity the session reserved: buffers grow on demand.
        self.0.read_buf(buf).await
    }

    async fn send(&mut self, buf: &mut BytesMut) -> io::Result<()> {
        self.0.write_all(buf).await?;
        buf.clear();
        self.0.flush().await
    }

    async fn close(&mut self) {
        let _ = self.0.shutdown().await;
    }
}
