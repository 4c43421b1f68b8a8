//! TLS trust for our clients: the platform's root certificates plus, optionally, one extra CA read
//! from a PEM file (the local hub-emulator's CA). Build the [`ClientConfig`] once and share the
//! `Arc` between connections: a fleet of devices then holds one root store, not thousands.

use std::io::{self, BufRead};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::{self, SectionKind};

/// Why the trusted roots could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The CA file could not be read.
    #[error(
        "cannot read the CA file {}: {cause}; check the path given with --ca-file or IOTHUB_CA_FILE \
         (the hub-emulator writes its CA as ca.pem in its data directory)",
        path.display()
    )]
    CaFileRead {
        /// The file.
        path: PathBuf,
        /// What the OS said (in the message, not chained, so it is printed once).
        cause: io::Error,
    },
    /// The CA file holds no PEM block at all (DER, a key store, or some other file).
    #[error(
        "the CA file {} is not PEM (no `-----BEGIN CERTIFICATE-----` block found); \
         pass the CA certificate in PEM form, e.g. convert DER with `openssl x509 -inform der -in CA.der -out ca.pem`",
        path.display()
    )]
    CaFileNotPem {
        /// The file.
        path: PathBuf,
    },
    /// The PEM file is malformed.
    #[error("the CA file {} is not valid PEM: {detail}; pass the CA certificate in PEM form", path.display())]
    CaFileBadPem {
        /// The file.
        path: PathBuf,
        /// What the PEM reader said.
        detail: String,
    },
    /// The PEM file holds blocks, but none is a certificate (e.g. only a private key).
    #[error(
        "the CA file {} contains PEM data but no certificate (found: {found}); \
         pass the CA's certificate (`BEGIN CERTIFICATE`), not its key",
        path.display()
    )]
    CaFileNoCertificate {
        /// The file.
        path: PathBuf,
        /// The kinds of PEM blocks that were found.
        found: String,
    },
    /// A certificate in the CA file could not be used as a trust anchor.
    #[error("the CA file {} holds a certificate rustls cannot use as a root: {source}", path.display())]
    CaFileBadCertificate {
        /// The file.
        path: PathBuf,
        /// Why rustls refused it.
        #[source]
        source: rustls::Error,
    },
    /// Neither the platform nor a CA file supplied a single root certificate.
    #[error(
        "no trusted root certificates: the platform certificate store is empty or unreadable and no CA file was \
         given; install the system CA bundle (e.g. ca-certificates) or pass --ca-file / IOTHUB_CA_FILE"
    )]
    NoRoots,
    /// rustls refused the configuration (protocol versions / provider).
    #[error("cannot build the TLS configuration: {0}")]
    Config(#[source] rustls::Error),
}

/// Reads every certificate from a PEM file (for our MQTT config, or for reqwest's
/// `add_root_certificate`). Errors name the path and say what to do.
pub fn read_ca_pem(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|cause| TlsError::CaFileRead {
        path: path.to_owned(),
        cause,
    })?;
    parse_ca_pem(&bytes, path)
}

/// Parses PEM text (from a file called `origin`, used in errors) into its certificates.
pub fn parse_ca_pem(bytes: &[u8], origin: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let mut reader: &[u8] = bytes;
    let mut certs = Vec::new();
    let mut others: Vec<String> = Vec::new();
    loop {
        match pem::from_buf(&mut reader as &mut dyn BufRead) {
            Ok(Some((SectionKind::Certificate, der))) => certs.push(CertificateDer::from(der)),
            Ok(Some((kind, _))) => others.push(format!("{kind:?}")),
            Ok(None) => break,
            Err(e) => {
                return Err(TlsError::CaFileBadPem {
                    path: origin.to_owned(),
                    detail: e.to_string(),
                });
            }
        }
    }
    if !certs.is_empty() {
        return Ok(certs);
    }
    if others.is_empty() {
        return Err(TlsError::CaFileNotPem {
            path: origin.to_owned(),
        });
    }
    Err(TlsError::CaFileNoCertificate {
        path: origin.to_owned(),
        found: others.join(", "),
    })
}

/// The platform's root certificates (unreadable entries are skipped with a debug log).
pub fn platform_roots() -> Vec<CertificateDer<'static>> {
    let result = rustls_native_certs::load_native_certs();
    for error in &result.errors {
        tracing::debug!(%error, "skipping an unreadable platform root certificate");
    }
    result.certs
}

