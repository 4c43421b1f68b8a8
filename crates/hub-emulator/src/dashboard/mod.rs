//! The dashboard: a live web page of the hub's devices, twins, methods, telemetry, queries and
//! jobs, served on the HTTPS port. It is the emulator's own (IoT Hub has no such page).
//!
//! The page is a client of the hub's own REST API: every action it takes is an IoT Hub REST
//! call, authorized by the same permission checks as any service client's. What differs is the
//! credential: instead of a SAS token, the browser holds an HttpOnly cookie, got by opening the
//! URL the hub prints at start (`/?token=...`, a per-start secret, as a notebook server does),
//! and sends the page's CSRF token in a header with every call. The dashboard acts as one shared
//! access policy (`iothubowner`); no key or SAS token ever reaches the page: device identities
//! it reads have their keys blanked ([`redact_keys`]).
//!
//! Module map: this file (the token, the cookie and the page), `events` (the live feed as
//! server-sent events), `assets/` (the page's HTML, script and style, embedded in the binary).

mod events;

use std::sync::Arc;

use axum::Router;
use axum::extract::{RawQuery, Request, State};
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde_json::Value;

use hub_core::policy::{Permission, Permissions};

use crate::http::{ApiError, AppState};
use crate::listener::Admission;

/// The header every dashboard REST call carries, with the page's CSRF token. A cross-site page
/// cannot send it without a CORS preflight, which the hub never grants, and cannot read the
/// token (it is only in the page, served to cookie holders).
pub const CSRF_HEADER: &str = "x-dashboard-csrf";
/// The shared access policy whose permissions the dashboard has.
pub const DASHBOARD_POLICY: &str = "iothubowner";

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// Content-Security-Policy of every dashboard response: the page runs only its own script and
/// talks only to its own origin, and cannot be framed (clickjacking).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The dashboard's per-start secrets and what it may do.
#[derive(Clone)]
pub struct Dashboard {
    inner: Arc<Secrets>,
}

struct Secrets {
    /// The per-start token the printed URL carries.
    token: String,
    /// The cookie's name: distinct per start, so two hubs on one host (cookies ignore ports)
    /// never overwrite each other's.
    cookie_name: String,
    /// The cookie's value.
    cookie_value: String,
    /// The token the page sends in [`CSRF_HEADER`].
    csrf: String,
    permissions: Permissions,
}

impl std::fmt::Debug for Dashboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dashboard").finish_non_exhaustive()
    }
}

/// Why the dashboard's token was refused at start.
#[derive(Debug, thiserror::Error)]
#[error(
    "the dashboard token must be 16 to 128 letters, digits, `-` or `_` (it goes in a URL); \
     leave --dashboard-token out to get a random one"
)]
pub struct InvalidToken;

impl Dashboard {
    /// A dashboard with `token` (random when `None`) acting with `permissions`.
    pub fn new(token: Option<String>, permissions: Permissions) -> Result<Dashboard, InvalidToken> {
        let token = match token {
            Some(token) => {
                let fits = (16..=128).contains(&token.len())
                    && token
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                if !fits {
                    return Err(InvalidToken);
                }
                token
            }
            None => random_hex(24),
        };
        let derive = |label: &str| {
            let digest =
                ring::digest::digest(&ring::digest::SHA256, format!("{label}:{token}").as_bytes());
            hex(digest.as_ref())
        };
        Ok(Dashboard {
            inner: Arc::new(Secrets {
                cookie_name: format!("hub_dashboard_{}", &derive("name")[..12]),
                cookie_value: derive("cookie"),
                csrf: derive("csrf"),
                token,
                permissions,
            }),
        })
    }

    /// The path and query that open the dashboard (append it to `https://host:port`).
    pub fn login_path(&self) -> String {
        format!("/?token={}", self.inner.token)
    }

    /// Whether the request carries this start's dashboard cookie.
    fn has_cookie(&self, headers: &HeaderMap) -> bool {
        headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .any(|(name, value)| {
                name == self.inner.cookie_name
                    && constant_time_eq(value.as_bytes(), self.inner.cookie_value.as_bytes())
            })
    }

