//! `POST /devices/query`: the IoT Hub query language over twins (`FROM devices`), module twins
//! (`FROM devices.modules`) and device-job rows (`FROM devices.jobs`), answered as a JSON array
//! with `x-ms-item-type` and, when more rows follow, `x-ms-continuation` (reference §4.5).
//!
//! Paging invariant: every query pages, at most 100 rows a page. A continuation token names
//! where the last page ended — the last document (its device id, its (deviceId, moduleId) for
//! `devices.modules`, or its (jobId, deviceId) for `devices.jobs`) for `SELECT *` and
//! projections, the last group for aggregates — and the next
//! page starts strictly after it in that order, so while the registry changes no row appears
//! twice and no row (or group) that existed throughout is skipped.

use std::sync::{Arc, OnceLock};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as BASE64URL;
use serde_json::Value;
use tokio::sync::Semaphore;

use hub_core::policy::Permission;
use hub_core::query::{
    HEADER_CONTINUATION as CONTINUATION_HEADER, HEADER_ITEM_TYPE as ITEM_TYPE_HEADER,
    HEADER_MAX_ITEM_COUNT as MAX_ITEM_COUNT_HEADER, QueryItemType, QuerySpecification,
};

use super::AppState;
use super::auth::require;
use super::error::ApiError;
use super::extract::JsonBody;
use crate::query::{
    self, GroupPosition, Projection, Query, QueryError, QueryErrorKind, RowShape, Source,
};

/// `POST /devices/query`.
pub async fn query_devices(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(spec): JsonBody<QuerySpecification>,
) -> Result<Response, ApiError> {
    require(&state, &headers, Permission::ServiceConnect)?;
    let query = query::parse(&spec.query).map_err(query_error)?;
    let page_size = hub_core::query::page_size(
        headers
            .get(MAX_ITEM_COUNT_HEADER)
            .and_then(|v| v.to_str().ok()),
    );
    let continuation = headers
        .get(CONTINUATION_HEADER)
        .map(|v| v.to_str().map_err(|_| bad_token()))
        .transpose()?
        .filter(|t| !t.is_empty())
        .map(str::to_owned);
    // A full scan of a large registry takes tens of milliseconds of CPU: keep it off the async
    // workers that serve every other request and device session, and run at most
    // `scan_slots()` at a time, so that queries arriving together wait for each other (without
    // holding a thread) instead of taking every core from twin reads and device sessions.
    let _slot = scan_slots().acquire().await.map_err(ApiError::internal)?;
    let page = tokio::task::spawn_blocking(move || {
        compute_page(&state, &query, continuation.as_deref(), page_size)
    })
    .await
    .map_err(ApiError::internal)??;

    let mut response = Json(page.rows).into_response();
    let headers = response.headers_mut();
    headers.insert(
        ITEM_TYPE_HEADER,
        HeaderValue::from_static(page.item_type.as_str()),
    );
    // Omitted on the last page: Node reads an empty header as "more results" (reference §8.9).
    if let Some(token) = page.next.and_then(|t| HeaderValue::from_str(&t).ok()) {
        headers.insert(CONTINUATION_HEADER, token);
    }
    Ok(response)
}

/// Documents scanned per round when paging rows: a page needs only its first `limit + 1`
/// matches, so a selective WHERE reads the registry a batch at a time (each batch read in
/// short holds of the hub's lock, [`crate::hub::TWIN_READ_CHUNK`]) and stops once they are
/// known; a batch is large enough for the parallel scan to use every core.
const SCAN_BATCH: usize = 32_768;

/// The query evaluations that may run at once: half the cores (at least one). Process-wide, as
/// the cores are: every hub in the process shares them.
fn scan_slots() -> &'static Semaphore {
    static SLOTS: OnceLock<Semaphore> = OnceLock::new();
    SLOTS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        Semaphore::new((cores / 2).max(1))
    })
}

