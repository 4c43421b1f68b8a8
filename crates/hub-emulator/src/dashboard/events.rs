//! `GET /$dashboard/events`: the hub's change feed ([`crate::feed`]) as server-sent events, in
//! batches. A batch gathers what changed over [`BATCH_WINDOW`] into one event naming the devices,
//! the devices that sent telemetry and the jobs; the page then reads what it shows through the
//! REST API. So an open page costs the hub one event per window however busy the fleet is, and
//! a batch naming more than [`MAX_NAMED`] ids says `resync` (read everything shown again)
//! instead, as does a watcher that fell behind the feed.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;

use crate::feed::{Change, Watcher};
use crate::http::{ApiError, AppState};

/// How long changes are gathered into one event: quick enough to look live, slow enough that
/// a job over 10,000 devices is a handful of events.
pub const BATCH_WINDOW: Duration = Duration::from_millis(250);
/// Most ids one event names before it says `resync` instead.
pub const MAX_NAMED: usize = 200;
/// A comment line after this much quiet, so proxies and the browser keep the stream open.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// One batch, as the page reads it (`event: changes`).
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
struct Batch {
    devices: BTreeSet<String>,
    telemetry: BTreeSet<String>,
    jobs: BTreeSet<String>,
    resync: bool,
}

impl Batch {
    fn add(&mut self, change: Change) {
        if self.resync {
            return;
        }
        match change {
            Change::Device(id) => self.devices.insert(id.to_string()),
            Change::Telemetry(id) => self.telemetry.insert(id.to_string()),
            Change::Job(id) => self.jobs.insert(id.to_string()),
        };
        if self.devices.len() + self.telemetry.len() + self.jobs.len() > MAX_NAMED {
            *self = Batch {
                resync: true,
                ..Batch::default()
            };
        }
    }

    fn lagged() -> Batch {
        Batch {
            resync: true,
            ..Batch::default()
        }
    }
}

pub(super) async fn events(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let allowed = state
        .dashboard
        .as_ref()
        .map(|dashboard| dashboard.authorize_stream(&headers));
    if allowed != Some(true) {
        return Err(ApiError::unauthorized(
            "the dashboard's event stream needs the dashboard's cookie; open the link the hub \
             printed when it started",
        ));
    }
    let watcher = state.hub.feed().watch();
    let shutdown = state.shutdown.clone();
    let stream = futures_util::stream::unfold(
        (watcher, shutdown, true),
        |(mut watcher, shutdown, first)| async move {
            if first {
                // Tells the page the stream is up, so it can read its view once, knowing
                // nothing that changes from now on is missed.
                let hello = Bytes::from_static(b"event: ready\ndata: {}\n\n");
                return Some((Ok::<_, Infallible>(hello), (watcher, shutdown, false)));
            }
            let chunk = next_chunk(&mut watcher, &shutdown, KEEP_ALIVE).await?;
            Some((Ok(chunk), (watcher, shutdown, false)))
        },
    );
    Ok((
        [
            (CONTENT_TYPE, "text/event-stream"),
            (CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// The next bytes of the stream: a batch, or a keep-alive comment; `None` at shutdown or when
/// the feed is gone.
async fn next_chunk(
    watcher: &mut Watcher,
    shutdown: &tokio_util::sync::CancellationToken,
    keep_alive: Duration,
) -> Option<Bytes> {
    let mut batch = tokio::select! {
        () = shutdown.cancelled() => return None,
        () = tokio::time::sleep(keep_alive) => return Some(Bytes::from_static(b": keep-alive\n\n")),
        received = watcher.receiver.recv() => match received {
            Ok(change) => {
                let mut batch = Batch::default();
                batch.add(change);
                batch
            }
            Err(RecvError::Lagged(_)) => Batch::lagged(),
            Err(RecvError::Closed) => return None,
        },
    };
    let until = Instant::now() + BATCH_WINDOW;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep_until(until) => break,
            received = watcher.receiver.recv() => match received {
                Ok(change) => batch.add(change),
                Err(RecvError::Lagged(_)) => batch = Batch::lagged(),
                Err(RecvError::Closed) => break,
            },
        }
    }
    let data = serde_json::to_string(&batch).unwrap_or_else(|_| r#"{"resync":true}"#.to_owned());
    Some(Bytes::from(format!("event: changes\ndata: {data}\n\n")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_naming_too_many_ids_says_resync() {
        let mut batch = Batch::default();
        batch.add(Change::Device("a".into()));
        batch.add(Change::Device("a".into()));
        batch.add(Change::Job("j".into()));
        assert_eq!(
            (batch.devices.len(), batch.jobs.len(), batch.resync),
            (1, 1, false)
        );
        for n in 0..MAX_NAMED {
            batch.add(Change::Telemetry(format!("d{n}").into()));
        }
        assert!(batch.resync);
        assert!(batch.devices.is_empty() && batch.telemetry.is_empty());
    }

    #[tokio::test]
    async fn changes_within_the_window_are_one_event() {
        let feed = crate::feed::Feed::default();
        let mut watcher = feed.watch();
        let shutdown = tokio_util::sync::CancellationToken::new();
        feed.publish(|| Change::Device("a".into()));
        feed.publish(|| Change::Job("j".into()));
        let chunk = next_chunk(&mut watcher, &shutdown, Duration::from_millis(50))
            .await
            .expect("a batch");
        let text = String::from_utf8(chunk.to_vec()).expect("utf8");
        assert_eq!(
            text,
            "event: changes\ndata: {\"devices\":[\"a\"],\"telemetry\":[],\"jobs\":[\"j\"],\"resync\":false}\n\n"
        );
        let quiet = next_chunk(&mut watcher, &shutdown, Duration::from_millis(50))
            .await
            .expect("keep-alive");
        assert_eq!(&quiet[..], b": keep-alive\n\n");
        shutdown.cancel();
        assert!(
            next_chunk(&mut watcher, &shutdown, Duration::from_millis(50))
                .await
                .is_none()
        );
    }
}
