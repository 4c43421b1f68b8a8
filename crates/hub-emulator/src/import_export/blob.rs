//! The blob side of import/export jobs: a container SAS URI (what IoT Hub is given) turned into
//! blob URLs, a whole block blob written (`Put Blob`), and a blob read as a stream of lines.
//! Azure Storage's REST API ("Put Blob", "Get Blob"); tests run it against Azurite.
//!
//! A SAS URI is a credential: no error message, log line or job document quotes its query.

use bytes::Bytes;

/// The storage REST version the hub speaks (Azurite and Azure Storage both accept it).
pub const STORAGE_VERSION: &str = "2021-08-06";
/// Longest line an import accepts: a device line holds at most a twin (tags and desired of
/// 32 KB each, reported of 32 KB) plus its identity, far below this.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;

/// Why a blob could not be reached, in words a job's `failureReason` can carry.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The container URI is not a usable URL.
    #[error(
        "{field} is not a blob container SAS URI (https://ACCOUNT.blob.core.windows.net/CONTAINER?SAS): {why}"
    )]
    BadUri {
        /// Which job field.
        field: &'static str,
        /// What is wrong.
        why: String,
    },
    /// The storage service could not be reached.
    #[error("cannot reach the blob storage at {host}: {why}")]
    Unreachable {
        /// The storage host.
        host: String,
        /// What failed (no URL: it would carry the SAS).
        why: String,
    },
    /// The storage service refused the request.
    #[error("the blob storage refused to {action} blob {blob}: HTTP {status} {code}")]
    Refused {
        /// `read` or `write`.
        action: &'static str,
        /// The blob's name.
        blob: String,
        /// The HTTP status.
        status: u16,
        /// Azure Storage's `x-ms-error-code`, when sent.
        code: String,
    },
    /// A line of the input is longer than [`MAX_LINE_BYTES`].
    #[error("line {line} of blob {blob} is longer than {MAX_LINE_BYTES} bytes")]
    LineTooLong {
        /// The blob.
        blob: String,
        /// Its line number, from 1.
        line: usize,
    },
}

/// A blob container given by a SAS URI.
#[derive(Clone)]
pub struct Container {
    url: reqwest::Url,
}

impl std::fmt::Debug for Container {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Container")
            .field("host", &self.url.host_str())
            .field("path", &self.url.path())
            .finish_non_exhaustive()
    }
}

impl Container {
    /// Parses a container SAS URI given in job field `field`.
    pub fn parse(field: &'static str, uri: &str) -> Result<Container, BlobError> {
        let bad = |why: &str| BlobError::BadUri {
            field,
            why: why.to_owned(),
        };
        let url = reqwest::Url::parse(uri).map_err(|e| bad(&e.to_string()))?;
        if !matches!(url.scheme(), "https" | "http") {
            return Err(bad(
                "its scheme must be https (or http, for a local emulator)",
            ));
        }
        if url.host_str().is_none() {
            return Err(bad("it names no host"));
        }
        if url.path().trim_matches('/').is_empty() {
            return Err(bad("it names no container"));
        }
        Ok(Container { url })
    }

    /// The URL of blob `name` in the container, with the container's SAS.
    fn blob_url(&self, name: &str) -> reqwest::Url {
        let mut url = self.url.clone();
        let path = format!("{}/{}", url.path().trim_end_matches('/'), name);
        url.set_path(&path);
        url
    }

    fn host(&self) -> String {
        let host = self.url.host_str().unwrap_or_default();
        match self.url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        }
    }

    fn unreachable(&self, error: &reqwest::Error) -> BlobError {
        // reqwest's messages name the URL; keep only its kind so the SAS never leaves.
        let why = if error.is_timeout() {
            "timed out".to_owned()
        } else if error.is_connect() {
            "the connection failed".to_owned()
        } else {
            "the request failed".to_owned()
        };
        BlobError::Unreachable {
            host: self.host(),
            why,
        }
    }

    /// Writes `body` as block blob `name` (replacing it), in one `Put Blob`.
    pub async fn put(
        &self,
        client: &reqwest::Client,
        name: &str,
        body: Vec<u8>,
    ) -> Result<(), BlobError> {
        let response = client
            .put(self.blob_url(name))
            .header("x-ms-blob-type", "BlockBlob")
            .header("x-ms-version", STORAGE_VERSION)
            .header("content-type", "text/plain; charset=utf-8")
            // Sent even for an empty blob: Put Blob requires it, and an empty body would go
            // without one (Azurite answers 400).
            .header("content-length", body.len())
            .body(body)
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        refused("write", name, &response)
    }

    /// Opens blob `name` for reading as lines.
    pub async fn lines(
        &self,
        client: &reqwest::Client,
        name: &str,
    ) -> Result<BlobLines, BlobError> {
        let response = client
            .get(self.blob_url(name))
            .header("x-ms-version", STORAGE_VERSION)
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        refused("read", name, &response)?;
        Ok(BlobLines {
            container: self.clone(),
            blob: name.to_owned(),
            response,
            buffer: Vec::new(),
            start: 0,
            scanned: 0,
            line: 0,
            done: false,
        })
    }
}

