//! The hub's local certificate authority and server certificate, and the rustls server config.
//!
//! The CA key is created once per data directory and kept (mode 0600) so that clients keep
//! trusting `ca.pem` across restarts; the server certificate is re-issued on every start so that
//! it always names the current `--hostname` list.

use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::{CipherSuite, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// The common name of the emulator's CA, as it appears in `ca.pem`.
pub const CA_COMMON_NAME: &str = "IoT Hub Emulator Local CA";

/// What went wrong while preparing the hub's certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    /// A certificate or key file could not be read or written.
    #[error("cannot {action} {}: {source}", path.display())]
    File {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The stored CA key is not a usable private key.
    #[error("the CA key {} is not a valid PEM private key ({source}); move it away to let the hub create a new CA (clients must then trust the new ca.pem)", path.display())]
    BadCaKey {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    /// Generating or signing a certificate failed.
    #[error("cannot generate the hub's certificates: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the generated certificate or key.
    #[error("cannot build the TLS server configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The CA the clients trust and the server configuration the listeners use.
#[derive(Clone)]
pub struct TlsMaterial {
    /// The CA certificate in PEM form (what clients add to their trust store).
    pub ca_pem: String,
    /// Where `ca.pem` lives, when the hub has a data directory.
    pub ca_file: Option<PathBuf>,
    /// The server configuration shared by the MQTT and HTTPS listeners.
    pub server_config: Arc<ServerConfig>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    dn.push(DnType::OrganizationName, "hub-emulator");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2049, 12, 31);
    Ok(params)
}

fn server_params(hostnames: &[String]) -> Result<CertificateParams, rcgen::Error> {
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    for name in hostnames {
        if !names.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            names.push(name.clone());
        }
    }
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    for name in &names {
        let san = match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(name.clone().try_into()?),
        };
        params.subject_alt_names.push(san);
    }
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, names[0].clone());
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2049, 12, 31);
    Ok(params)
}

/// Makes an open private-key file readable by its owner only (mode 0600).
#[cfg(unix)]
fn tighten(file: &fs::File) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(fs::Permissions::from_mode(0o600))
}

/// Tightens an existing CA key file to 0600: it is read, not rewritten, on later starts, so a
/// key file copied in or left with looser permissions would otherwise stay readable by others.
fn tighten_existing(path: &Path) -> Result<(), CertificateError> {
    #[cfg(unix)]
    {
        let file = fs::File::open(path).map_err(|source| CertificateError::File {
            action: "read",
            path: path.to_path_buf(),
            source,
        })?;
        tighten(&file).map_err(|source| CertificateError::File {
            action: "restrict the permissions of",
            path: path.to_path_buf(),
            source,
        })
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(())
    }
}

fn write_private(path: &Path, contents: &str) -> Result<(), CertificateError> {
    let err = |source| CertificateError::File {
        action: "write",
        path: path.to_path_buf(),
        source,
    };
    #[cfg(unix)]
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(err)?;
        // `mode` applies only to a file this call creates (std `OpenOptionsExt::mode`: "If a
        // new file is created as part of an `OpenOptions::open` call then this specified mode
        // will be used as the permission bits for the new file"); an existing key file with
        // looser permissions is tightened before the key is written into it (project issue 13).
        tighten(&file).map_err(err)?;
        file.write_all(contents.as_bytes()).map_err(err)
    }
    #[cfg(not(unix))]
    {
        fs::write(path, contents).map_err(err)
    }
}