/// One page of `query`'s results, starting after `continuation`.
///
/// Every kind of query pages, projections and aggregates included: the service SDKs run every
/// query through the same page loop, resending `x-ms-continuation` while the response carries
/// one, whatever the item type [CS iothub/service/src/Query/QueryClient.cs
/// `BuildAndSendRequestAsync`; NODE service/src/query.ts `Query.next`, which plain-JSON
/// (projection) results go through too, SRS_NODE_SERVICE_QUERY_16_013]. A page holds at most
/// `page_size` rows (at most 100, [`hub_core::query::MAX_PAGE_SIZE`]), and each row is bounded:
/// a twin by its section limits, a projection by the twin it comes from, a group row by its
/// columns (the query text is at most 8,192 characters) — so a response is bounded too.
fn compute_page(
    state: &AppState,
    query: &Query,
    continuation: Option<&str>,
    page_size: usize,
) -> Result<Page, ApiError> {
    let page = match query.source {
        // An aggregate reads every matching twin for every page (IoT Hub recomputes too:
        // results are eventually consistent [DOCS query-twins "Twin query limitations"]); what
        // it keeps is bounded by the page, not by the number of groups.
        Source::Devices if query.is_aggregate() => aggregate(
            query,
            &state.hub.twin_documents_after(None),
            continuation,
            page_size,
        )?,
        Source::Devices => {
            let cursor = continuation
                .map(|t| Cursor::decode(t, 1, query.top.is_some()))
                .transpose()?;
            let returned = cursor.as_ref().map_or(0, |c| c.returned);
            let wanted = page_limit(query, returned, page_size).saturating_add(1);
            let mut after = cursor.and_then(|c| c.key.into_iter().next());
            let mut matched: Vec<Arc<Value>> = Vec::new();
            loop {
                let batch = state.hub.twin_documents_from(after.as_deref(), SCAN_BATCH);
                let still = wanted - matched.len();
                let found = match &query.condition {
                    Some(condition) => query::first_matches(condition, &batch, still),
                    None => (0..batch.len().min(still)).collect(),
                };
                matched.extend(found.iter().filter_map(|&i| batch.get(i)).cloned());
                if matched.len() >= wanted || batch.len() < SCAN_BATCH {
                    break;
                }
                after = batch.last().map(|d| text_field(d, "deviceId"));
            }
            rows_page(query, &matched, returned, page_size, |doc| {
                vec![text_field(doc, "deviceId")]
            })
        }
        Source::DevicesJobs => {
            let cursor = continuation
                .map(|t| Cursor::decode(t, 2, query.top.is_some()))
                .transpose()?;
            let returned = cursor.as_ref().map_or(0, |c| c.returned);
            let wanted = page_limit(query, returned, page_size).saturating_add(1);
            // Rows are ordered by (jobId, deviceId): start strictly after the last one sent, and
            // within the one job the condition names, if it names one (`ServiceClient::
            // device_jobs` and the SDKs ask for one job's rows).
            let after = cursor.as_ref().and_then(|c| match c.key.as_slice() {
                [job, device] => Some((job.as_str(), device.as_str())),
                _ => None,
            });
            let only = query
                .condition
                .as_ref()
                .and_then(|c| c.pinned_string("jobId"));
            let docs = state.jobs.device_job_documents(only, after);
            let matched: Vec<Arc<Value>> = match &query.condition {
                Some(condition) => query::first_matches(condition, &docs, wanted)
                    .iter()
                    .filter_map(|&i| docs.get(i))
                    .cloned()
                    .collect(),
                None => docs.into_iter().take(wanted).collect(),
            };
            rows_page(query, &matched, returned, page_size, job_key)
        }
        // As for device twins: every page of an aggregate reads every module twin.
        Source::DevicesModules if query.is_aggregate() => aggregate(
            query,
            &state.hub.module_documents_from(None, usize::MAX),
            continuation,
            page_size,
        )?,
        // Module twins in (deviceId, moduleId) order, read a batch at a time as device twins are.
        Source::DevicesModules => {
            let cursor = continuation
                .map(|t| Cursor::decode(t, 2, query.top.is_some()))
                .transpose()?;
            let returned = cursor.as_ref().map_or(0, |c| c.returned);
            let wanted = page_limit(query, returned, page_size).saturating_add(1);
            let mut after: Option<(String, String)> = cursor.and_then(|c| match c.key.as_slice() {
                [device, module] => Some((device.clone(), module.clone())),
                _ => None,
            });
            let mut matched: Vec<Arc<Value>> = Vec::new();
            loop {
                let batch = state.hub.module_documents_from(
                    after.as_ref().map(|(d, m)| (d.as_str(), m.as_str())),
                    SCAN_BATCH,
                );
                let still = wanted - matched.len();
                let found = match &query.condition {
                    Some(condition) => query::first_matches(condition, &batch, still),
                    None => (0..batch.len().min(still)).collect(),
                };
                matched.extend(found.iter().filter_map(|&i| batch.get(i)).cloned());
                if matched.len() >= wanted || batch.len() < SCAN_BATCH {
                    break;
                }
                after = batch.last().map(|d| module_key_pair(d));
            }
            rows_page(query, &matched, returned, page_size, |doc| {
                let (device, module) = module_key_pair(doc);
                vec![device, module]
            })
        }
    };
    Ok(page)
}