fn refused(
    action: &'static str,
    blob: &str,
    response: &reqwest::Response,
) -> Result<(), BlobError> {
    if response.status().is_success() {
        return Ok(());
    }
    Err(BlobError::Refused {
        action,
        blob: blob.to_owned(),
        status: response.status().as_u16(),
        code: response
            .headers()
            .get("x-ms-error-code")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
    })
}

/// A blob's lines, read as its body arrives (the whole blob is never held).
pub struct BlobLines {
    container: Container,
    blob: String,
    response: reqwest::Response,
    /// Bytes received and not yet consumed start at `start`; no newline lies before `scanned`.
    buffer: Vec<u8>,
    start: usize,
    scanned: usize,
    line: usize,
    done: bool,
}

impl BlobLines {
    /// The next non-empty line with its number (from 1), or `None` at the end. Each byte is
    /// scanned once and the buffer compacted once per chunk, so splitting is linear in the
    /// blob's size.
    pub async fn next(&mut self) -> Result<Option<(usize, Bytes)>, BlobError> {
        loop {
            let from = self.scanned.max(self.start);
            if let Some(offset) = self.buffer[from..].iter().position(|&b| b == b'\n') {
                let end = from + offset;
                let mut line = &self.buffer[self.start..end];
                if line.last() == Some(&b'\r') {
                    line = &line[..line.len() - 1];
                }
                let line = Bytes::copy_from_slice(line);
                self.start = end + 1;
                self.scanned = self.start;
                self.line += 1;
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(Some((self.line, line)));
            }
            self.scanned = self.buffer.len();
            if self.buffer.len() - self.start > MAX_LINE_BYTES {
                return Err(BlobError::LineTooLong {
                    blob: self.blob.clone(),
                    line: self.line + 1,
                });
            }
            if self.done {
                let rest = &self.buffer[self.start..];
                if rest.iter().all(u8::is_ascii_whitespace) {
                    return Ok(None);
                }
                let line = Bytes::copy_from_slice(rest);
                self.start = self.buffer.len();
                self.line += 1;
                return Ok(Some((self.line, line)));
            }
            match self
                .response
                .chunk()
                .await
                .map_err(|e| self.container.unreachable(&e))?
            {
                Some(chunk) => {
                    self.buffer.drain(..self.start);
                    self.scanned -= self.start;
                    self.start = 0;
                    self.buffer.extend_from_slice(&chunk);
                }
                None => self.done = true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_urls_keep_the_container_s_sas() {
        let container = Container::parse(
            "outputBlobContainerUri",
            "http://127.0.0.1:10000/devstoreaccount1/exports?sv=2021&sig=abc%3D",
        )
        .expect("a container");
        let url = container.blob_url("devices.txt");
        assert_eq!(url.path(), "/devstoreaccount1/exports/devices.txt");
        assert_eq!(url.query(), Some("sv=2021&sig=abc%3D"));
        assert!(
            !format!("{container:?}").contains("sig"),
            "Debug leaves the SAS out"
        );
    }

    #[test]
    fn bad_container_uris_are_named() {
        for (uri, why) in [
            ("not a url", "relative URL"),
            ("ftp://host/c?sig=x", "scheme"),
            ("https://host/?sig=x", "no container"),
        ] {
            let error = Container::parse("inputBlobContainerUri", uri)
                .expect_err(uri)
                .to_string();
            assert!(
                error.contains("inputBlobContainerUri") && error.contains(why),
                "{error}"
            );
            assert!(!error.contains("sig=x"), "{error}");
        }
    }
}
