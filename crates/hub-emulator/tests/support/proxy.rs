//! A TCP proxy for fault injection: listens on 127.0.0.1:0, forwards every connection to one
//! upstream address, and lets a test delay, black-hole (read and drop) or stall (stop reading,
//! keep the socket open) each direction, or cut (reset) every connection, then resume.
//! Invariant: a mode applies to bytes read after it is set; a stalled direction reads nothing,
//! so the sender sees TCP back-pressure, as with a frozen peer.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// One direction of every proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client to upstream (device to hub).
    Up,
    /// Upstream to client (hub to device).
    Down,
}

/// What a direction does with the bytes it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward at once.
    Forward,
    /// Forward each chunk this long after it was read (latency, not a throughput cap).
    Delay(Duration),
    /// Read and drop: the sender thinks it was sent, nothing arrives.
    BlackHole,
    /// Read nothing until the mode changes; bytes already read are still forwarded.
    Stall,
}

/// The proxy; stops accepting and resets its connections when dropped.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    up: watch::Sender<Mode>,
    down: watch::Sender<Mode>,
    /// Replaced by [`Proxy::cut`]: every connection watches the token current when it started.
    cut: Arc<Mutex<CancellationToken>>,
    accepted: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl Proxy {
    /// Starts a proxy in front of `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (up, up_rx) = watch::channel(Mode::Forward);
        let (down, down_rx) = watch::channel(Mode::Forward);
        let cut = Arc::new(Mutex::new(CancellationToken::new()));
        let accepted = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let proxy = Proxy {
            addr,
            up,
            down,
            cut: Arc::clone(&cut),
            accepted: Arc::clone(&accepted),
            stop: stop.clone(),
        };
        tokio::spawn(async move {
            loop {
                let client = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((client, _)) => client,
                        Err(_) => continue,
                    },
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let (up_rx, down_rx) = (up_rx.clone(), down_rx.clone());
                let cut = lock(&cut).clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    relay(client, server, up_rx, down_rx, cut, stop).await;
                });
            }
        });
        proxy
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Sets one direction's mode (for current and future connections).
    pub fn set(&self, direction: Direction, mode: Mode) {
        let sender = match direction {
            Direction::Up => &self.up,
            Direction::Down => &self.down,
        };
        sender.send_replace(mode);
    }

    /// Both directions forward at once again.
    pub fn resume(&self) {
        self.set(Direction::Up, Mode::Forward);
        self.set(Direction::Down, Mode::Forward);
    }

    /// Resets every current connection (RST to both peers); new ones are accepted as before.
    pub fn cut(&self) {
        std::mem::take(&mut *lock(&self.cut)).cancel();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut();
    }
}

fn lock(cut: &Mutex<CancellationToken>) -> MutexGuard<'_, CancellationToken> {
    // Held for a clone or a swap only; a poisoned lock still holds a valid token.
    cut.lock().unwrap_or_else(|e| e.into_inner())
}

/// Relays one connection until either side closes, a cut, or the proxy stops.
async fn relay(
    client: TcpStream,
    server: TcpStream,
    up: watch::Receiver<Mode>,
    down: watch::Receiver<Mode>,
    cut: CancellationToken,
    stop: CancellationToken,
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    // A cut must reset, not close gracefully: a zero linger makes the close send RST.
    let _ = client.set_zero_linger();
    let _ = server.set_zero_linger();
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::select! {
        _ = cut.cancelled() => {}
        _ = stop.cancelled() => {}
        _ = async {
            tokio::join!(
                pump(client_read, server_write, up),
                pump(server_read, client_write, down),
            )
        } => {}
    }
}

/// One direction: reads (unless stalled), then forwards, delays or drops what it read.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut mode: watch::Receiver<Mode>) {
    let (queue, mut queued) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = async move {
        while let Some((at, bytes)) = queued.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            while *mode.borrow_and_update() == Mode::Stall {
                if mode.changed().await.is_err() {
                    return;
                }
            }
            let n = tokio::select! {
                read = from.read(&mut buf) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                },
                // A stall set while waiting for bytes takes effect before the next read.
                changed = mode.changed() => {
                    if changed.is_err() { return; }
                    continue;
                }
            };
            let at = match *mode.borrow() {
                Mode::BlackHole => continue,
                Mode::Delay(delay) => Instant::now() + delay,
                Mode::Forward | Mode::Stall => Instant::now(),
            };
            if queue.send((at, buf[..n].to_vec())).is_err() {
                return;
            }
        }
    };
    tokio::join!(reader, writer);
}