struct Page {
    rows: Vec<Value>,
    next: Option<String>,
    item_type: QueryItemType,
}

/// Rows this page may hold: the page size, or fewer when `TOP n` has `returned` rows sent.
fn page_limit(query: &Query, returned: u64, page_size: usize) -> usize {
    let remaining = query
        .top
        .map_or(u64::MAX, |top| top.saturating_sub(returned));
    usize::try_from(remaining)
        .unwrap_or(usize::MAX)
        .min(page_size)
}

/// The page of a row query (`SELECT *` or a projection without aggregates) from `matched`, the
/// first matching documents after the cursor (one more than the page holds when another page
/// follows); `key` gives the sort key a continuation token names.
fn rows_page(
    query: &Query,
    matched: &[Arc<Value>],
    returned: u64,
    page_size: usize,
    key: impl Fn(&Value) -> Vec<String>,
) -> Page {
    let limit = page_limit(query, returned, page_size);
    let shape = RowShape::new(query);
    let page = matched.get(..limit).unwrap_or(matched);
    let rows: Vec<Value> = page.iter().map(|doc| shape.row(doc)).collect();
    let sent = returned + rows.len() as u64;
    let more = query.top.is_none_or(|top| sent < top) && matched.len() > limit;
    let next = match page.last() {
        // The token names the last document, not the row: a projection may leave its
        // deviceId out.
        Some(last) if more => Some(
            Cursor {
                key: key(last),
                returned: sent,
            }
            .encode(query.top.is_some()),
        ),
        _ => None,
    };
    let item_type = match (query.projection == Projection::All, query.source) {
        (false, _) => QueryItemType::Raw,
        (true, Source::DevicesJobs) => QueryItemType::DeviceJob,
        (true, _) => QueryItemType::Twin,
    };
    Page {
        rows,
        next,
        item_type,
    }
}