/// Loads the CA from `dir` (creating it on first start) and issues a fresh server certificate
/// for localhost, 127.0.0.1, ::1 and `hostnames`. With no directory, everything is in memory.
pub fn load_or_create(
    dir: Option<&Path>,
    hostnames: &[String],
) -> Result<TlsMaterial, CertificateError> {
    let mut new_ca = false;
    let (ca_key, ca_file) = match dir {
        Some(dir) => {
            let key_path = dir.join("ca-key.pem");
            let key = match fs::read_to_string(&key_path) {
                Ok(pem) => {
                    tighten_existing(&key_path)?;
                    KeyPair::from_pem(&pem).map_err(|source| CertificateError::BadCaKey {
                        path: key_path.clone(),
                        source,
                    })?
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let key = KeyPair::generate()?;
                    write_private(&key_path, &key.serialize_pem())?;
                    new_ca = true;
                    key
                }
                Err(source) => {
                    return Err(CertificateError::File {
                        action: "read",
                        path: key_path,
                        source,
                    });
                }
            };
            (key, Some(dir.join("ca.pem")))
        }
        None => (KeyPair::generate()?, None),
    };
    let ca_params = ca_params()?;
    // Re-signing the same DN with the same key reproduces an equivalent CA certificate, so
    // certificates issued on earlier starts keep chaining to the `ca.pem` clients hold.
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let mut ca_pem = ca_cert.pem();
    if let Some(path) = &ca_file {
        match fs::read_to_string(path) {
            // Keep the file clients already trust; it names the same key and subject. A new key
            // (first start, or the old key was moved away) needs a new ca.pem: an old one would
            // not verify the server certificate this start issues.
            Ok(existing) if !new_ca && existing.contains("BEGIN CERTIFICATE") => ca_pem = existing,
            _ => fs::write(path, &ca_pem).map_err(|source| CertificateError::File {
                action: "write",
                path: path.clone(),
                source,
            })?,
        }
    }
    let issuer = Issuer::new(ca_params, &ca_key);
    let server_key = KeyPair::generate()?;
    let server_cert = server_params(hostnames)?.signed_by(&server_key, &issuer)?;
    if let Some(dir) = dir {
        write_private(&dir.join("server-key.pem"), &server_key.serialize_pem())?;
        let path = dir.join("server.pem");
        fs::write(&path, server_cert.pem()).map_err(|source| CertificateError::File {
            action: "write",
            path,
            source,
        })?;
    }

    let chain: Vec<CertificateDer<'static>> = vec![server_cert.der().clone()];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
    let mut provider = rustls::crypto::ring::default_provider();
    // Cheapest safe suites first, and the server's order wins: clients (rustls, OpenSSL) prefer
    // AES-256-GCM-SHA384, whose SHA-384 key schedule has no CPU support and was ~9% of the
    // hub's CPU per MQTT connect; AES-128-GCM-SHA256 uses the SHA and AES instructions.
    // Every suite stays enabled for clients that offer nothing else.
    provider.cipher_suites.sort_by_key(|suite| {
        !matches!(
            suite.suite(),
            CipherSuite::TLS13_AES_128_GCM_SHA256
                | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        )
    });
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.ignore_client_order = true;
    // Stateless session tickets (keys rotate every 6 hours, in memory only): a reconnecting
    // device resumes without a certificate signature and verification, however many devices
    // there are (the default stateful cache holds 256 sessions). One ticket per connection is
    // enough for the next reconnect.
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    config.send_tls13_tickets = 1;
    // The HTTPS port serves plain HTTP/1.1 (REST and the MQTT WebSocket upgrade).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsMaterial {
        ca_pem,
        ca_file,
        server_config: Arc::new(config),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_survives_restart_and_server_cert_names_extra_hosts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = load_or_create(Some(dir.path()), &[]).expect("first start");
        let key_before = fs::read_to_string(dir.path().join("ca-key.pem")).expect("ca key");
        let second = load_or_create(Some(dir.path()), &["myhub.example".into()]).expect("restart");
        let key_after = fs::read_to_string(dir.path().join("ca-key.pem")).expect("ca key");
        assert_eq!(
            key_before, key_after,
            "the CA key must not change across restarts"
        );
        assert!(first.ca_pem.contains("BEGIN CERTIFICATE"));
        assert!(second.ca_file.as_deref().is_some_and(Path::exists));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join("ca-key.pem"))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_new_ca_key_gets_a_new_ca_pem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = load_or_create(Some(dir.path()), &[]).expect("first start");
        // What the BadCaKey error tells people to do: move the key away.
        fs::rename(
            dir.path().join("ca-key.pem"),
            dir.path().join("ca-key.pem.old"),
        )
        .expect("move the key away");
        let second = load_or_create(Some(dir.path()), &[]).expect("restart with a new CA");
        assert_ne!(
            first.ca_pem, second.ca_pem,
            "the old ca.pem does not match the new key"
        );
        assert_eq!(
            fs::read_to_string(dir.path().join("ca.pem")).expect("ca.pem"),
            second.ca_pem
        );
    }

    #[test]
    fn corrupt_ca_key_is_refused_not_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("ca-key.pem"), "garbage").expect("write");
        let err = load_or_create(Some(dir.path()), &[]).expect_err("must refuse");
        assert!(err.to_string().contains("ca-key.pem"), "{err}");
        assert_eq!(
            fs::read_to_string(dir.path().join("ca-key.pem")).expect("read"),
            "garbage"
        );
    }
}
