//! The hub's change feed: which devices and jobs changed, for watchers such as the dashboard's
//! live view. A change costs one atomic load while nobody watches, so the device and job paths
//! publish unconditionally.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::broadcast;

/// How many changes a watcher may fall behind before it is told to read everything again
/// ([`broadcast::error::RecvError::Lagged`]). A twin job over 10,000 devices publishes 10,000
/// changes in well under a second; a watcher drains them in batches.
pub const FEED_CAPACITY: usize = 16 * 1024;

/// One thing that changed. Only the id travels: a watcher reads what it shows itself, through
/// the same routes (and permission checks) as any service client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A device's identity, twin or connection state changed, or it was deleted.
    Device(Arc<str>),
    /// A device sent telemetry.
    Telemetry(Arc<str>),
    /// A job was created, progressed or ended.
    Job(Arc<str>),
}

/// The feed: cheap to publish on, fanned out to every watcher.
#[derive(Debug)]
pub struct Feed {
    watchers: Arc<AtomicUsize>,
    sender: broadcast::Sender<Change>,
}

impl Default for Feed {
    fn default() -> Self {
        Feed {
            watchers: Arc::new(AtomicUsize::new(0)),
            sender: broadcast::Sender::new(FEED_CAPACITY),
        }
    }
}

impl Feed {
    /// Publishes the change `make` builds, only if someone watches (so ids are not copied for
    /// nobody).
    pub fn publish(&self, make: impl FnOnce() -> Change) {
        if self.watchers.load(Ordering::Relaxed) > 0 {
            // A send only fails when every receiver has gone meanwhile: nobody to tell.
            let _ = self.sender.send(make());
        }
    }

    /// Starts watching: the returned receiver sees every change published from now.
    pub fn watch(&self) -> Watcher {
        self.watchers.fetch_add(1, Ordering::Relaxed);
        Watcher {
            watchers: Arc::clone(&self.watchers),
            receiver: self.sender.subscribe(),
        }
    }
}

/// A watcher of the [`Feed`]; it stops counting as one when dropped.
#[derive(Debug)]
pub struct Watcher {
    watchers: Arc<AtomicUsize>,
    /// The changes, in publish order.
    pub receiver: broadcast::Receiver<Change>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.watchers.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_watchers_receive_and_unwatched_changes_are_not_built() {
        let feed = Feed::default();
        feed.publish(|| panic!("no watcher: the change must not be built"));
        let mut watcher = feed.watch();
        feed.publish(|| Change::Device("a".into()));
        assert_eq!(
            watcher.receiver.recv().await.ok(),
            Some(Change::Device("a".into()))
        );
        drop(watcher);
        feed.publish(|| panic!("the watcher left: the change must not be built"));
    }
}