    /// Authorizes a REST call made by the page: `None` when the request is not the dashboard's
    /// (no cookie of this start), so the SAS check answers; otherwise whether the CSRF header is
    /// right and the dashboard's policy grants `needed`.
    pub fn authorize(
        &self,
        headers: &HeaderMap,
        needed: Option<Permission>,
    ) -> Option<Result<(), ApiError>> {
        if !self.has_cookie(headers) {
            return None;
        }
        let csrf_ok = headers
            .get(CSRF_HEADER)
            .is_some_and(|v| constant_time_eq(v.as_bytes(), self.inner.csrf.as_bytes()));
        if !csrf_ok {
            return Some(Err(ApiError::unauthorized(format!(
                "a dashboard request must carry the page's {CSRF_HEADER} header; reload the \
                 dashboard"
            ))));
        }
        Some(match needed {
            Some(needed) if !self.inner.permissions.contains(needed) => {
                Err(ApiError::unauthorized(format!(
                    "the dashboard's policy {DASHBOARD_POLICY} does not grant {}, which this \
                     operation needs",
                    needed.as_str()
                )))
            }
            _ => Ok(()),
        })
    }
}

impl Dashboard {
    /// Authorizes the page's event stream: by the cookie alone, since `EventSource` cannot send
    /// headers. The stream changes nothing and only names ids; the cookie is `SameSite=Strict`,
    /// and another origin cannot read the stream (the hub grants no CORS).
    pub(crate) fn authorize_stream(&self, headers: &HeaderMap) -> bool {
        self.has_cookie(headers)
    }
}

/// Blanks the keys of a device identity the dashboard reads (`authentication.symmetricKey`);
/// an update sent back without them keeps the device's keys, as `PUT /devices/{id}` does.
pub fn redact_keys(device: &mut Value) {
    if let Some(keys) = device
        .pointer_mut("/authentication/symmetricKey")
        .and_then(Value::as_object_mut)
    {
        for key in ["primaryKey", "secondaryKey"] {
            if keys.contains_key(key) {
                keys.insert(key.to_owned(), Value::Null);
            }
        }
    }
}

/// The dashboard's routes: the page, its assets and its live feed (merged outside the REST
/// API's SAS check: the page authenticates with its cookie).
pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/", get(page))
        .route("/$dashboard/events", get(events::events))
        .route_layer(axum::middleware::from_fn_with_state(state, admit))
        .route(
            "/$dashboard/app.js",
            get(|| asset(APP_JS, "text/javascript; charset=utf-8")),
        )
        .route(
            "/$dashboard/app.css",
            get(|| asset(APP_CSS, "text/css; charset=utf-8")),
        )
}

/// Admits a dashboard connection into the port's authenticated budget once it shows the
/// cookie or the token, so an open page is not evicted as an idle, unauthenticated connection.
async fn admit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(dashboard) = &state.dashboard {
        let known = dashboard.has_cookie(request.headers())
            || request
                .uri()
                .query()
                .is_some_and(|q| token_in(q) == Some(&dashboard.inner.token));
        if known && let Some(admission) = request.extensions().get::<Admission>() {
            let _ = admission.admit();
        }
    }
    next.run(request).await
}

fn token_in(query: &str) -> Option<&str> {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("token="))
}

async fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (CONTENT_TYPE, content_type),
            (CACHE_CONTROL, "no-cache"),
            (axum::http::header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// `GET /`: with `?token=` of this start, sets the cookie and redirects to the bare URL (the
/// token leaves the address bar and history); with the cookie, the page; otherwise 401 with
/// what to do.
async fn page(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let Some(dashboard) = &state.dashboard else {
        return (
            StatusCode::NOT_FOUND,
            "the dashboard is off (--no-dashboard)",
        )
            .into_response();
    };
    if let Some(given) = query.as_deref().and_then(token_in) {
        if !constant_time_eq(given.as_bytes(), dashboard.inner.token.as_bytes()) {
            return refused("This dashboard link is not from this start of the hub.");
        }
        let cookie = format!(
            "{}={}; Path=/; HttpOnly; Secure; SameSite=Strict",
            dashboard.inner.cookie_name, dashboard.inner.cookie_value
        );
        let mut response = StatusCode::SEE_OTHER.into_response();
        let headers = response.headers_mut();
        headers.insert(LOCATION, HeaderValue::from_static("/"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Ok(value) = HeaderValue::from_str(&cookie) {
            headers.insert(SET_COOKIE, value);
        }
        return response;
    }
    if !dashboard.has_cookie(&headers) {
        return refused("This page needs the link the hub printed when it started.");
    }
    let html = INDEX_HTML
        .replace("{{csrf}}", &dashboard.inner.csrf)
        .replace("{{host}}", &html_escape(state.hub.host_name()));
    secure_page(StatusCode::OK, html)
}

fn refused(why: &str) -> Response {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>IoT hub emulator: \
         dashboard</title></head><body><h1>Not signed in</h1><p id=\"refused\">{}</p><p>Open the \
         <code>dashboard: https://...?token=...</code> line that <code>hub-emulator</code> \
         printed when it started. The token changes with every start.</p></body></html>",
        html_escape(why)
    );
    secure_page(StatusCode::UNAUTHORIZED, html)
}

fn secure_page(status: StatusCode, html: String) -> Response {
    let mut response = (status, Html(html)).into_response();
    let headers = response.headers_mut();
    headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        axum::http::header::X_FRAME_OPTIONS,
        HeaderValue::from_static("DENY"),
    );
    headers.insert(
        axum::http::header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn random_hex(bytes: usize) -> String {
    use ring::rand::SecureRandom as _;
    let mut buf = vec![0u8; bytes];
    // The system RNG fails only when the OS has none; a fixed token would then be guessable,
    // so fall back to the clock and the process id mixed through SHA-256 (still per start).
    if ring::rand::SystemRandom::new().fill(&mut buf).is_err() {
        let seed = format!("{:?}{}", std::time::SystemTime::now(), std::process::id());
        let digest = ring::digest::digest(&ring::digest::SHA256, seed.as_bytes());
        buf = digest.as_ref()[..bytes.min(32)].to_vec();
    }
    hex(&buf)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dashboard() -> Dashboard {
        Dashboard::new(Some("a-test-token-0123456789".into()), Permissions::ALL)
            .expect("valid token")
    }

    fn with_cookie(d: &Dashboard, csrf: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let cookie = format!("other=1; {}={}", d.inner.cookie_name, d.inner.cookie_value);
        headers.insert(COOKIE, HeaderValue::from_str(&cookie).expect("ascii"));
        if let Some(csrf) = csrf {
            headers.insert(CSRF_HEADER, HeaderValue::from_str(csrf).expect("ascii"));
        }
        headers
    }

    #[test]
    fn the_cookie_needs_the_csrf_header_and_the_policy_s_permission() {
        let d = dashboard();
        assert!(
            d.authorize(&HeaderMap::new(), None).is_none(),
            "not the dashboard's"
        );
        let csrf = d.inner.csrf.clone();
        assert!(matches!(
            d.authorize(&with_cookie(&d, Some(&csrf)), None),
            Some(Ok(()))
        ));
        assert!(matches!(
            d.authorize(&with_cookie(&d, None), None),
            Some(Err(_))
        ));
        assert!(matches!(
            d.authorize(&with_cookie(&d, Some("wrong")), None),
            Some(Err(_))
        ));

        let reader = Dashboard::new(
            Some("a-test-token-0123456789".into()),
            Permissions::from_iter([Permission::RegistryRead]),
        )
        .expect("valid");
        let headers = with_cookie(&reader, Some(&csrf));
        assert!(matches!(
            reader.authorize(&headers, Some(Permission::RegistryRead)),
            Some(Ok(()))
        ));
        assert!(matches!(
            reader.authorize(&headers, Some(Permission::RegistryWrite)),
            Some(Err(_))
        ));
    }

    #[test]
    fn another_start_s_cookie_is_not_this_one_s() {
        let a = dashboard();
        let b = Dashboard::new(None, Permissions::ALL).expect("random");
        assert_ne!(a.inner.cookie_name, b.inner.cookie_name);
        assert!(
            b.authorize(&with_cookie(&a, Some(&a.inner.csrf)), None)
                .is_none()
        );
    }

    #[test]
    fn tokens_must_fit_in_a_url() {
        assert!(Dashboard::new(Some("short".into()), Permissions::ALL).is_err());
        assert!(Dashboard::new(Some("has space in it 0123".into()), Permissions::ALL).is_err());
        assert_eq!(
            Dashboard::new(None, Permissions::ALL)
                .expect("random")
                .inner
                .token
                .len(),
            48
        );
    }

    #[test]
    fn keys_are_blanked() {
        let mut device = serde_json::json!({
            "deviceId": "d",
            "authentication": {"type": "sas", "symmetricKey": {"primaryKey": "k1", "secondaryKey": "k2"}}
        });
        redact_keys(&mut device);
        assert_eq!(
            device["authentication"]["symmetricKey"]["primaryKey"],
            Value::Null
        );
        assert_eq!(
            device["authentication"]["symmetricKey"]["secondaryKey"],
            Value::Null
        );
        assert_eq!(device["deviceId"], "d");
    }
}
