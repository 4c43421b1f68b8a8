//! Shared access signature (SAS) tokens: generation byte-for-byte as the official SDKs do it,
//! parsing in any field order, and verification (HMAC over the received `sr`, constant-time
//! compare, expiry against a caller-supplied `now`, audience as a path-segment prefix)
//! (reference §2). Pure: callers pass the expiry and the current time.

use std::fmt;

use base64::Engine as _;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use ring::hmac;

use crate::connection_string::SharedKey;

/// Python `urllib.parse.quote(s, safe="")`: everything but `A-Z a-z 0-9 _ . - ~` is encoded.
pub(crate) const PY_QUOTE_SAFE_NONE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'_')
    .remove(b'.')
    .remove(b'-')
    .remove(b'~');

/// Python `urllib.parse.quote(s)`: the default safe set keeps `/` literal.
const PY_QUOTE_DEFAULT: &AsciiSet = &PY_QUOTE_SAFE_NONE.remove(b'/');

/// JavaScript `encodeURIComponent`: also keeps `! * ' ( )` literal. The Node SDK then encodes
/// those five itself (see [`node_encode`]).
const JS_ENCODE_URI_COMPONENT: &AsciiSet = &PY_QUOTE_SAFE_NONE
    .remove(b'!')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

/// The prefix of every token.
pub const TOKEN_PREFIX: &str = "SharedAccessSignature ";

/// Token lifetime every SDK uses by default, in seconds.
pub const DEFAULT_TTL_SECS: u64 = 3600;

/// Which SDK's byte-exact token format to produce (they differ only in URL encoding and field
/// order; all verify the same way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SasStyle {
    /// azure-iot-device: `quote(sr, safe="")`, `quote(sig, safe="")`, order `sr, sig, se, skn`.
    #[default]
    PythonDevice,
    /// azure-iot-hub: `quote_plus(sr)`, `quote(sig)` (leaves `/` literal), order `sr, sig, se, skn`.
    PythonService,
    /// Node azure-iot-common: `encodeUriComponentStrict` on `sr`, `sig` and `skn`, order
    /// `sr, sig, skn, se`.
    Node,
}

/// Node's `encodeUriComponentStrict`: `encodeURIComponent`, then `! ' ( ) *` as `%` plus
/// lower-case hex of the char code (so `*` becomes `%2a`).
fn node_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for piece in utf8_percent_encode(s, JS_ENCODE_URI_COMPONENT) {
        for c in piece.chars() {
            match c {
                '!' | '\'' | '(' | ')' | '*' => out.push_str(&format!("%{:x}", c as u32)),
                _ => out.push(c),
            }
        }
    }
    out
}

/// Python `quote_plus(s)`: like `quote(s, safe="")` but a space becomes `+`.
fn py_quote_plus(s: &str) -> String {
    s.split(' ')
        .map(|part| utf8_percent_encode(part, PY_QUOTE_SAFE_NONE).to_string())
        .collect::<Vec<_>>()
        .join("+")
}

/// The resource URI of a device or module identity: `{host}/devices/{id}[/modules/{m}]`.
/// `host` is the `HostName` as the client knows it (including any `:port`).
pub fn device_resource_uri(host: &str, device_id: &str, module_id: Option<&str>) -> String {
    match module_id {
        Some(m) => format!("{host}/devices/{device_id}/modules/{m}"),
        None => format!("{host}/devices/{device_id}"),
    }
}

fn sign(key: &SharedKey, encoded_resource: &str, expiry: &str) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key.as_bytes());
    let message = format!("{encoded_resource}\n{expiry}");
    let tag = hmac::sign(&key, message.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
}

/// Generates a token in our house style ([`SasStyle::PythonDevice`]): `resource_uri` is the
/// unencoded URI (`myhub.azure-devices.net` or `{host}/devices/{id}`), `key_name` the policy
/// name for service tokens (`None` for device-key tokens), `expiry` seconds since the epoch.
pub fn generate(
    resource_uri: &str,
    key: &SharedKey,
    key_name: Option<&str>,
    expiry: u64,
) -> String {
    generate_with(SasStyle::PythonDevice, resource_uri, key, key_name, expiry)
}