fn text_field(doc: &Value, name: &str) -> String {
    doc.get(name)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fn module_key_pair(doc: &Value) -> (String, String) {
    (text_field(doc, "deviceId"), text_field(doc, "moduleId"))
}

fn job_key(doc: &Value) -> Vec<String> {
    vec![text_field(doc, "jobId"), text_field(doc, "deviceId")]
}

/// Where an aggregate query's next page starts: strictly after the group of the last row sent
/// (groups come in [`GroupPosition`] order), with how many rows were sent so far (for `TOP n`).
/// Encoded as base64url of the count and the position joined by a newline; the position comes
/// last because a string group value may itself hold newlines.
#[derive(Debug, PartialEq)]
struct GroupCursor {
    after: GroupPosition,
    returned: u64,
}

impl GroupCursor {
    fn encode(&self) -> String {
        BASE64URL.encode(format!("{}\n{}", self.returned, self.after.encode()))
    }

    fn decode(token: &str) -> Result<GroupCursor, ApiError> {
        let bytes = BASE64URL
            .decode(token.trim_end_matches('='))
            .map_err(|_| bad_token())?;
        let text = String::from_utf8(bytes).map_err(|_| bad_token())?;
        let (returned, after) = text.split_once('\n').ok_or_else(bad_token)?;
        Ok(GroupCursor {
            returned: returned.parse().map_err(|_| bad_token())?,
            after: GroupPosition::decode(after).ok_or_else(bad_token)?,
        })
    }
}

/// Where a row query's next page starts: the sort key of the last row sent, and (for `TOP n`)
/// how many rows were sent so far. Encoded as base64url of the key fields (and the count) joined
/// by newlines, which ids cannot contain.
#[derive(Debug, PartialEq)]
struct Cursor {
    key: Vec<String>,
    returned: u64,
}

impl Cursor {
    fn encode(&self, with_count: bool) -> String {
        let mut text = self.key.join("\n");
        if with_count {
            text.push('\n');
            text.push_str(&self.returned.to_string());
        }
        BASE64URL.encode(text)
    }

    fn decode(token: &str, key_fields: usize, with_count: bool) -> Result<Cursor, ApiError> {
        let bytes = BASE64URL
            .decode(token.trim_end_matches('='))
            .map_err(|_| bad_token())?;
        let text = String::from_utf8(bytes).map_err(|_| bad_token())?;
        let mut fields: Vec<String> = text.split('\n').map(str::to_owned).collect();
        let returned = if with_count {
            fields
                .pop()
                .and_then(|n| n.parse::<u64>().ok())
                .ok_or_else(bad_token)?
        } else {
            0
        };
        if fields.len() != key_fields {
            return Err(bad_token());
        }
        Ok(Cursor {
            key: fields,
            returned,
        })
    }
}

fn bad_token() -> ApiError {
    ApiError::argument(format!(
        "the {CONTINUATION_HEADER} header is not a continuation token this hub issued for this query"
    ))
}

fn query_error(error: QueryError) -> ApiError {
    let message = match (error.kind(), error.position()) {
        (QueryErrorKind::Unsupported, _) if !error.message().contains("support") => {
            format!("unsupported: {}", error.message())
        }
        (_, Some(position)) if !error.message().contains("position") => {
            format!("{} (at position {position})", error.message())
        }
        _ => error.message().to_owned(),
    };
    ApiError::argument(format!("Invalid query: {message}"))
}

/// One page of an aggregate (GROUP BY, COUNT) over `docs`, resumed after `continuation`.
fn aggregate(
    query: &Query,
    docs: &[Arc<Value>],
    continuation: Option<&str>,
    page_size: usize,
) -> Result<Page, ApiError> {
    let cursor = continuation.map(GroupCursor::decode).transpose()?;
    let returned = cursor.as_ref().map_or(0, |c| c.returned);
    let limit = page_limit(query, returned, page_size);
    let groups = query::aggregate_page(
        query,
        docs.iter().map(|d| d.as_ref()),
        cursor.as_ref().map(|c| &c.after),
        limit,
    )
    .map_err(query_error)?;
    let sent = returned + groups.rows.len() as u64;
    let more = groups.more && query.top.is_none_or(|top| sent < top);
    let next = groups.last.filter(|_| more).map(|after| {
        GroupCursor {
            after,
            returned: sent,
        }
        .encode()
    });
    Ok(Page {
        rows: groups.rows,
        next,
        item_type: QueryItemType::Raw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip() {
        let cursor = Cursor {
            key: vec!["dev-1".into()],
            returned: 0,
        };
        let token = cursor.encode(false);
        assert_eq!(Cursor::decode(&token, 1, false).ok(), Some(cursor));
        let cursor = Cursor {
            key: vec!["job-1".into(), "dev:2".into()],
            returned: 7,
        };
        let token = cursor.encode(true);
        assert!(!token.is_empty());
        assert_eq!(Cursor::decode(&token, 2, true).ok(), Some(cursor));
    }

    #[test]
    fn foreign_tokens_are_refused() {
        assert!(Cursor::decode("!!!", 1, false).is_err());
        assert!(Cursor::decode(&BASE64URL.encode("a\nb"), 1, false).is_err());
        assert!(Cursor::decode(&BASE64URL.encode("a\nx"), 1, true).is_err());
    }
}
