//! The accept loop both ports share (MQTT over TLS and HTTPS): the two connection budgets, one
//! backoff policy for accept errors, and one task per connection that does the TLS handshake
//! under a deadline and then hands the stream to the port's [`Handler`].
//!
//! Budgets: a connection starts *pending* (TLS handshake, MQTT CONNECT, an HTTP request whose
//! token has not been checked) and becomes *admitted* once it authenticates
//! ([`Admission::admit`]). The pending budget is small: when it is full, the oldest pending
//! connection is evicted (closed) to make room once it has been pending for
//! [`ConnectionBudget::evict_after`], so clients that open connections and never authenticate
//! (half-open TLS, silent sockets, slow headers) cannot lock out a device whose handshake takes
//! milliseconds. Younger connections are not evicted: when the budget is full of them (a fleet
//! reconnecting at once after a restart), `accept` waits for a place instead, so a flood of
//! legitimate handshakes is served at the hub's pace rather than thrashing. The admitted budget bounds authenticated sessions; a client that authenticates while
//! it is full is told so by its protocol (MQTT CONNACK 3, HTTP `Connection: close`). Together
//! the two bound the descriptors the port can hold, whatever clients do.
//!
//! Invariants: the loop never awaits a client (no handshake, no read), so one slow or hostile
//! client cannot stall accepting others; a connection keeps its place in a budget for as long
//! as anything serves it ([`Admission`] is shared by whatever outlives the connection's task,
//! e.g. an upgraded WebSocket session); the loop, its backoff and pending handshakes all stop
//! at shutdown.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
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

/// How long a pending connection is safe from eviction by default: well over a legitimate TLS
/// handshake plus CONNECT even on a busy hub (milliseconds to a few hundred), far under the
/// 10 s a client that never authenticates would otherwise hold its place.
pub const PENDING_EVICTION_AGE: Duration = Duration::from_secs(1);

/// How many connections one port may hold: `admitted` authenticated ones, plus `pending` ones
/// that have not authenticated yet (at least one each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionBudget {
    /// Authenticated connections (device sessions, REST clients that sent a valid token).
    pub admitted: usize,
    /// Connections still in their TLS handshake, before CONNECT or before a valid token.
    pub pending: usize,
    /// How long a pending connection is safe from eviction.
    pub evict_after: Duration,
}

impl ConnectionBudget {
    /// The most descriptors the port's connections can take.
    pub fn total(self) -> usize {
        self.admitted.saturating_add(self.pending)
    }
}

/// What one port does with a connection once its TLS handshake is done.
pub(crate) trait Handler: Clone + Send + Sync + 'static {
    /// The port's name in logs.
    const NAME: &'static str;
    /// How long a client has, from `accept`, to finish the TLS handshake.
    const HANDSHAKE_TIMEOUT: Duration;

    /// The span the connection's task runs in, handshake included.
    fn span(&self, peer: SocketAddr) -> Span;

    /// Serves one connection; it closes when this returns (unless something kept its
    /// admission). The listener stops it if the connection is evicted while still pending.
    fn handle(self, connection: Accepted) -> impl Future<Output = ()> + Send;
}

/// A connection that passed its TLS handshake.
#[derive(Debug)]
pub(crate) struct Accepted {
    pub(crate) stream: TlsStream<TcpStream>,
    /// When `accept` returned: the start of any connect deadline.
    pub(crate) accepted_at: Instant,
    pub(crate) admission: Admission,
}

/// A connection's place in its port's budgets, freed when the last clone is dropped. Whatever
/// outlives the connection's task (an upgraded WebSocket session) keeps a clone, so it still
/// counts.
#[derive(Debug, Clone)]
pub(crate) struct Admission {
    inner: Arc<AdmissionInner>,
}

#[derive(Debug)]
struct AdmissionInner {
    stage: Mutex<Stage>,
    admitted: Arc<Semaphore>,
    /// Cancelled when the connection is evicted from the pending budget.
    evicted: CancellationToken,
}

#[derive(Debug)]
enum Stage {
    /// In the pending order (leaves it when replaced or dropped).
    Pending {
        _place: PendingPlace,
    },
    Admitted {
        _permit: OwnedSemaphorePermit,
    },
}

/// The admitted budget is full: the connection stays pending (and evictable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AdmittedFull;

impl Admission {
    /// Moves the connection into the admitted budget (idempotent). When that budget is full the
    /// connection stays pending: the caller tells the client (CONNACK 3, `Connection: close`).
    pub(crate) fn admit(&self) -> Result<(), AdmittedFull> {
        let mut stage = self
            .inner
            .stage
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if matches!(*stage, Stage::Admitted { .. }) {
            return Ok(());
        }
        let permit = Arc::clone(&self.inner.admitted)
            .try_acquire_owned()
            .map_err(|_| AdmittedFull)?;
        // Dropping the pending place takes the connection out of the eviction order.
        *stage = Stage::Admitted { _permit: permit };
        Ok(())
    }