/// Generates a token exactly as the SDK named by `style` would.
pub fn generate_with(
    style: SasStyle,
    resource_uri: &str,
    key: &SharedKey,
    key_name: Option<&str>,
    expiry: u64,
) -> String {
    let sr = match style {
        SasStyle::PythonDevice => utf8_percent_encode(resource_uri, PY_QUOTE_SAFE_NONE).to_string(),
        SasStyle::PythonService => py_quote_plus(resource_uri),
        SasStyle::Node => node_encode(resource_uri),
    };
    let sig = sign(key, &sr, &expiry.to_string());
    match style {
        SasStyle::PythonDevice | SasStyle::PythonService => {
            let set = if style == SasStyle::PythonDevice {
                PY_QUOTE_SAFE_NONE
            } else {
                PY_QUOTE_DEFAULT
            };
            let sig = utf8_percent_encode(&sig, set);
            match key_name {
                Some(skn) => format!("{TOKEN_PREFIX}sr={sr}&sig={sig}&se={expiry}&skn={skn}"),
                None => format!("{TOKEN_PREFIX}sr={sr}&sig={sig}&se={expiry}"),
            }
        }
        SasStyle::Node => {
            let sig = node_encode(&sig);
            match key_name {
                Some(skn) => format!(
                    "{TOKEN_PREFIX}sr={sr}&sig={sig}&skn={}&se={expiry}",
                    node_encode(skn)
                ),
                None => format!("{TOKEN_PREFIX}sr={sr}&sig={sig}&se={expiry}"),
            }
        }
    }
}

/// Why a token was rejected. Messages never contain the signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SasError {
    /// The text does not start with `SharedAccessSignature `.
    #[error("sas token does not start with `SharedAccessSignature `")]
    MissingPrefix,
    /// A `&`-separated field had no `=`.
    #[error("sas token field {position} has no `=`; expected `name=value`")]
    MalformedField {
        /// 1-based position of the field.
        position: usize,
    },
    /// A field other than `sr`, `sig`, `se`, `skn`.
    #[error(
        "sas token field `{name}` is not recognised; a token has `sr`, `sig`, `se` and optionally `skn`"
    )]
    UnknownField {
        /// The field name.
        name: String,
    },
    /// A field given twice.
    #[error("sas token field `{name}` appears more than once")]
    DuplicateField {
        /// The field name.
        name: &'static str,
    },
    /// A required field is absent.
    #[error("sas token is missing field `{name}`")]
    MissingField {
        /// The field name.
        name: &'static str,
    },
    /// A field is present but empty.
    #[error("sas token field `{name}` is empty")]
    EmptyField {
        /// The field name.
        name: &'static str,
    },
    /// A field does not percent-decode to UTF-8.
    #[error("sas token field `{name}` is not valid percent-encoded utf-8")]
    InvalidEncoding {
        /// The field name.
        name: &'static str,
    },
    /// `se` is not a whole number.
    #[error("sas token field `se` must be whole seconds since the unix epoch")]
    InvalidExpiry,
    /// `sig` does not decode as base64.
    #[error("sas token field `sig` is not base64")]
    SignatureNotBase64,
    /// The signature does not match the key.
    #[error("sas token signature mismatch: it was not signed with this key")]
    SignatureMismatch,
    /// The token has expired.
    #[error(
        "sas token expired at {expiry} (unix seconds); now is {now}, allowed clock skew {skew_secs}s"
    )]
    Expired {
        /// The token's `se`.
        expiry: u64,
        /// The time checked against.
        now: u64,
        /// The skew allowed.
        skew_secs: u64,
    },
    /// The token's resource does not cover what is being accessed.
    #[error("sas token audience `{resource}` does not cover resource `{target}`")]
    AudienceMismatch {
        /// The decoded `sr`.
        resource: String,
        /// `host/path` being accessed.
        target: String,
    },
}

/// A parsed token. `Debug` hides the signature.
#[derive(Clone, PartialEq, Eq)]
pub struct SasToken {
    /// `sr` exactly as received (the HMAC is computed over this text).
    pub encoded_resource: String,
    /// `sr` percent-decoded, e.g. `myhub.azure-devices.net/devices/dev1`.
    pub resource: String,
    /// `sig` percent-decoded: the base64 text of the HMAC.
    pub signature: String,
    /// `se`: expiry in seconds since the Unix epoch.
    pub expiry: u64,
    /// `skn` percent-decoded: the policy name, absent for device-key tokens.
    pub key_name: Option<String>,
    /// `se` exactly as received (signed as text).
    expiry_text: String,
}