/// Where trust comes from.
#[derive(Debug, Clone, Default)]
pub struct TrustOptions {
    /// An extra CA (PEM file) to trust, e.g. the hub-emulator's `ca.pem`.
    pub ca_file: Option<PathBuf>,
    /// Extra CA certificates already in memory (PEM text), e.g. from `RunningHub::env.ca_pem`.
    pub ca_pem: Option<String>,
    /// Leave the platform roots out (only the given CA is trusted).
    pub no_platform_roots: bool,
}

impl TrustOptions {
    /// Trust the platform roots plus the CA in `path`.
    pub fn with_ca_file(path: impl Into<PathBuf>) -> TrustOptions {
        TrustOptions {
            ca_file: Some(path.into()),
            ..TrustOptions::default()
        }
    }

    /// Trust the platform roots plus the CA given as PEM text.
    pub fn with_ca_pem(pem: impl Into<String>) -> TrustOptions {
        TrustOptions {
            ca_pem: Some(pem.into()),
            ..TrustOptions::default()
        }
    }
}

/// Builds the rustls client configuration (ring provider, TLS 1.2 and 1.3, no client certificate).
pub fn client_config(trust: &TrustOptions) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    if !trust.no_platform_roots {
        let (added, ignored) = roots.add_parsable_certificates(platform_roots());
        tracing::debug!(added, ignored, "platform root certificates");
    }
    let mut extra = Vec::new();
    if let Some(path) = &trust.ca_file {
        extra.push((path.clone(), read_ca_pem(path)?));
    }
    if let Some(text) = &trust.ca_pem {
        let origin = PathBuf::from("<CA PEM text>");
        extra.push((origin.clone(), parse_ca_pem(text.as_bytes(), &origin)?));
    }
    for (path, certs) in extra {
        for cert in certs {
            roots
                .add(cert)
                .map_err(|source| TlsError::CaFileBadCertificate {
                    path: path.clone(),
                    source,
                })?;
        }
    }
    if roots.is_empty() {
        return Err(TlsError::NoRoots);
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Whether an error chain (as rumqttc or reqwest report it) comes from certificate verification
/// or another TLS failure; returns the rustls error when one is found.
pub fn find_rustls_error<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(io) = e.downcast_ref::<io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(tls) = inner.downcast_ref::<rustls::Error>()
        {
            return Some(tls);
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A throwaway self-signed CA made for the test (no committed keys).
    fn cert_pem() -> String {
        match rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]) {
            Ok(certified) => certified.cert.pem(),
            Err(e) => panic!("rcgen: {e}"),
        }
    }

    #[test]
    fn pem_with_a_certificate_parses() {
        let pem = cert_pem();
        let certs = parse_ca_pem(pem.as_bytes(), Path::new("ca.pem"));
        assert!(matches!(certs, Ok(ref c) if c.len() == 1), "{certs:?}");
        let trust = TrustOptions {
            ca_pem: Some(pem),
            no_platform_roots: true,
            ..TrustOptions::default()
        };
        assert!(client_config(&trust).is_ok());
    }

    #[test]
    fn not_pem_is_named() {
        let err = parse_ca_pem(b"\x30\x82\x01\x0a binary DER", Path::new("/tmp/ca.der"));
        let Err(err @ TlsError::CaFileNotPem { .. }) = err else {
            panic!("{err:?}")
        };
        assert!(err.to_string().contains("/tmp/ca.der"), "{err}");
    }

    #[test]
    fn key_only_pem_is_no_certificate() {
        let key =
            "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n";
        let err = parse_ca_pem(key.as_bytes(), Path::new("key.pem"));
        let Err(err @ TlsError::CaFileNoCertificate { .. }) = err else {
            panic!("{err:?}")
        };
        assert!(err.to_string().contains("not its key"), "{err}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = read_ca_pem(Path::new("/nonexistent/ca.pem"));
        let Err(err @ TlsError::CaFileRead { .. }) = err else {
            panic!("{err:?}")
        };
        let text = err.to_string();
        assert!(
            text.contains("/nonexistent/ca.pem") && text.contains("--ca-file"),
            "{text}"
        );
    }

    #[test]
    fn only_extra_ca_without_platform_roots_needs_a_ca() {
        let trust = TrustOptions {
            no_platform_roots: true,
            ..TrustOptions::default()
        };
        assert!(matches!(client_config(&trust), Err(TlsError::NoRoots)));
    }
}
