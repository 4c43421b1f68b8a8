//! Async client for IoT Hub's service REST API (api-version 2021-04-12) over reqwest + rustls.
//!
//! Invariants: every attempt carries a fresh SAS token (TTL 1 h) scoped to the hub host exactly
//! as written in the connection string (port included); only idempotent calls are retried on
//! ambiguous failures (see [`retry`]); errors keep the hub's code and message ([`HubError`]).

pub mod error;
pub mod retry;

use std::collections::VecDeque;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::Stream;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::bulk::{BulkRegistryOperationResult, ExportImportDevice, MAX_BULK_DEVICES};
use crate::connection_string::ServiceConnectionString;
use crate::device::Device;
use crate::error::ErrorCode;
use crate::job::{DeviceJob, JobRequest, JobResponse, JobStatus, JobType};
use crate::method::{CloudToDeviceMethod, CloudToDeviceMethodResult};
use crate::twin::Twin;

pub use error::{ConnectProblem, HubError, HubErrorKind, ServiceError};
pub use retry::{Idempotency, RetryPolicy};

/// The REST api-version every request carries (the one the Azure service SDKs send).
pub const API_VERSION: &str = "2021-04-12";
/// Lifetime of the SAS token minted for each request (the SDKs' default).
pub const SAS_TTL: Duration = Duration::from_secs(3600);
/// Default limit for one HTTP exchange (msrest's default is 100 s).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(100);
/// Default limit for opening a connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `x-ms-max-item-count` for queries (the service caps pages at 100).
pub const DEFAULT_PAGE_SIZE: u32 = 100;

/// Characters kept literal in a path segment: RFC 3986 unreserved.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn segment(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// Configures a [`ServiceClient`]: extra CA, retries, timeouts.
#[derive(Debug)]
pub struct ServiceClientBuilder {
    connection: ServiceConnectionString,
    extra_roots: Vec<reqwest::Certificate>,
    retry: RetryPolicy,
    request_timeout: Duration,
    connect_timeout: Duration,
    pool_max_idle_per_host: usize,
}

impl ServiceClientBuilder {
    /// Trusts the certificates in a PEM file besides the platform roots (e.g. the emulator's
    /// `ca.pem`). Errors name the file and say what is wrong with it.
    pub fn ca_file(mut self, path: impl AsRef<Path>) -> Result<Self, ServiceError> {
        let path = path.as_ref();
        for der in crate::tls::read_ca_pem(path)? {
            let cert = reqwest::Certificate::from_der(&der).map_err(|e| ServiceError::CaFile {
                path: path.to_owned(),
                reason: format!("a certificate in it is not usable: {e}"),
            })?;
            self.extra_roots.push(cert);
        }
        Ok(self)
    }

    /// Trusts the certificates in PEM text besides the platform roots.
    pub fn ca_pem(mut self, pem: &[u8]) -> Result<Self, ServiceError> {
        for der in crate::tls::parse_ca_pem(pem, Path::new("<CA PEM text>"))? {
            let cert = reqwest::Certificate::from_der(&der).map_err(|e| {
                ServiceError::InvalidArgument(format!("unusable CA certificate: {e}"))
            })?;
            self.extra_roots.push(cert);
        }
        Ok(self)
    }

    /// Sets the retry policy (default [`RetryPolicy::default`]).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Sets the limit of one HTTP exchange (method calls get their own timeouts on top).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets the limit for opening a connection.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets how many idle connections to the hub are kept (raise it for wide fan-outs).
    pub fn pool_max_idle(mut self, n: usize) -> Self {
        self.pool_max_idle_per_host = n;
        self
    }

    /// Builds the client. No request is sent.
    pub fn build(self) -> Result<ServiceClient, ServiceError> {
        let mut http = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(self.connect_timeout)
            .pool_max_idle_per_host(self.pool_max_idle_per_host)
            .user_agent(concat!(
                "hub-core/",
                env!("CARGO_PKG_VERSION"),
                " iothubgatewayserviceapis/2021-04-12"
            ));
        for cert in self.extra_roots {
            http = http.add_root_certificate(cert);
        }
        let http = http.build().map_err(ServiceError::Client)?;
        let host = self.connection.host_name.to_string();
        Ok(ServiceClient {
            inner: Arc::new(Inner {
                base_url: format!("https://{host}"),
                host,
                http,
                connection: self.connection,
                retry: self.retry,
                request_timeout: self.request_timeout,
                throttled: AtomicU64::new(0),
            }),
        })
    }
}