impl fmt::Debug for SasToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SasToken")
            .field("resource", &self.resource)
            .field("expiry", &self.expiry)
            .field("key_name", &self.key_name)
            .field("signature", &"<redacted>")
            .finish()
    }
}

fn decode_field(name: &'static str, raw: &str) -> Result<String, SasError> {
    percent_decode_str(raw)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| SasError::InvalidEncoding { name })
}

/// Splits `host[:port][/path...]` into a lower-case host without port and path segments.
fn split_audience(s: &str) -> (String, Vec<&str>) {
    let (host, path) = s.split_once('/').unwrap_or((s, ""));
    let host = host.split_once(':').map_or(host, |(h, _)| h);
    let segments = path.split('/').filter(|p| !p.is_empty()).collect();
    (host.to_ascii_lowercase(), segments)
}

impl SasToken {
    /// Parses `SharedAccessSignature sr=..&sig=..&se=..[&skn=..]`, fields in any order.
    pub fn parse(text: &str) -> Result<Self, SasError> {
        let body = text
            .strip_prefix(TOKEN_PREFIX)
            .ok_or(SasError::MissingPrefix)?;
        let mut fields: [Option<&str>; 4] = [None; 4];
        const NAMES: [&str; 4] = ["sr", "sig", "se", "skn"];
        for (i, field) in body.split('&').enumerate() {
            let (name, value) = field
                .split_once('=')
                .ok_or(SasError::MalformedField { position: i + 1 })?;
            let index =
                NAMES
                    .iter()
                    .position(|n| *n == name)
                    .ok_or_else(|| SasError::UnknownField {
                        name: name.to_owned(),
                    })?;
            if fields[index].is_some() {
                return Err(SasError::DuplicateField { name: NAMES[index] });
            }
            if value.is_empty() {
                return Err(SasError::EmptyField { name: NAMES[index] });
            }
            fields[index] = Some(value);
        }
        let [sr, sig, se, skn] = fields;
        let sr = sr.ok_or(SasError::MissingField { name: "sr" })?;
        let sig = sig.ok_or(SasError::MissingField { name: "sig" })?;
        let se = se.ok_or(SasError::MissingField { name: "se" })?;
        if !se.bytes().all(|b| b.is_ascii_digit()) {
            return Err(SasError::InvalidExpiry);
        }
        let expiry = se.parse().map_err(|_| SasError::InvalidExpiry)?;
        Ok(SasToken {
            encoded_resource: sr.to_owned(),
            resource: decode_field("sr", sr)?,
            signature: decode_field("sig", sig)?,
            expiry,
            key_name: skn.map(|s| decode_field("skn", s)).transpose()?,
            expiry_text: se.to_owned(),
        })
    }

    /// Renders the token for an `Authorization` header or MQTT password, keeping `sr` and `se`
    /// as received (so the signature still verifies), fields in the order `sr, sig, se, skn`.
    pub fn to_header(&self) -> String {
        let sig = utf8_percent_encode(&self.signature, PY_QUOTE_SAFE_NONE);
        let mut out = format!(
            "{TOKEN_PREFIX}sr={}&sig={sig}&se={}",
            self.encoded_resource, self.expiry_text
        );
        if let Some(skn) = &self.key_name {
            out.push_str("&skn=");
            out.extend(utf8_percent_encode(skn, PY_QUOTE_SAFE_NONE));
        }
        out
    }

    /// Checks the signature: HMAC-SHA256 with `key` over the received `sr` text, `\n` and `se`,
    /// compared in constant time.
    pub fn verify_signature(&self, key: &SharedKey) -> Result<(), SasError> {
        let tag = base64::engine::general_purpose::STANDARD
            .decode(&self.signature)
            .map_err(|_| SasError::SignatureNotBase64)?;
        let key = hmac::Key::new(hmac::HMAC_SHA256, key.as_bytes());
        let message = format!("{}\n{}", self.encoded_resource, self.expiry_text);
        hmac::verify(&key, message.as_bytes(), &tag).map_err(|_| SasError::SignatureMismatch)
    }

    /// Fails if the token expired before `now_unix - skew_secs`.
    pub fn check_expiry(&self, now_unix: u64, skew_secs: u64) -> Result<(), SasError> {
        if self.expiry.saturating_add(skew_secs) < now_unix {
            return Err(SasError::Expired {
                expiry: self.expiry,
                now: now_unix,
                skew_secs,
            });
        }
        Ok(())
    }

