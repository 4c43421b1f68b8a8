//! What the hub-emulator integration tests share: a real hub on 127.0.0.1:0 with a service
//! client that trusts its generated CA, REST calls signed with the iothubowner policy, and a
//! fault-injecting TCP proxy ([`proxy`]).
//! Each test crate uses part of it, hence `dead_code` is allowed here.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod proxy;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hub_core::connection_string::{ServiceConnectionString, SharedKey};
use hub_emulator::{Config, RunningHub};
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use serde_json::Value;

pub mod attack;

/// Seconds since the epoch (for SAS expiries).
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A REST answer: status, headers and the JSON body (`null` when empty).
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Answer {
    /// A response header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// The hub plus what a service client and devices need to reach it.
pub struct TestHub {
    pub running: RunningHub,
    pub client: reqwest::Client,
    /// `https://localhost:<port>`.
    pub base: String,
    /// The HostName as clients know it (`localhost:<port>`), the SAS audience.
    pub host: String,
    /// An iothubowner token.
    pub owner: String,
    /// A rustls client config trusting the hub's CA (for MQTT devices).
    pub tls: Arc<rustls::ClientConfig>,
}

impl TestHub {
    /// An in-memory hub on free ports.
    pub async fn start() -> TestHub {
        TestHub::start_with(Config::ephemeral()).await
    }

    /// A hub with `config`.
    pub async fn start_with(config: Config) -> TestHub {
        let running = hub_emulator::start(config).await.expect("hub starts");
        let cs: ServiceConnectionString = running
            .env
            .service_connection_string
            .parse()
            .expect("connection string");
        let host = cs.host_name.to_string();
        let ca = reqwest::Certificate::from_pem(running.env.ca_pem.as_bytes()).expect("CA PEM");
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .resolve("localhost", running.https_addr)
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client");
        let base = format!("https://localhost:{}", running.https_addr.port());
        let owner = hub_core::sas::generate(&host, &cs.key, Some(&cs.policy_name), now() + 3600);
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(running.env.ca_pem.as_bytes()) {
            roots.add(cert.expect("CA certificate")).expect("add CA");
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        TestHub {
            running,
            client,
            base,
            host,
            owner,
            tls: Arc::new(tls),
        }
    }

    /// A token for one of the hub's default policies.
    pub fn policy_token(&self, policy: &str, expiry: u64) -> String {
        let keys = self.running.hub().policy_keys(policy).expect("policy");
        let key = SharedKey::from_base64(&keys.primary_key).expect("key");
        hub_core::sas::generate(&self.host, &key, Some(policy), expiry)
    }

    /// A REST call with the given `Authorization` (or none) and extra headers.
    pub async fn call_as(
        &self,
        auth: Option<&str>,
        method: Method,
        path: &str,
        body: Option<&Value>,
        extra: &[(&str, &str)],
    ) -> Answer {
        let separator = if path.contains('?') { '&' } else { '?' };
        let url = format!("{}{path}{separator}api-version=2021-04-12", self.base);
        let mut request = self.client.request(method, url);
        if let Some(auth) = auth {
            request = request.header("Authorization", auth);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        for (name, value) in extra {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("request");
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.expect("body");
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).expect("JSON body")
        };
        Answer {
            status,
            headers,
            body,
        }
    }

    /// The device rows of job `job_id` (`SELECT * FROM devices.jobs`), asserting a 200.
    pub async fn device_jobs(&self, job_id: &str) -> Vec<Value> {
        let query = format!("SELECT * FROM devices.jobs WHERE devices.jobs.jobId = '{job_id}'");
        let answer = self
            .call(
                Method::POST,
                "/devices/query",
                Some(&serde_json::json!({"query": query})),
            )
            .await;
        assert_eq!(answer.status, StatusCode::OK, "body: {}", answer.body);
        answer.body.as_array().expect("array of rows").clone()
    }

    /// A REST call as iothubowner.
    pub async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Answer {
        self.call_with(method, path, body, &[]).await
    }

    /// A REST call as iothubowner with extra headers.
    pub async fn call_with(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        extra: &[(&str, &str)],
    ) -> Answer {
        self.call_as(Some(&self.owner), method, path, body, extra)
            .await
    }
}