/// A client for one hub's service API, cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct ServiceClient {
    inner: Arc<Inner>,
}

struct Inner {
    base_url: String,
    host: String,
    http: reqwest::Client,
    connection: ServiceConnectionString,
    retry: RetryPolicy,
    request_timeout: Duration,
    /// 429 answers received, for [`ServiceClient::throttled`].
    throttled: AtomicU64,
}

impl fmt::Debug for ServiceClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceClient")
            .field("base_url", &self.inner.base_url)
            .field("policy", &self.inner.connection.policy_name)
            .finish_non_exhaustive()
    }
}

/// One page of a query answer.
#[derive(Debug, Clone)]
pub struct QueryPage<T> {
    /// The items of this page.
    pub items: Vec<T>,
    /// `x-ms-item-type` (`Twin`, `DeviceJob`, `JobResponse`, `Raw`).
    pub item_type: Option<String>,
    /// `x-ms-continuation`: pass it back for the next page; `None` on the last one.
    pub continuation: Option<String>,
}

/// A request before it is signed and sent.
struct Call<'a> {
    method: Method,
    path: String,
    query: Vec<(&'static str, String)>,
    body: Option<Vec<u8>>,
    headers: Vec<(&'static str, String)>,
    idempotency: Idempotency,
    timeout: Option<Duration>,
    /// A non-2xx status whose body is still the operation's answer (the bulk registry's 400).
    answer_status: Option<StatusCode>,
    _marker: std::marker::PhantomData<&'a ()>,
}

impl Call<'_> {
    fn new(method: Method, path: String, idempotency: Idempotency) -> Self {
        Self {
            method,
            path,
            query: Vec::new(),
            body: None,
            headers: Vec::new(),
            idempotency,
            timeout: None,
            answer_status: None,
            _marker: std::marker::PhantomData,
        }
    }

    fn json<B: Serialize + ?Sized>(mut self, body: &B) -> Result<Self, ServiceError> {
        let bytes = serde_json::to_vec(body).map_err(|e| {
            ServiceError::InvalidArgument(format!("cannot encode the request body: {e}"))
        })?;
        self.body = Some(bytes);
        Ok(self)
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    fn if_match(self, etag: Option<&str>) -> Self {
        self.header("If-Match", quote_etag(etag.unwrap_or("*")))
    }

    fn describe(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

/// Wraps a bare etag in double quotes as `If-Match` wants (`*` and quoted ones stay).
pub fn quote_etag(etag: &str) -> String {
    if etag == "*"
        || (etag.len() >= 2 && etag.starts_with('"') && etag.ends_with('"'))
        || etag.starts_with("W/")
    {
        etag.to_owned()
    } else {
        format!("\"{etag}\"")
    }
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: bytes::Bytes,
}

impl ServiceClient {
    /// A client that trusts the platform roots only, with default settings.
    pub fn new(connection: ServiceConnectionString) -> Result<Self, ServiceError> {
        Self::builder(connection).build()
    }

    /// How many answers were 429 (throttled) so far, on this client and its clones, whether
    /// the call was then retried or not: a fleet reports it to show it kept within the hub's
    /// rates.
    pub fn throttled(&self) -> u64 {
        self.inner.throttled.load(Ordering::Relaxed)
    }

    /// Starts configuring a client.
    pub fn builder(connection: ServiceConnectionString) -> ServiceClientBuilder {
        ServiceClientBuilder {
            connection,
            extra_roots: Vec::new(),
            retry: RetryPolicy::default(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            pool_max_idle_per_host: 64,
        }
    }

    /// `https://{HostName}` (the port, if any, included).
    pub fn base_url(&self) -> &str {
        &self.inner.base_url
    }

    /// The hub host name as written in the connection string.
    pub fn host_name(&self) -> &str {
        &self.inner.host
    }

    // ---- registry -------------------------------------------------------------------------

    /// `GET /devices/{id}`.
    pub async fn get_device(&self, device_id: &str) -> Result<Device, ServiceError> {
        let call = Call::new(
            Method::GET,
            format!("/devices/{}", segment(device_id)),
            Idempotency::Idempotent,
        );
        self.json_of(call).await
    }

    /// `PUT /devices/{id}` without `If-Match`: registers a device (the hub generates keys when
    /// none are given). Not retried on ambiguous failures: a repeat would be a 409.
    pub async fn create_device(&self, device: &Device) -> Result<Device, ServiceError> {
        let call = Call::new(
            Method::PUT,
            format!("/devices/{}", segment(&device.device_id)),
            Idempotency::NotIdempotent,
        )
        .json(device)?;
        self.json_of(call).await
    }

    /// `PUT /devices/{id}` with `If-Match` (the etag, or `*` when `None`): updates a device.
    pub async fn update_device(
        &self,
        device: &Device,
        etag: Option<&str>,
    ) -> Result<Device, ServiceError> {
        let call = Call::new(
            Method::PUT,
            format!("/devices/{}", segment(&device.device_id)),
            Idempotency::Idempotent,
        )
        .if_match(etag.or(device.etag.as_deref()))
        .json(device)?;
        self.json_of(call).await
    }

    /// `GET /devices?top=n`: the legacy registry listing (at most 1000 devices).
    pub async fn list_devices(&self, top: Option<u32>) -> Result<Vec<Device>, ServiceError> {
        let mut call = Call::new(Method::GET, "/devices".to_owned(), Idempotency::Idempotent);
        if let Some(top) = top {
            call.query.push(("top", top.to_string()));
        }
        self.json_of(call).await
    }

    /// `DELETE /devices/{id}` with `If-Match` (the etag, or `*` when `None`).
    pub async fn delete_device(
        &self,
        device_id: &str,
        etag: Option<&str>,
    ) -> Result<(), ServiceError> {
        let call = Call::new(
            Method::DELETE,
            format!("/devices/{}", segment(device_id)),
            Idempotency::Idempotent,
        )
        .if_match(etag);
        self.send(call).await.map(drop)
    }

    /// `POST /devices`: the bulk registry, at most [`MAX_BULK_DEVICES`] devices each with its
    /// own import mode. Devices that failed are in the result's `errors` (the hub answers 400
    /// with the same body, which is read as an answer, not an error); a call refused as a whole
    /// (too many devices, a malformed body, no permission) is an `Err`. Not retried on ambiguous
    /// failures (a repeated create would fail as DeviceAlreadyExists), but a 429 is.
    pub async fn bulk_registry(
        &self,
        devices: &[ExportImportDevice],
    ) -> Result<BulkRegistryOperationResult, ServiceError> {
        if devices.len() > MAX_BULK_DEVICES {
            return Err(ServiceError::InvalidArgument(format!(
                "a bulk registry call may name at most {MAX_BULK_DEVICES} devices, got {}",
                devices.len()
            )));
        }
        let mut call = Call::new(
            Method::POST,
            "/devices".to_owned(),
            Idempotency::NotIdempotent,
        )
        .json(devices)?;
        call.answer_status = Some(StatusCode::BAD_REQUEST);
        let request = call.describe();
        let answer = self.send(call).await?;
        if answer.status.is_success() {
            return decode(&request, &answer.body);
        }
        // A 400 is per-device failures only if it lists some; IoT Hub's classic error body
        // (every field of the result is optional) is a refusal of the whole call.
        match serde_json::from_slice::<BulkRegistryOperationResult>(&answer.body) {
            Ok(result) if !result.errors.is_empty() => Ok(result),
            _ => Err(hub_error(
                &request,
                answer.status,
                &answer.headers,
                &answer.body,
            )),
        }
    }

    // ---- twins ----------------------------------------------------------------------------

    /// `GET /twins/{id}`.
    pub async fn get_twin(&self, device_id: &str) -> Result<Twin, ServiceError> {
        let call = Call::new(
            Method::GET,
            format!("/twins/{}", segment(device_id)),
            Idempotency::Idempotent,
        );
        self.json_of(call).await
    }

    /// `PATCH /twins/{id}`: merges `patch` (`{"tags":..,"properties":{"desired":..}}`, `null`
    /// deletes) with `If-Match` (the etag, or `*`). Not retried: each patch bumps versions.
    pub async fn update_twin<P: Serialize + ?Sized>(
        &self,
        device_id: &str,
        patch: &P,
        etag: Option<&str>,
    ) -> Result<Twin, ServiceError> {
        let call = Call::new(
            Method::PATCH,
            format!("/twins/{}", segment(device_id)),
            Idempotency::NotIdempotent,
        )
        .if_match(etag)
        .json(patch)?;
        self.json_of(call).await
    }

    /// `PUT /twins/{id}`: replaces tags and desired properties, with `If-Match` (etag or `*`).
    pub async fn replace_twin<P: Serialize + ?Sized>(
        &self,
        device_id: &str,
        twin: &P,
        etag: Option<&str>,
    ) -> Result<Twin, ServiceError> {
        let call = Call::new(
            Method::PUT,
            format!("/twins/{}", segment(device_id)),
            Idempotency::Idempotent,
        )
        .if_match(etag)
        .json(twin)?;
        self.json_of(call).await
    }

    // ---- methods --------------------------------------------------------------------------

    /// `POST /twins/{id}/methods`. Never retried on ambiguous failures (the device may have
    /// acted). The HTTP timeout covers the connect and response timeouts plus 30 s.
    pub async fn invoke_method(
        &self,
        device_id: &str,
        method: &CloudToDeviceMethod,
    ) -> Result<CloudToDeviceMethodResult, ServiceError> {
        let mut call = Call::new(
            Method::POST,
            format!("/twins/{}/methods", segment(device_id)),
            Idempotency::NotIdempotent,
        )
        .json(method)?;
        let budget = method.response_timeout_secs() + method.connect_timeout_secs() + 30;
        call.timeout = Some(Duration::from_secs(budget).max(self.inner.request_timeout));
        self.json_of(call).await
    }

    // ---- query ----------------------------------------------------------------------------

    /// `POST /devices/query`: one page. Read-only, so retried like an idempotent call.
    pub async fn query_page<T: DeserializeOwned>(
        &self,
        query: &str,
        continuation: Option<&str>,
        max_item_count: Option<u32>,
    ) -> Result<QueryPage<T>, ServiceError> {
        let mut call = Call::new(
            Method::POST,
            "/devices/query".to_owned(),
            Idempotency::Idempotent,
        )
        .json(&crate::query::QuerySpecification::new(query))?;
        if let Some(n) = max_item_count {
            call = call.header("x-ms-max-item-count", n.to_string());
        }
        if let Some(c) = continuation {
            call = call.header("x-ms-continuation", c);
        }
        self.page_of(call).await
    }

    /// `POST /devices/query` over all pages, as a stream of items (pages fetched lazily).
    pub fn query<T: DeserializeOwned + Send + 'static>(
        &self,
        query: impl Into<String>,
    ) -> impl Stream<Item = Result<T, ServiceError>> + Send + 'static {
        let client = self.clone();
        let query = query.into();
        paged(move |continuation| {
            let client = client.clone();
            let query = query.clone();
            async move {
                client
                    .query_page(&query, continuation.as_deref(), Some(DEFAULT_PAGE_SIZE))
                    .await
            }
        })
    }

    /// Twins matching `SELECT * FROM devices WHERE {condition}` (`*` or empty: all devices).
    pub fn query_twins(
        &self,
        condition: &str,
    ) -> impl Stream<Item = Result<Twin, ServiceError>> + Send + 'static {
        let condition = condition.trim();
        let sql = if condition.is_empty() || condition == "*" {
            "SELECT * FROM devices".to_owned()
        } else {
            format!("SELECT * FROM devices WHERE {condition}")
        };
        self.query(sql)
    }

    /// Per-device rows of a job: `SELECT * FROM devices.jobs WHERE devices.jobs.jobId = '{id}'`.
    pub fn device_jobs(
        &self,
        job_id: &str,
    ) -> impl Stream<Item = Result<DeviceJob, ServiceError>> + Send + 'static {
        self.query(format!(
            "SELECT * FROM devices.jobs WHERE devices.jobs.jobId = '{}'",
            escape_sql_string(job_id)
        ))
    }

    // ---- jobs v2 --------------------------------------------------------------------------

    /// `PUT /jobs/v2/{jobId}`. Not retried on ambiguous failures: a repeat is a 409
    /// `JobAlreadyExists` even when the first one worked.
    pub async fn create_job(&self, request: &JobRequest) -> Result<JobResponse, ServiceError> {
        let job_id = request
            .job_id
            .as_deref()
            .filter(|id| !id.is_empty())
            .ok_or_else(|| ServiceError::InvalidArgument("a job needs a jobId".to_owned()))?;
        let call = Call::new(
            Method::PUT,
            format!("/jobs/v2/{}", segment(job_id)),
            Idempotency::NotIdempotent,
        )
        .json(request)?;
        self.json_of(call).await
    }

    /// `GET /jobs/v2/{jobId}`.
    pub async fn get_job(&self, job_id: &str) -> Result<JobResponse, ServiceError> {
        let call = Call::new(
            Method::GET,
            format!("/jobs/v2/{}", segment(job_id)),
            Idempotency::Idempotent,
        );
        self.json_of(call).await
    }

    /// `POST /jobs/v2/{jobId}/cancel`. Cancelling twice is harmless, so it is retried.
    pub async fn cancel_job(&self, job_id: &str) -> Result<JobResponse, ServiceError> {
        let call = Call::new(
            Method::POST,
            format!("/jobs/v2/{}/cancel", segment(job_id)),
            Idempotency::Idempotent,
        );
        self.json_of(call).await
    }

    /// `GET /jobs/v2/query?jobType=&jobStatus=`: one page (the live service answers an array).
    pub async fn query_jobs_page(
        &self,
        job_type: Option<&JobType>,
        job_status: Option<&JobStatus>,
        continuation: Option<&str>,
        max_item_count: Option<u32>,
    ) -> Result<QueryPage<JobResponse>, ServiceError> {
        let mut call = Call::new(
            Method::GET,
            "/jobs/v2/query".to_owned(),
            Idempotency::Idempotent,
        );
        if let Some(t) = job_type {
            call.query.push(("jobType", wire_name(t)?));
        }
        if let Some(s) = job_status {
            call.query.push(("jobStatus", wire_name(s)?));
        }
        if let Some(n) = max_item_count {
            call = call.header("x-ms-max-item-count", n.to_string());
        }
        if let Some(c) = continuation {
            call = call.header("x-ms-continuation", c);
        }
        self.page_of(call).await
    }

    /// All jobs of a type and/or status, as a stream over every page.
    pub fn query_jobs(
        &self,
        job_type: Option<JobType>,
        job_status: Option<JobStatus>,
    ) -> impl Stream<Item = Result<JobResponse, ServiceError>> + Send + 'static {
        let client = self.clone();
        paged(move |continuation| {
            let client = client.clone();
            let job_type = job_type.clone();
            let job_status = job_status.clone();
            async move {
                client
                    .query_jobs_page(
                        job_type.as_ref(),
                        job_status.as_ref(),
                        continuation.as_deref(),
                        Some(DEFAULT_PAGE_SIZE),
                    )
                    .await
            }
        })
    }

    // ---- transport ------------------------------------------------------------------------

    async fn json_of<T: DeserializeOwned>(&self, call: Call<'_>) -> Result<T, ServiceError> {
        let request = call.describe();
        let answer = self.send(call).await?;
        decode(&request, &answer.body)
    }

    async fn page_of<T: DeserializeOwned>(
        &self,
        call: Call<'_>,
    ) -> Result<QueryPage<T>, ServiceError> {
        let request = call.describe();
        let answer = self.send(call).await?;
        let header = |name: &str| {
            answer
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        Ok(QueryPage {
            items: decode(&request, &answer.body)?,
            item_type: header("x-ms-item-type"),
            continuation: header("x-ms-continuation"),
        })
    }

    fn authorization(&self) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let c = &self.inner.connection;
        crate::sas::generate(
            &self.inner.host,
            &c.key,
            Some(&c.policy_name),
            now + SAS_TTL.as_secs(),
        )
    }

    /// Sends `call`, retrying per the policy, and returns the 2xx answer.
    async fn send(&self, call: Call<'_>) -> Result<Answer, ServiceError> {
        let inner = &self.inner;
        let request = call.describe();
        let mut url = format!("{}{}?api-version={API_VERSION}", inner.base_url, call.path);
        for (k, v) in &call.query {
            url.push('&');
            url.push_str(k);
            url.push('=');
            url.push_str(&segment(v));
        }
        let timeout = call.timeout.unwrap_or(inner.request_timeout);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let mut builder = inner
                .http
                .request(call.method.clone(), &url)
                .timeout(timeout)
                .header("Authorization", self.authorization())
                .header("Accept", "application/json");
            for (name, value) in &call.headers {
                builder = builder.header(*name, value);
            }
            builder = match &call.body {
                Some(body) => builder
                    .header("Content-Type", "application/json; charset=utf-8")
                    .body(body.clone()),
                None if call.method == Method::POST || call.method == Method::PUT => {
                    builder.header("Content-Length", "0")
                }
                None => builder,
            };
            let err = match builder.send().await {
                Ok(response) => {
                    let status = response.status();
                    let headers = response.headers().clone();
                    match response.bytes().await {
                        Ok(body) if status.is_success() || call.answer_status == Some(status) => {
                            return Ok(Answer {
                                status,
                                headers,
                                body,
                            });
                        }
                        Ok(body) => hub_error(&request, status, &headers, &body),
                        Err(e) => self.transport_error(&request, timeout, e),
                    }
                }
                Err(e) => self.transport_error(&request, timeout, e),
            };
            if matches!(&err, ServiceError::Hub(h) if h.status == 429) {
                inner.throttled.fetch_add(1, Ordering::Relaxed);
            }
            let (retryable, retry_after) = match (&err, call.idempotency) {
                // The connection was never opened, so the hub never saw the request; an
                // untrusted certificate or an unknown host will not heal by retrying.
                (ServiceError::Connect { problem, .. }, _) => (
                    !matches!(problem, ConnectProblem::Tls | ConnectProblem::Dns),
                    None,
                ),
                (
                    ServiceError::Timeout { .. } | ServiceError::Transport { .. },
                    Idempotency::Idempotent,
                ) => (true, None),
                (ServiceError::Hub(h), Idempotency::Idempotent) => {
                    (retry::is_retryable_status(h.status), h.retry_after)
                }
                // A throttled request was refused, not executed ("If the limits are reached,
                // IoT Hub responds with error code 429 and the client should back off and
                // retry", Microsoft Learn, "IoT Hub quotas and throttling"), so even a call
                // that must not run twice may be sent again. Not the active-job cap: that
                // lasts until a job ends, longer than any backoff here.
                (ServiceError::Hub(h), Idempotency::NotIdempotent) => (
                    h.status == 429
                        && h.code != Some(ErrorCode::ThrottlingMaxActiveJobCountExceeded),
                    h.retry_after,
                ),
                _ => (false, None),
            };
            let delay = retryable
                .then(|| inner.retry.delay(attempt, retry_after, fastrand::f64()))
                .flatten();
            match delay {
                Some(delay) => {
                    tracing::debug!(%request, attempt, ?delay, error = %err, "retrying");
                    tokio::time::sleep(delay).await;
                }
                None => return Err(err),
            }
        }
    }

    fn transport_error(&self, request: &str, timeout: Duration, e: reqwest::Error) -> ServiceError {
        let detail = error_chain(&e);
        if !e.is_connect() {
            if e.is_timeout() {
                return ServiceError::Timeout {
                    request: request.to_owned(),
                    timeout,
                };
            }
            return ServiceError::Transport {
                request: request.to_owned(),
                detail,
                cause: e,
            };
        }
        let lower = detail.to_ascii_lowercase();
        let problem = if crate::tls::find_rustls_error(&e).is_some()
            || lower.contains("certificate")
            || lower.contains("handshake")
        {
            ConnectProblem::Tls
        } else if lower.contains("dns")
            || lower.contains("failed to lookup")
            || lower.contains("name or service not known")
        {
            ConnectProblem::Dns
        } else if lower.contains("refused") {
            ConnectProblem::Refused
        } else if e.is_timeout() || lower.contains("timed out") {
            ConnectProblem::Timeout
        } else {
            ConnectProblem::Other
        };
        ServiceError::Connect {
            url: self.inner.base_url.clone(),
            problem,
            detail,
            cause: e,
        }
    }
}