    /// Whether the token's resource covers `host` + `path`: hosts equal ignoring ASCII case and
    /// any `:port`, and the token's path a prefix of `path` by whole segments, ignoring case
    /// (`/a/b` covers `/a/b/c` but not `/a/bc`).
    pub fn covers(&self, host: &str, path: &str) -> bool {
        let (token_host, token_path) = split_audience(&self.resource);
        let host = host.split_once(':').map_or(host, |(h, _)| h);
        if !token_host.eq_ignore_ascii_case(host) {
            return false;
        }
        let mut target = path.split('/').filter(|p| !p.is_empty());
        token_path
            .iter()
            .all(|seg| target.next().is_some_and(|t| t.eq_ignore_ascii_case(seg)))
    }

    /// Like [`SasToken::covers`] but returns an error naming both sides.
    pub fn check_audience(&self, host: &str, path: &str) -> Result<(), SasError> {
        if self.covers(host, path) {
            return Ok(());
        }
        let path = path.trim_start_matches('/');
        Err(SasError::AudienceMismatch {
            resource: self.resource.clone(),
            target: if path.is_empty() {
                host.to_owned()
            } else {
                format!("{host}/{path}")
            },
        })
    }

    /// Runs every check of reference §2.3: signature, then expiry, then audience.
    pub fn verify(
        &self,
        key: &SharedKey,
        now_unix: u64,
        skew_secs: u64,
        host: &str,
        path: &str,
    ) -> Result<(), SasError> {
        self.verify_signature(key)?;
        self.check_expiry(now_unix, skew_secs)?;
        self.check_audience(host, path)
    }

    /// The device id and optional module id named by a device-scoped `sr`
    /// (`{host}/devices/{id}[/modules/{m}]`), for finding the key of a device token.
    pub fn device_identity(&self) -> Option<(String, Option<String>)> {
        let (_, segments) = split_audience(&self.resource);
        match segments.as_slice() {
            ["devices", d] => Some(((*d).to_owned(), None)),
            ["devices", d, "modules", m] => Some(((*d).to_owned(), Some((*m).to_owned()))),
            _ => None,
        }
    }
}

impl std::str::FromStr for SasToken {
    type Err = SasError;

