//! `GET /$dashboard/events`: the hub's change feed ([`crate::feed`]) as server-sent events, in
//! batches. A batch is one event naming the devices that changed, the devices that sent telemetry
//! and the jobs; the page then reads what it shows through the REST API. A change after a quiet
//! spell goes out at once; after that, at most one batch per [`BATCH_WINDOW`] gathers what
//! changed meanwhile. So an open page costs the hub a few events a second however busy the
//! fleet is, and a batch naming more than [`MAX_NAMED`] ids says `resync` (read everything shown
//! again) instead, as does a watcher that fell behind the feed.

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
    let stream = futures_util::stream::unfold(
        (watcher, state.shutdown.clone(), None),
        |(mut watcher, shutdown, last_batch)| async move {
            let Some(last_batch) = last_batch else {
                // Tells the page the stream is up, so it can read its view once, knowing
                // nothing that changes from now on is missed.
                let hello = Bytes::from_static(b"event: ready\ndata: {}\n\n");
                return Some((Ok::<_, Infallible>(hello), (watcher, shutdown, Some(None))));
            };
            let (chunk, sent) = next_chunk(&mut watcher, &shutdown, last_batch, KEEP_ALIVE).await?;
            Some((Ok(chunk), (watcher, shutdown, Some(sent.or(last_batch)))))
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

/// The next bytes of the stream and, for a batch, when it was made: a batch, or a keep-alive
/// comment; `None` at shutdown or when the feed is gone. A change after a quiet spell goes out at
/// once (with whatever is already queued); later ones wait until [`BATCH_WINDOW`] after the
/// previous batch (`last_batch`), so a busy fleet makes one event per window.
async fn next_chunk(
    watcher: &mut Watcher,
    shutdown: &tokio_util::sync::CancellationToken,
    last_batch: Option<Instant>,
    keep_alive: Duration,
) -> Option<(Bytes, Option<Instant>)> {
    let mut batch = tokio::select! {
        () = shutdown.cancelled() => return None,
        () = tokio::time::sleep(keep_alive) => {
            return Some((Bytes::from_static(b": keep-alive\n\n"), None));
        }
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
    let now = Instant::now();
    let until = last_batch.map_or(now, |last| (last + BATCH_WINDOW).max(now));
    loop {
        tokio::select! {
            // Queued changes first: with `until` already here, they still join this batch.
            biased;
            () = shutdown.cancelled() => return None,
            received = watcher.receiver.recv() => match received {
                Ok(change) => batch.add(change),
                Err(RecvError::Lagged(_)) => batch = Batch::lagged(),
                Err(RecvError::Closed) => break,
            },
            () = tokio::time::sleep_until(until) => break,
        }
    }
    let data = serde_json::to_string(&batch).unwrap_or_else(|_| r#"{"resync":true}"#.to_owned());
    Some((
        Bytes::from(format!("event: changes\ndata: {data}\n\n")),
        Some(Instant::now()),
    ))
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
    async fn a_change_after_quiet_goes_at_once_and_later_ones_wait_for_the_window() {
        let feed = crate::feed::Feed::default();
        let mut watcher = feed.watch();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let quick = Duration::from_millis(50);
        feed.publish(|| Change::Device("a".into()));
        feed.publish(|| Change::Job("j".into()));
        let started = Instant::now();
        let (chunk, sent) = next_chunk(&mut watcher, &shutdown, None, quick)
            .await
            .expect("a batch");
        assert!(
            started.elapsed() < BATCH_WINDOW,
            "the first batch does not wait"
        );
        let text = String::from_utf8(chunk.to_vec()).expect("utf8");
        assert_eq!(
            text,
            "event: changes\ndata: {\"devices\":[\"a\"],\"telemetry\":[],\"jobs\":[\"j\"],\"resync\":false}\n\n"
        );
        let sent = sent.expect("a batch's time");
        feed.publish(|| Change::Telemetry("b".into()));
        let (chunk, _) = next_chunk(&mut watcher, &shutdown, Some(sent), quick)
            .await
            .expect("a batch");
        assert!(
            sent.elapsed() >= BATCH_WINDOW,
            "the next batch waits for the window"
        );
        assert!(String::from_utf8_lossy(&chunk).contains("\"telemetry\":[\"b\"]"));

        let (quiet, none) = next_chunk(&mut watcher, &shutdown, Some(sent), quick)
            .await
            .expect("keep-alive");
        assert_eq!((&quiet[..], none), (&b": keep-alive\n\n"[..], None));
        shutdown.cancel();
        assert!(
            next_chunk(&mut watcher, &shutdown, None, quick)
                .await
                .is_none()
        );
    }
}