/// The innermost message of an error chain (reqwest's outer lines say little).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut innermost = e;
    while let Some(next) = innermost.source() {
        innermost = next;
    }
    innermost.to_string()
}

fn decode<T: DeserializeOwned>(request: &str, body: &[u8]) -> Result<T, ServiceError> {
    // Some operations answer 204/empty; let `()`-like targets read it as null.
    let body: &[u8] = if body.is_empty() { b"null" } else { body };
    serde_json::from_slice(body).map_err(|e| ServiceError::Decode {
        request: request.to_owned(),
        detail: e.to_string(),
    })
}

fn wire_name<T: Serialize>(value: &T) -> Result<String, ServiceError> {
    match serde_json::to_value(value) {
        Ok(Value::String(s)) => Ok(s),
        _ => Err(ServiceError::InvalidArgument(
            "job type/status must be a string".to_owned(),
        )),
    }
}

/// Backslash-escapes `\` and `'` for use inside a `'...'` literal of the query language.
pub fn escape_sql_string(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\'', "\\'")
}

fn hub_error(request: &str, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> ServiceError {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    let retry_after = header("retry-after").and_then(retry::parse_retry_after);
    let parsed = crate::error::parse_error_body(&String::from_utf8_lossy(body))
        .or_header_code(header(crate::error::HEADER_ERROR_CODE));
    let name = parsed.code.map(|c| c.name()).or(parsed.raw_code.as_deref());
    let number = parsed.code.map(|c| c.number()).or_else(|| {
        parsed
            .raw_code
            .as_deref()
            .and_then(|r| r.trim().parse().ok())
    });
    let mut message = parsed.message;
    if message.chars().count() > 1000 {
        message = message.chars().take(1000).collect::<String>() + "...";
    }
    ServiceError::Hub(HubError {
        request: request.to_owned(),
        status: status.as_u16(),
        kind: HubErrorKind::classify(status.as_u16(), name, number),
        code: parsed.code,
        raw_code: parsed.raw_code,
        message,
        retry_after,
    })
}

/// Turns a page fetcher into a lazy stream of items that follows `x-ms-continuation`.
fn paged<T, F, Fut>(fetch: F) -> impl Stream<Item = Result<T, ServiceError>> + Send + 'static
where
    T: Send + 'static,
    F: Fn(Option<String>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<QueryPage<T>, ServiceError>> + Send + 'static,
{
    struct State<T, F> {
        fetch: F,
        buffer: VecDeque<T>,
        next: Option<Option<String>>,
    }
    let state = State {
        fetch,
        buffer: VecDeque::new(),
        next: Some(None),
    };
    futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(item) = s.buffer.pop_front() {
                return Some((Ok(item), s));
            }
            let continuation = s.next.take()?;
            match (s.fetch)(continuation).await {
                Ok(page) => {
                    s.next = page.continuation.map(Some);
                    s.buffer.extend(page.items);
                }
                // `next` is None now, so the stream ends after the error.
                Err(e) => return Some((Err(e), s)),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(segment("dev-1.a_b~"), "dev-1.a_b~");
        assert_eq!(segment("a b/c'd"), "a%20b%2Fc%27d");
        assert_eq!(segment("x$y"), "x%24y");
    }

    #[test]
    fn etags_are_quoted_once() {
        assert_eq!(quote_etag("*"), "*");
        assert_eq!(quote_etag("AAAAAAAAAAE="), "\"AAAAAAAAAAE=\"");
        assert_eq!(quote_etag("\"MTIz\""), "\"MTIz\"");
    }

    #[test]
    fn sql_strings_are_escaped() {
        assert_eq!(escape_sql_string("it's"), "it\\'s");
    }
}