    /// Same as [`SasToken::parse`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SasToken::parse(s)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn device_key() -> SharedKey {
        SharedKey::from_base64("ZGV2aWNlLWtleS0wMTIzNDU2Nzg5YWJjZGVmMDEyMw==").unwrap()
    }
    fn service_key() -> SharedKey {
        SharedKey::from_base64("c2VydmljZS1rZXktMDEyMzQ1Njc4OWFiY2RlZjAxMjM=").unwrap()
    }

    const DEVICE_TOKEN: &str = "SharedAccessSignature sr=localhost%2Fdevices%2Fdev1&sig=o3BWC3mhuw2w9r3RApGLJH0jzIhMXa231GJO1BZSRO8%3D&se=1795856933";
    const PY_SERVICE_TOKEN: &str = "SharedAccessSignature sr=localhost%3A8443&sig=HejUTI3gkVJutcc4DZBygTStBe2IJbdQZcM05HSR7TE%3D&se=1795856980&skn=iothubowner";
    const NODE_SERVICE_TOKEN: &str = "SharedAccessSignature sr=localhost&sig=Md2zuL%2BtXM16EpOoq%2BHnujMoBTgOLPCEc2EbLfCP8bc%3D&skn=iothubowner&se=1795857085";

    #[test]
    fn reproduces_reference_worked_examples() {
        let uri = device_resource_uri("localhost", "dev1", None);
        assert_eq!(
            generate(&uri, &device_key(), None, 1795856933),
            DEVICE_TOKEN
        );
        assert_eq!(
            generate_with(
                SasStyle::PythonService,
                "localhost:8443",
                &service_key(),
                Some("iothubowner"),
                1795856980
            ),
            PY_SERVICE_TOKEN
        );
        assert_eq!(
            generate_with(
                SasStyle::Node,
                "localhost",
                &service_key(),
                Some("iothubowner"),
                1795857085
            ),
            NODE_SERVICE_TOKEN
        );
    }

    #[test]
    fn styles_differ_only_in_encoding() {
        // Find an expiry whose signature contains `/` to show the Python service quirk.
        let (expiry, token) = (0..1000u64)
            .map(|se| {
                (
                    se,
                    generate_with(SasStyle::PythonService, "h", &service_key(), Some("p"), se),
                )
            })
            .find(|(_, t)| t.contains('/'))
            .unwrap();
        let device_style = generate_with(
            SasStyle::PythonDevice,
            "h",
            &service_key(),
            Some("p"),
            expiry,
        );
        assert!(!device_style.contains('/'));
        assert!(device_style.contains("%2F"));
        assert_eq!(
            SasToken::parse(&token).unwrap().signature,
            SasToken::parse(&device_style).unwrap().signature
        );
        // Python service quote_plus vs device quote vs Node strict encoding.
        assert!(
            generate_with(SasStyle::PythonService, "a b/c", &service_key(), None, 1)
                .contains("sr=a+b%2Fc&")
        );
        assert!(
            generate_with(SasStyle::PythonDevice, "a b/c", &service_key(), None, 1)
                .contains("sr=a%20b%2Fc&")
        );
        assert!(
            generate_with(
                SasStyle::Node,
                "h/devices/a*(b)!'~",
                &service_key(),
                None,
                1
            )
            .contains("sr=h%2Fdevices%2Fa%2a%28b%29%21%27~&")
        );
    }

    #[test]
    fn verifies_reference_tokens() {
        let t = SasToken::parse(DEVICE_TOKEN).unwrap();
        assert_eq!(t.resource, "localhost/devices/dev1");
        assert_eq!(t.key_name, None);
        assert_eq!(t.expiry, 1795856933);
        assert_eq!(t.device_identity(), Some(("dev1".into(), None)));
        t.verify(
            &device_key(),
            1795856000,
            0,
            "localhost:8883",
            "/devices/dev1",
        )
        .unwrap();
        assert_eq!(t.to_header(), DEVICE_TOKEN);

        for token in [PY_SERVICE_TOKEN, NODE_SERVICE_TOKEN] {
            let t = SasToken::parse(token).unwrap();
            assert_eq!(t.key_name.as_deref(), Some("iothubowner"));
            t.verify(
                &service_key(),
                1795856000,
                0,
                "LOCALHOST",
                "/devices/dev1/twin",
            )
            .unwrap();
            assert_eq!(t.device_identity(), None);
        }
        assert_eq!(
            SasToken::parse(PY_SERVICE_TOKEN).unwrap().resource,
            "localhost:8443"
        );
    }

    #[test]
    fn verification_errors_name_the_problem() {
        let t = SasToken::parse(DEVICE_TOKEN).unwrap();
        assert_eq!(
            t.verify_signature(&service_key()),
            Err(SasError::SignatureMismatch)
        );
        let e = t.check_expiry(1795857000, 60).unwrap_err();
        assert_eq!(
            e.to_string(),
            "sas token expired at 1795856933 (unix seconds); now is 1795857000, allowed clock skew 60s"
        );
        assert_eq!(t.check_expiry(1795857000, 300), Ok(()));
        assert_eq!(t.check_expiry(1795856933, 0), Ok(()));
        let e = t.check_audience("localhost", "/devices/dev2").unwrap_err();
        assert_eq!(
            e.to_string(),
            "sas token audience `localhost/devices/dev1` does not cover resource `localhost/devices/dev2`"
        );

        // Tampering with sr breaks the HMAC even if it decodes to the same text.
        let tampered =
            DEVICE_TOKEN.replace("sr=localhost%2Fdevices%2Fdev1", "sr=localhost/devices/dev1");
        let t2 = SasToken::parse(&tampered).unwrap();
        assert_eq!(t2.resource, t.resource);
        assert_eq!(
            t2.verify_signature(&device_key()),
            Err(SasError::SignatureMismatch)
        );
        let bad_sig = DEVICE_TOKEN.replace("sig=o3", "sig=*3");
        assert_eq!(
            SasToken::parse(&bad_sig)
                .unwrap()
                .verify_signature(&device_key()),
            Err(SasError::SignatureNotBase64)
        );
    }

    #[test]
    fn audience_is_segment_prefix() {
        let t = SasToken::parse(&generate(
            "Hub.example.com/devices/dev1",
            &device_key(),
            None,
            1,
        ))
        .unwrap();
        let table = [
            ("hub.example.com", "/devices/dev1", true),
            ("hub.example.com:8883", "devices/dev1/messages/events", true),
            ("HUB.example.com", "/DEVICES/DEV1/", true),
            ("hub.example.com", "/devices/dev10", false),
            ("hub.example.com", "/devices", false),
            ("hub.example.com", "", false),
            ("other.example.com", "/devices/dev1", false),
        ];
        for (host, path, want) in table {
            assert_eq!(t.covers(host, path), want, "{host} {path}");
        }
        let hub = SasToken::parse(PY_SERVICE_TOKEN).unwrap();
        assert!(hub.covers("localhost", ""));
        assert!(hub.covers("localhost:443", "/jobs/v2/j1"));
    }

    #[test]
    fn parse_errors() {
        let table: &[(&str, SasError)] = &[
            ("sr=a&sig=b&se=1", SasError::MissingPrefix),
            (
                "SharedAccessSignature sig=b&se=1",
                SasError::MissingField { name: "sr" },
            ),
            (
                "SharedAccessSignature sr=a&se=1",
                SasError::MissingField { name: "sig" },
            ),
            (
                "SharedAccessSignature sr=a&sig=b",
                SasError::MissingField { name: "se" },
            ),
            (
                "SharedAccessSignature sr=a&sig=b&se=1&se=2",
                SasError::DuplicateField { name: "se" },
            ),
            (
                "SharedAccessSignature sr=a&sig=b&se=x",
                SasError::InvalidExpiry,
            ),
            (
                "SharedAccessSignature sr=a&sig=b&se=-1",
                SasError::InvalidExpiry,
            ),
            (
                "SharedAccessSignature sr=a&sig=b&se=1&foo=2",
                SasError::UnknownField { name: "foo".into() },
            ),
            (
                "SharedAccessSignature sr=a&sig=b&se",
                SasError::MalformedField { position: 3 },
            ),
            (
                "SharedAccessSignature sr=&sig=b&se=1",
                SasError::EmptyField { name: "sr" },
            ),
            (
                "SharedAccessSignature sr=%FF&sig=b&se=1",
                SasError::InvalidEncoding { name: "sr" },
            ),
        ];
        for (input, want) in table {
            assert_eq!(SasToken::parse(input).as_ref(), Err(want), "{input}");
        }
        assert_eq!(
            SasError::MissingField { name: "se" }.to_string(),
            "sas token is missing field `se`"
        );
    }

    #[test]
    fn debug_hides_signature() {
        let t = SasToken::parse(DEVICE_TOKEN).unwrap();
        let shown = format!("{t:?}");
        assert!(!shown.contains("o3BWC3"), "{shown}");
        assert!(shown.contains("localhost/devices/dev1"));
    }

    proptest::proptest! {
        #[test]
        fn parser_never_panics(s in "\\PC*") {
            let _ = SasToken::parse(&s);
            if let Ok(t) = SasToken::parse(&format!("{TOKEN_PREFIX}{s}")) {
                let _ = t.verify(&device_key(), 0, 0, "h", "/a");
            }
        }

        #[test]
        fn generated_tokens_verify(
            host in "[a-z0-9.-]{1,20}(:[0-9]{1,4})?",
            id in "[A-Za-z0-9*()!'%=@$:.-]{1,20}",
            key in proptest::collection::vec(proptest::num::u8::ANY, 1..64),
            expiry in 0u64..4_000_000_000,
            style in proptest::prop_oneof![
                proptest::strategy::Just(SasStyle::PythonDevice),
                proptest::strategy::Just(SasStyle::PythonService),
                proptest::strategy::Just(SasStyle::Node),
            ],
        ) {
            let key = SharedKey::from_bytes(key);
            let uri = device_resource_uri(&host, &id, None);
            let token = SasToken::parse(&generate_with(style, &uri, &key, Some("p"), expiry)).unwrap();
            proptest::prop_assert_eq!(&token.resource, &uri);
            proptest::prop_assert_eq!(token.key_name.as_deref(), Some("p"));
            let path = format!("/devices/{id}/messages/events");
            proptest::prop_assert!(token.verify(&key, expiry, 0, &host, &path).is_ok());
            let again = SasToken::parse(&token.to_header()).unwrap();
            proptest::prop_assert!(again.verify_signature(&key).is_ok());
        }
    }
}