    /// An admission in a budget of its own (one place of each kind), for the socket-free
    /// fuzzing entry point.
    #[cfg(feature = "fuzzing")]
    pub(crate) fn alone() -> Admission {
        Budgets::new(ConnectionBudget {
            admitted: 1,
            pending: 1,
            evict_after: PENDING_EVICTION_AGE,
        })
        .enter()
    }

    /// Resolves when the connection is evicted from the pending budget (never once admitted).
    pub(crate) async fn evicted(&self) {
        self.inner.evicted.cancelled().await;
    }
}

/// The pending budget: connections in arrival order; room for a new one is made by evicting
/// the oldest once it is old enough. A std mutex, held for a map operation and never across an
/// await.
#[derive(Debug)]
struct PendingQueue {
    cap: usize,
    evict_after: Duration,
    order: Mutex<PendingOrder>,
    /// Signalled when a connection leaves the order (the accept loop may be waiting for room).
    left: Notify,
}

#[derive(Debug, Default)]
struct PendingOrder {
    next: u64,
    waiting: BTreeMap<u64, (CancellationToken, Instant)>,
}

/// One connection's place in the pending order; leaves it when dropped.
#[derive(Debug)]
struct PendingPlace {
    id: u64,
    queue: Arc<PendingQueue>,
}

impl PendingQueue {
    /// Makes room for one more connection by evicting connections pending for at least
    /// `evict_after`, oldest first; when the queue is full of younger ones, says when the
    /// oldest becomes evictable.
    fn make_room(&self, now: Instant) -> Result<(), Instant> {
        let mut order = self.order.lock().unwrap_or_else(PoisonError::into_inner);
        while order.waiting.len() >= self.cap {
            let Some(mut oldest) = order.waiting.first_entry() else {
                break;
            };
            let evictable_at = oldest.get().1 + self.evict_after;
            if evictable_at > now {
                return Err(evictable_at);
            }
            oldest.get_mut().0.cancel();
            oldest.remove();
        }
        Ok(())
    }

    /// Waits until a new connection fits (see [`PendingQueue::make_room`]).
    async fn room(&self) {
        loop {
            // Registered before the check: a place freed in between is not missed (notify_one
            // keeps the wake-up for the next waiter).
            let left = self.left.notified();
            match self.make_room(Instant::now()) {
                Ok(()) => return,
                Err(evictable_at) => {
                    tokio::select! {
                        () = left => {}
                        () = tokio::time::sleep_until(evictable_at) => {}
                    }
                }
            }
        }
    }

    /// Enters a new connection; the caller made room first ([`PendingQueue::room`]), anything
    /// still over the cap evicts the oldest.
    fn enter(self: &Arc<Self>, evicted: CancellationToken) -> PendingPlace {
        let mut order = self.order.lock().unwrap_or_else(PoisonError::into_inner);
        while order.waiting.len() >= self.cap {
            let Some((_, (oldest, _))) = order.waiting.pop_first() else {
                break;
            };
            oldest.cancel();
        }
        let id = order.next;
        order.next += 1;
        order.waiting.insert(id, (evicted, Instant::now()));
        PendingPlace {
            id,
            queue: Arc::clone(self),
        }
    }
}

impl Drop for PendingPlace {
    fn drop(&mut self) {
        let mut order = self
            .queue
            .order
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        order.waiting.remove(&self.id);
        drop(order);
        self.queue.left.notify_one();
    }
}

/// Both budgets of one port.
#[derive(Debug)]
struct Budgets {
    pending: Arc<PendingQueue>,
    admitted: Arc<Semaphore>,
}

impl Budgets {
    fn new(budget: ConnectionBudget) -> Budgets {
        Budgets {
            pending: Arc::new(PendingQueue {
                cap: budget.pending.max(1),
                evict_after: budget.evict_after,
                order: Mutex::default(),
                left: Notify::new(),
            }),
            admitted: Arc::new(Semaphore::new(budget.admitted.max(1))),
        }
    }

    /// A new connection's admission: pending, possibly evicting the oldest pending one.
    fn enter(&self) -> Admission {
        let evicted = CancellationToken::new();
        let place = self.pending.enter(evicted.clone());
        Admission {
            inner: Arc::new(AdmissionInner {
                stage: Mutex::new(Stage::Pending { _place: place }),
                admitted: Arc::clone(&self.admitted),
                evicted,
            }),
        }
    }
}

