//! `POST /devices/query`: the IoT Hub query language over twins (`FROM devices`) and device-job
//! rows (`FROM devices.jobs`), answered as a JSON array with `x-ms-item-type` and, when more rows
//! follow, `x-ms-continuation` (reference §4.5).
//!
//! Paging invariant: a continuation token names the last row returned (its device id, or its
//! (jobId, deviceId) for `devices.jobs`) and the next page starts strictly after it in that
//! order, so while the registry changes no row appears twice and no row that existed throughout
//! is skipped. Projections and aggregates are computed over the whole set in one page.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as BASE64URL;
use serde_json::Value;

use hub_core::policy::Permission;
use hub_core::query::{
    HEADER_CONTINUATION as CONTINUATION_HEADER, HEADER_ITEM_TYPE as ITEM_TYPE_HEADER,
    HEADER_MAX_ITEM_COUNT as MAX_ITEM_COUNT_HEADER, QueryItemType, QuerySpecification,
};

use super::AppState;
use super::auth::require;
use super::error::ApiError;
use super::extract::JsonBody;
use crate::query::{self, Query, QueryError, QueryErrorKind, Source};

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
    // workers that serve every other request and device session.
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

/// One page of `query`'s results, starting after `continuation`.
fn compute_page(
    state: &AppState,
    query: &Query,
    continuation: Option<&str>,
    page_size: usize,
) -> Result<Page, ApiError> {
    let page = match query.source {
        Source::Devices => {
            let cursor = continuation
                .map(|t| Cursor::decode(t, 1, query.top.is_some()))
                .transpose()?;
            let after = cursor
                .as_ref()
                .and_then(|c| c.key.first())
                .map(String::as_str);
            let docs = state.hub.twin_documents_after(after);
            run(
                query,
                &docs,
                cursor,
                page_size,
                QueryItemType::Twin,
                |doc| vec![text_field(doc, "deviceId")],
            )?
        }
        Source::DevicesJobs => {
            let cursor = continuation
                .map(|t| Cursor::decode(t, 2, query.top.is_some()))
                .transpose()?;
            let docs = device_job_documents(state);
            let docs: Vec<Arc<Value>> = match &cursor {
                // Rows are ordered by (jobId, deviceId): start strictly after the last one sent.
                Some(cursor) => docs
                    .into_iter()
                    .filter(|d| job_key(d) > cursor.key)
                    .collect(),
                None => docs,
            };
            run(
                query,
                &docs,
                cursor,
                page_size,
                QueryItemType::DeviceJob,
                job_key,
            )?
        }
        // The emulator has no module identities: the collection exists and is empty.
        Source::DevicesModules => run(query, &[], None, page_size, QueryItemType::Twin, |_| {
            Vec::new()
        })?,
    };
    Ok(page)
}

/// The device-job rows (`FROM devices.jobs`), ordered by (jobId, deviceId).
fn device_job_documents(state: &AppState) -> Vec<Arc<Value>> {
    state.jobs.device_job_documents()
}

struct Page {
    rows: Vec<Value>,
    next: Option<String>,
    item_type: QueryItemType,
}

fn run(
    query: &Query,
    docs: &[Arc<Value>],
    cursor: Option<Cursor>,
    page_size: usize,
    row_type: QueryItemType,
    key: impl Fn(&Value) -> Vec<String>,
) -> Result<Page, ApiError> {
    if !query.is_row_query() {
        let rows = query::execute(query, docs.iter().map(|d| d.as_ref())).map_err(query_error)?;
        return Ok(Page {
            rows,
            next: None,
            item_type: QueryItemType::Raw,
        });
    }
    let returned = cursor.map_or(0, |c| c.returned);
    let remaining = query
        .top
        .map_or(u64::MAX, |top| top.saturating_sub(returned));
    let limit = usize::try_from(remaining)
        .unwrap_or(usize::MAX)
        .min(page_size);
    // One match past the page tells whether another page follows; large collections are
    // scanned on all cores, stopping once the first `limit + 1` matches are known.
    let wanted = limit.saturating_add(1);
    let matching: Vec<usize> = match &query.condition {
        Some(condition) => query::first_matches(condition, docs, wanted),
        None => (0..docs.len().min(wanted)).collect(),
    };
    let rows: Vec<Value> = matching
        .iter()
        .take(limit)
        .filter_map(|&i| docs.get(i))
        .map(|d| (**d).clone())
        .collect();
    let sent = returned + rows.len() as u64;
    let more = query.top.is_none_or(|top| sent < top) && matching.len() > limit;
    let next = match rows.last() {
        Some(last) if more => Some(
            Cursor {
                key: key(last),
                returned: sent,
            }
            .encode(query.top.is_some()),
        ),
        _ => None,
    };
    Ok(Page {
        rows,
        next,
        item_type: row_type,
    })
}

fn text_field(doc: &Value, name: &str) -> String {
    doc.get(name)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fn job_key(doc: &Value) -> Vec<String> {
    vec![text_field(doc, "jobId"), text_field(doc, "deviceId")]
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