/// Accepts TLS connections on one port and runs each on its own task.
pub(crate) struct Listener<H> {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    budgets: Budgets,
    handler: H,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl<H: Handler> Listener<H> {
    /// A listener holding at most `budget` connections at once.
    pub(crate) fn new(
        listener: TcpListener,
        acceptor: TlsAcceptor,
        budget: ConnectionBudget,
        handler: H,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Listener<H> {
        Listener {
            listener,
            acceptor,
            budgets: Budgets::new(budget),
            handler,
            shutdown,
            tracker,
        }
    }

    /// Runs until `shutdown`; the port closes when this returns.
    pub(crate) async fn run(self) {
        let mut backoff = ACCEPT_BACKOFF.0;
        loop {
            // Room in the pending budget first: at the cap, new clients wait in the kernel's
            // backlog until a pending connection leaves or grows old enough to be evicted.
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break,
                () = self.budgets.pending.room() => {}
            }
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
            let admission = self.budgets.enter();
            let span = self.handler.span(peer);
            let task = connection(
                socket,
                accepted_at,
                admission,
                self.acceptor.clone(),
                self.handler.clone(),
                self.shutdown.clone(),
            );
            self.tracker.spawn(task.instrument(span));
        }
        debug!("{} listener stopped", H::NAME);
    }
}

/// One connection's task: the TLS handshake, then the handler; both end early if the
/// connection is evicted while it is still pending.
async fn connection<H: Handler>(
    socket: TcpStream,
    accepted_at: Instant,
    admission: Admission,
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
        () = admission.evicted() => {
            debug!("evicted during the TLS handshake: newer connections need the pending budget");
            return;
        }
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
    // This task keeps its own clone, so the place stays taken until the handler is done even
    // if the handler drops the one it gets.
    let connection = Accepted {
        stream,
        accepted_at,
        admission: admission.clone(),
    };
    tokio::select! {
        () = handler.handle(connection) => {}
        () = admission.evicted() => {
            debug!("evicted before authenticating: newer connections need the pending budget");
        }
    }
    drop(admission);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budgets(admitted: usize, pending: usize) -> Budgets {
        Budgets::new(ConnectionBudget {
            admitted,
            pending,
            evict_after: Duration::ZERO,
        })
    }

    fn is_evicted(admission: &Admission) -> bool {
        admission.inner.evicted.is_cancelled()
    }

    #[test]
    fn a_full_pending_budget_evicts_its_oldest_connection() {
        let budgets = budgets(10, 3);
        let first: Vec<Admission> = (0..3).map(|_| budgets.enter()).collect();
        assert!(first.iter().all(|a| !is_evicted(a)));
        let newer = budgets.enter();
        assert!(is_evicted(&first[0]), "the oldest makes room");
        assert!(!is_evicted(&first[1]) && !is_evicted(&first[2]) && !is_evicted(&newer));
        // A connection that left frees its place: no eviction for the next one.
        drop(first);
        let _more: Vec<Admission> = (0..2).map(|_| budgets.enter()).collect();
        assert!(!is_evicted(&newer));
    }

    #[test]
    fn an_admitted_connection_leaves_the_pending_order_and_is_never_evicted() {
        let budgets = budgets(2, 2);
        let device = budgets.enter();
        assert_eq!(device.admit(), Ok(()));
        assert_eq!(device.admit(), Ok(()), "admitting twice takes one place");
        let flood: Vec<Admission> = (0..10).map(|_| budgets.enter()).collect();
        assert!(!is_evicted(&device));
        assert_eq!(flood.iter().filter(|a| !is_evicted(a)).count(), 2);
        assert_eq!(budgets.admitted.available_permits(), 1);
        let second = &flood[9];
        assert_eq!(second.admit(), Ok(()));
        assert_eq!(
            flood[8].admit(),
            Err(AdmittedFull),
            "the admitted budget is full"
        );
        assert!(!is_evicted(&flood[8]), "a refused admission stays pending");
        drop(device);
        assert_eq!(
            flood[8].admit(),
            Ok(()),
            "a place freed by a session that ended"
        );
    }

    #[tokio::test]
    async fn young_pending_connections_are_not_evicted_the_accept_loop_waits_for_room() {
        let budgets = Budgets::new(ConnectionBudget {
            admitted: 10,
            pending: 2,
            evict_after: Duration::from_millis(200),
        });
        let first = budgets.enter();
        let second = budgets.enter();
        let now = Instant::now();
        let evictable_at = budgets.pending.make_room(now).expect_err("both are young");
        assert!(evictable_at > now && evictable_at <= now + Duration::from_millis(200));
        assert!(!is_evicted(&first) && !is_evicted(&second));
        // A connection that leaves makes room at once.
        drop(second);
        tokio::time::timeout(Duration::from_millis(50), budgets.pending.room())
            .await
            .expect("room once a connection left");
        let third = budgets.enter();
        // Once old enough, the oldest is evicted to make room.
        tokio::time::timeout(Duration::from_secs(2), budgets.pending.room())
            .await
            .expect("room once the oldest may be evicted");
        assert!(is_evicted(&first));
        assert!(!is_evicted(&third));
    }

    #[test]
    fn an_admission_shared_by_an_upgraded_session_holds_its_place_until_the_last_clone() {
        let budgets = budgets(1, 1);
        let connection = budgets.enter();
        let session = connection.clone();
        drop(connection);
        assert_eq!(session.admit(), Ok(()));
        let other = budgets.enter();
        assert_eq!(other.admit(), Err(AdmittedFull));
        drop(session);
        assert_eq!(other.admit(), Ok(()));
    }
}
