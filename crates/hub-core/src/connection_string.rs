//! IoT Hub connection strings (service and device/module forms): parsing, validation and
//! redacted display. Keys are case-sensitive and each pair splits at its first `=`, as the
//! Python and Node SDKs do (reference §1). Invariant: `Debug`/`Display` never print a key or
//! a signature; only [`ConnectionString::to_secret_string`] and friends do.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

use crate::sas::{SasError, SasToken};

/// Key names recognised in a connection string (exact spelling, reference §1.1).
const KNOWN_KEYS: [&str; 8] = [
    HOST_NAME,
    DEVICE_ID,
    MODULE_ID,
    SHARED_ACCESS_KEY,
    SHARED_ACCESS_KEY_NAME,
    SHARED_ACCESS_SIGNATURE,
    GATEWAY_HOST_NAME,
    X509,
];
const HOST_NAME: &str = "HostName";
const DEVICE_ID: &str = "DeviceId";
const MODULE_ID: &str = "ModuleId";
const SHARED_ACCESS_KEY: &str = "SharedAccessKey";
const SHARED_ACCESS_KEY_NAME: &str = "SharedAccessKeyName";
const SHARED_ACCESS_SIGNATURE: &str = "SharedAccessSignature";
const GATEWAY_HOST_NAME: &str = "GatewayHostName";
const X509: &str = "x509";

/// Text shown instead of a secret in `Debug` and `Display`.
const REDACTED: &str = "<redacted>";

/// Maximum length of a device or module id (reference §6.1).
pub const MAX_ID_LEN: usize = 128;

/// Why a connection string was rejected. Messages name the key and say what is expected; they
/// never contain a key or signature value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectionStringError {
    /// The input was empty or only whitespace.
    #[error(
        "connection string is empty; expected `HostName=...;DeviceId=...;SharedAccessKey=...` or `HostName=...;SharedAccessKeyName=...;SharedAccessKey=...`"
    )]
    Empty,
    /// A `;`-separated pair was empty (trailing or doubled `;`).
    #[error(
        "connection string has an empty pair at position {position} (a trailing or doubled `;`?); remove it"
    )]
    EmptyPair {
        /// 1-based position of the pair.
        position: usize,
    },
    /// A pair had no `=`.
    #[error("connection string pair {position} has no `=`; expected `Key=value`")]
    MissingEquals {
        /// 1-based position of the pair.
        position: usize,
    },
    /// A pair had an empty key name (`=value`).
    #[error("connection string pair {position} has an empty key name; expected `Key=value`")]
    EmptyKeyName {
        /// 1-based position of the pair.
        position: usize,
    },
    /// A key is not one IoT Hub knows.
    #[error("connection string key `{key}` is not recognised; {hint}")]
    UnknownKey {
        /// The key as written.
        key: String,
        /// A suggestion (`did you mean ...`) or the list of valid keys.
        hint: String,
    },
    /// A key appeared twice.
    #[error("connection string key `{key}` appears more than once; give it once")]
    DuplicateKey {
        /// The repeated key.
        key: &'static str,
    },
    /// A key had an empty value.
    #[error("connection string key `{key}` has an empty value; expected {expected}")]
    EmptyValue {
        /// The key.
        key: &'static str,
        /// What the value should look like.
        expected: &'static str,
    },
    /// A required key is missing.
    #[error("connection string is missing `{key}`; {expected}")]
    MissingKey {
        /// The missing key.
        key: &'static str,
        /// What a complete string of this form contains.
        expected: &'static str,
    },
    /// A key that does not belong in this form of connection string.
    #[error(
        "connection string key `{key}` does not belong in a {form} connection string; {expected}"
    )]
    KeyNotAllowed {
        /// The key that is out of place.
        key: &'static str,
        /// `service` or `device`.
        form: &'static str,
        /// What the form contains.
        expected: &'static str,
    },
    /// More than one authentication scheme (or both service and device identities) given.
    #[error("connection string mixes `{first}` and `{second}`; {expected}")]
    Mixed {
        /// First conflicting key.
        first: &'static str,
        /// Second conflicting key.
        second: &'static str,
        /// What to do instead.
        expected: &'static str,
    },
    /// The key is not valid base64.
    #[error(
        "connection string key `{key}` is not valid base64; expected the key as shown in the portal or `az iot hub ... show-connection-string`"
    )]
    InvalidBase64 {
        /// The key (`SharedAccessKey`).
        key: &'static str,
    },
    /// `HostName` or `GatewayHostName` is malformed.
    #[error("connection string key `{key}` is not a valid host name")]
    InvalidHost {
        /// The key.
        key: &'static str,
        /// What is wrong with it.
        #[source]
        source: HostAddrError,
    },
    /// `DeviceId` or `ModuleId` breaks IoT Hub's id rules.
    #[error("connection string key `{key}` is not a valid id")]
    InvalidId {
        /// The key.
        key: &'static str,
        /// What is wrong with it.
        #[source]
        source: IdError,
    },
    /// `x509` was given a value other than `true`.
    #[error(
        "connection string key `x509` must be `true`; drop it to use key or token authentication"
    )]
    InvalidX509,
    /// `SharedAccessSignature` does not parse as a SAS token.
    #[error("connection string key `SharedAccessSignature` is not a valid sas token")]
    InvalidSignature {
        /// What is wrong with it.
        #[source]
        source: SasError,
    },
}

/// Why a host name (optionally with `:port`) was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HostAddrError {
    /// Empty host.
    #[error("host name is empty")]
    Empty,
    /// A character not allowed in a host name.
    #[error(
        "host name `{host}` contains `{ch}`; expected letters, digits, `-`, `.` and `_`, optionally `:port`"
    )]
    InvalidChar {
        /// The host as given.
        host: String,
        /// The offending character.
        ch: char,
    },
    /// The port is not a number in 1..=65535.
    #[error("host name `{host}` has port `{port}`; expected a number from 1 to 65535")]
    InvalidPort {
        /// The host as given.
        host: String,
        /// The port text.
        port: String,
    },
}

/// Why a device or module id was rejected (reference §6.1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// Empty id.
    #[error("{kind} id is empty")]
    Empty {
        /// `device` or `module`.
        kind: &'static str,
    },
    /// Longer than 128 characters.
    #[error("{kind} id is {len} characters long; the limit is 128")]
    TooLong {
        /// `device` or `module`.
        kind: &'static str,
        /// Its length.
        len: usize,
    },
    /// A character outside the allowed set.
    #[error(
        "{kind} id `{id}` contains `{ch}` at position {position}; {kind} ids allow ASCII letters, digits and {allowed}"
    )]
    InvalidChar {
        /// `device` or `module`.
        kind: &'static str,
        /// The id.
        id: String,
        /// The offending character.
        ch: char,
        /// Its 0-based character position.
        position: usize,
        /// The allowed punctuation.
        allowed: &'static str,
    },
}

const DEVICE_ID_PUNCT: &str = "-.%_*?!(),:=@$'";
const MODULE_ID_PUNCT: &str = "-.+%_#*?!(),:=@$'";

fn validate_id(id: &str, kind: &'static str, punct: &'static str) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if let Some((position, ch)) = id
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || punct.contains(*c)))
    {
        return Err(IdError::InvalidChar {
            kind,
            id: id.to_owned(),
            ch,
            position,
            allowed: punct,
        });
    }
    // Every accepted char is ASCII, so the byte length is the character count.
    if id.len() > MAX_ID_LEN {
        return Err(IdError::TooLong {
            kind,
            len: id.len(),
        });
    }
    Ok(())
}

/// Checks a device id against IoT Hub's rules: 1..=128 ASCII letters, digits and
/// `- . % _ * ? ! ( ) , : = @ $ '` (`+` and `#` are not usable by device SDKs).
pub fn validate_device_id(id: &str) -> Result<(), IdError> {
    validate_id(id, "device", DEVICE_ID_PUNCT)
}

/// Checks a module id: 1..=128 ASCII letters, digits and `- . + % _ # * ? ! ( ) , : = @ $ '`.
pub fn validate_module_id(id: &str) -> Result<(), IdError> {
    validate_id(id, "module", MODULE_ID_PUNCT)
}

/// A host name with an optional `:port` (our extension for local hubs).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostAddr {
    host: String,
    port: Option<u16>,
}

impl HostAddr {
    /// Builds a host address after checking the host name.
    pub fn new(host: &str, port: Option<u16>) -> Result<Self, HostAddrError> {
        let mut addr: HostAddr = host.parse()?;
        if addr.port.is_some() {
            return Err(HostAddrError::InvalidChar {
                host: host.to_owned(),
                ch: ':',
            });
        }
        addr.port = port;
        Ok(addr)
    }

    /// The host name without the port.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port, if one was given.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// The port, or `default` if none was given (8883 for MQTT, 443 for HTTPS).
    pub fn port_or(&self, default: u16) -> u16 {
        self.port.unwrap_or(default)
    }
}

impl FromStr for HostAddr {
    type Err = HostAddrError;

    /// Parses `host` or `host:port`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(HostAddrError::Empty);
        }
        let (host, port) = match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        };
        if host.is_empty() {
            return Err(HostAddrError::Empty);
        }
        if let Some(ch) = host
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')))
        {
            return Err(HostAddrError::InvalidChar {
                host: s.to_owned(),
                ch,
            });
        }
        let port = match port {
            None => None,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n != 0 && p.bytes().all(|b| b.is_ascii_digit()) => Some(n),
                _ => {
                    return Err(HostAddrError::InvalidPort {
                        host: s.to_owned(),
                        port: p.to_owned(),
                    });
                }
            },
        };
        Ok(HostAddr {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for HostAddr {
    /// Prints the address as given: `host` or `host:port`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) => write!(f, "{}:{port}", self.host),
            None => f.write_str(&self.host),
        }
    }
}

/// A decoded shared access key. `Debug` and `Display` are redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct SharedKey(Vec<u8>);

/// Standard alphabet, lenient like Python's `b64decode`: padding optional, excess trailing `=`
/// and non-zero trailing bits tolerated.
const LENIENT_B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

impl SharedKey {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: impl Into<Vec<u8>>) -> Self {
        SharedKey(bytes.into())
    }

    /// Decodes a base64 key (standard alphabet; padding optional).
    pub fn from_base64(text: &str) -> Result<Self, base64::DecodeError> {
        LENIENT_B64
            .decode(text.trim_end_matches('='))
            .map(SharedKey)
    }

    /// The key as canonical padded base64, as IoT Hub shows it.
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.0)
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SharedKey({REDACTED})")
    }
}

impl fmt::Display for SharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// A service connection string: `HostName=..;SharedAccessKeyName=..;SharedAccessKey=..`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConnectionString {
    /// The hub host, optionally with `:port`.
    pub host_name: HostAddr,
    /// The shared access policy name (`skn`), e.g. `iothubowner`.
    pub policy_name: String,
    /// The policy key.
    pub key: SharedKey,
}

/// How a device or module authenticates.
#[derive(Clone, PartialEq, Eq)]
pub enum DeviceAuth {
    /// A symmetric key; tokens are generated from it.
    SharedAccessKey(SharedKey),
    /// A pre-made SAS token, the full `SharedAccessSignature sr=..` text.
    SharedAccessSignature(String),
    /// X.509 client certificate (`x509=true`); no secret in the string.
    X509,
}

impl fmt::Debug for DeviceAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceAuth::SharedAccessKey(_) => write!(f, "SharedAccessKey({REDACTED})"),
            DeviceAuth::SharedAccessSignature(_) => write!(f, "SharedAccessSignature({REDACTED})"),
            DeviceAuth::X509 => f.write_str("X509"),
        }
    }
}

/// A device or module connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConnectionString {
    /// The hub host; identity and SAS audience use it.
    pub host_name: HostAddr,
    /// The device id.
    pub device_id: String,
    /// The module id, for module identities.
    pub module_id: Option<String>,
    /// How the identity authenticates.
    pub auth: DeviceAuth,
    /// Where to open the transport instead of `host_name`, if set.
    pub gateway_host_name: Option<HostAddr>,
}

impl DeviceConnectionString {
    /// The MQTT client id: `{deviceId}` or `{deviceId}/{moduleId}`.
    pub fn client_id(&self) -> String {
        match &self.module_id {
            Some(m) => format!("{}/{m}", self.device_id),
            None => self.device_id.clone(),
        }
    }

    /// The host to open the network connection to: `GatewayHostName` if set, else `HostName`.
    pub fn transport_host(&self) -> &HostAddr {
        self.gateway_host_name.as_ref().unwrap_or(&self.host_name)
    }

    /// The SAS resource URI for this identity (`{host}/devices/{id}[/modules/{m}]`).
    pub fn resource_uri(&self) -> String {
        crate::sas::device_resource_uri(
            &self.host_name.to_string(),
            &self.device_id,
            self.module_id.as_deref(),
        )
    }

    fn write(&self, f: &mut dyn fmt::Write, reveal: bool) -> fmt::Result {
        write!(
            f,
            "{HOST_NAME}={};{DEVICE_ID}={}",
            self.host_name, self.device_id
        )?;
        if let Some(m) = &self.module_id {
            write!(f, ";{MODULE_ID}={m}")?;
        }
        match &self.auth {
            DeviceAuth::SharedAccessKey(k) if reveal => {
                write!(f, ";{SHARED_ACCESS_KEY}={}", k.to_base64())?
            }
            DeviceAuth::SharedAccessKey(_) => write!(f, ";{SHARED_ACCESS_KEY}={REDACTED}")?,
            DeviceAuth::SharedAccessSignature(s) if reveal => {
                write!(f, ";{SHARED_ACCESS_SIGNATURE}={s}")?
            }
            DeviceAuth::SharedAccessSignature(_) => {
                write!(f, ";{SHARED_ACCESS_SIGNATURE}={REDACTED}")?
            }
            DeviceAuth::X509 => write!(f, ";{X509}=true")?,
        }
        if let Some(g) = &self.gateway_host_name {
            write!(f, ";{GATEWAY_HOST_NAME}={g}")?;
        }
        Ok(())
    }

    /// The connection string with its real secret (for writing `hub.env`); never log it.
    pub fn to_secret_string(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = self.write(&mut s, true);
        s
    }
}

impl ServiceConnectionString {
    fn write(&self, f: &mut dyn fmt::Write, reveal: bool) -> fmt::Result {
        write!(
            f,
            "{HOST_NAME}={};{SHARED_ACCESS_KEY_NAME}={};{SHARED_ACCESS_KEY}=",
            self.host_name, self.policy_name
        )?;
        if reveal {
            f.write_str(&self.key.to_base64())
        } else {
            f.write_str(REDACTED)
        }
    }

    /// The connection string with its real key (for writing `hub.env`); never log it.
    pub fn to_secret_string(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = self.write(&mut s, true);
        s
    }
}

impl fmt::Display for ServiceConnectionString {
    /// Prints the string with the key replaced by `<redacted>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write(f, false)
    }
}

impl fmt::Display for DeviceConnectionString {
    /// Prints the string with the key or signature replaced by `<redacted>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write(f, false)
    }
}

/// Either form of connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionString {
    /// `HostName;SharedAccessKeyName;SharedAccessKey`.
    Service(ServiceConnectionString),
    /// `HostName;DeviceId[;ModuleId];<auth>[;GatewayHostName]`.
    Device(DeviceConnectionString),
}

impl ConnectionString {
    /// The connection string with its real secret (for writing `hub.env`); never log it.
    pub fn to_secret_string(&self) -> String {
        match self {
            ConnectionString::Service(s) => s.to_secret_string(),
            ConnectionString::Device(d) => d.to_secret_string(),
        }
    }

    /// The hub host name.
    pub fn host_name(&self) -> &HostAddr {
        match self {
            ConnectionString::Service(s) => &s.host_name,
            ConnectionString::Device(d) => &d.host_name,
        }
    }
}

impl fmt::Display for ConnectionString {
    /// Prints the string with secrets replaced by `<redacted>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectionString::Service(s) => s.fmt(f),
            ConnectionString::Device(d) => d.fmt(f),
        }
    }
}

const SERVICE_EXPECTED: &str = "a service connection string is `HostName=<hub>;SharedAccessKeyName=<policy>;SharedAccessKey=<base64>`";
const DEVICE_EXPECTED: &str = "a device connection string is `HostName=<hub>;DeviceId=<id>[;ModuleId=<id>]` plus one of `SharedAccessKey=<base64>`, `SharedAccessSignature=<token>` or `x509=true`, and optionally `GatewayHostName=<host>`";
const AUTH_EXPECTED: &str =
    "give exactly one of `SharedAccessKey`, `SharedAccessSignature` or `x509=true`";

/// The pairs of a connection string, indexed by known key.
#[derive(Default)]
struct Pairs<'a> {
    values: [Option<&'a str>; KNOWN_KEYS.len()],
}

impl<'a> Pairs<'a> {
    fn parse(input: &'a str) -> Result<Self, ConnectionStringError> {
        let input = input.trim();
        if input.is_empty() {
            return Err(ConnectionStringError::Empty);
        }
        let mut pairs = Pairs::default();
        for (i, pair) in input.split(';').enumerate() {
            let position = i + 1;
            if pair.trim().is_empty() {
                return Err(ConnectionStringError::EmptyPair { position });
            }
            let (key, value) = pair
                .split_once('=')
                .ok_or(ConnectionStringError::MissingEquals { position })?;
            if key.is_empty() {
                return Err(ConnectionStringError::EmptyKeyName { position });
            }
            let Some(index) = KNOWN_KEYS.iter().position(|k| *k == key) else {
                return Err(unknown_key(key));
            };
            let known = KNOWN_KEYS[index];
            if pairs.values[index].is_some() {
                return Err(ConnectionStringError::DuplicateKey { key: known });
            }
            if value.is_empty() {
                return Err(ConnectionStringError::EmptyValue {
                    key: known,
                    expected: expected_value(known),
                });
            }
            pairs.values[index] = Some(value);
        }
        Ok(pairs)
    }

    fn get(&self, key: &str) -> Option<&'a str> {
        KNOWN_KEYS
            .iter()
            .position(|k| *k == key)
            .and_then(|i| self.values[i])
    }
}

fn expected_value(key: &str) -> &'static str {
    match key {
        HOST_NAME | GATEWAY_HOST_NAME => {
            "a host name such as `myhub.azure-devices.net` or `localhost:8443`"
        }
        DEVICE_ID => "a device id",
        MODULE_ID => "a module id",
        SHARED_ACCESS_KEY => "a base64 key",
        SHARED_ACCESS_KEY_NAME => "a policy name such as `iothubowner`",
        SHARED_ACCESS_SIGNATURE => "a token `SharedAccessSignature sr=..&sig=..&se=..`",
        _ => "`true`",
    }
}

fn unknown_key(key: &str) -> ConnectionStringError {
    let suggestion = KNOWN_KEYS
        .iter()
        .find(|k| k.eq_ignore_ascii_case(key))
        .copied()
        .or_else(|| key.eq_ignore_ascii_case("X509Cert").then_some(X509));
    let hint = match suggestion {
        Some(k) => format!("keys are case-sensitive: did you mean `{k}`?"),
        None => format!(
            "expected one of {}",
            KNOWN_KEYS.map(|k| format!("`{k}`")).join(", ")
        ),
    };
    ConnectionStringError::UnknownKey {
        key: key.to_owned(),
        hint,
    }
}

fn parse_host(key: &'static str, value: &str) -> Result<HostAddr, ConnectionStringError> {
    value
        .parse()
        .map_err(|source| ConnectionStringError::InvalidHost { key, source })
}

fn parse_key(value: &str) -> Result<SharedKey, ConnectionStringError> {
    let key = SharedKey::from_base64(value).map_err(|_| ConnectionStringError::InvalidBase64 {
        key: SHARED_ACCESS_KEY,
    })?;
    // Padding alone (`SharedAccessKey==`) decodes to no bytes: an empty key, refused like an empty
    // value (found by the connection_string fuzz target: it was accepted, then written back as
    // `SharedAccessKey=`, which does not parse).
    if key.as_bytes().is_empty() {
        return Err(ConnectionStringError::EmptyValue {
            key: SHARED_ACCESS_KEY,
            expected: expected_value(SHARED_ACCESS_KEY),
        });
    }
    Ok(key)
}

fn reject(
    pairs: &Pairs<'_>,
    keys: &[&'static str],
    form: &'static str,
    expected: &'static str,
) -> Result<(), ConnectionStringError> {
    match keys.iter().find(|k| pairs.get(k).is_some()) {
        Some(key) => Err(ConnectionStringError::KeyNotAllowed {
            key,
            form,
            expected,
        }),
        None => Ok(()),
    }
}

fn require<'a>(
    pairs: &Pairs<'a>,
    key: &'static str,
    expected: &'static str,
) -> Result<&'a str, ConnectionStringError> {
    pairs
        .get(key)
        .ok_or(ConnectionStringError::MissingKey { key, expected })
}

fn service_from_pairs(pairs: &Pairs<'_>) -> Result<ServiceConnectionString, ConnectionStringError> {
    reject(
        pairs,
        &[MODULE_ID, SHARED_ACCESS_SIGNATURE, X509, GATEWAY_HOST_NAME],
        "service",
        SERVICE_EXPECTED,
    )?;
    let host_name = parse_host(HOST_NAME, require(pairs, HOST_NAME, SERVICE_EXPECTED)?)?;
    let policy_name = require(pairs, SHARED_ACCESS_KEY_NAME, SERVICE_EXPECTED)?.to_owned();
    let key = parse_key(require(pairs, SHARED_ACCESS_KEY, SERVICE_EXPECTED)?)?;
    Ok(ServiceConnectionString {
        host_name,
        policy_name,
        key,
    })
}

fn device_from_pairs(pairs: &Pairs<'_>) -> Result<DeviceConnectionString, ConnectionStringError> {
    reject(pairs, &[SHARED_ACCESS_KEY_NAME], "device", DEVICE_EXPECTED)?;
    let host_name = parse_host(HOST_NAME, require(pairs, HOST_NAME, DEVICE_EXPECTED)?)?;
    let device_id = require(pairs, DEVICE_ID, DEVICE_EXPECTED)?;
    validate_device_id(device_id).map_err(|source| ConnectionStringError::InvalidId {
        key: DEVICE_ID,
        source,
    })?;
    let module_id = pairs.get(MODULE_ID);
    if let Some(m) = module_id {
        validate_module_id(m).map_err(|source| ConnectionStringError::InvalidId {
            key: MODULE_ID,
            source,
        })?;
    }
    let schemes: Vec<&'static str> = [SHARED_ACCESS_KEY, SHARED_ACCESS_SIGNATURE, X509]
        .into_iter()
        .filter(|k| pairs.get(k).is_some())
        .collect();
    let auth = match schemes.as_slice() {
        [] => {
            return Err(ConnectionStringError::MissingKey {
                key: SHARED_ACCESS_KEY,
                expected: AUTH_EXPECTED,
            });
        }
        [first, second, ..] => {
            return Err(ConnectionStringError::Mixed {
                first,
                second,
                expected: AUTH_EXPECTED,
            });
        }
        [SHARED_ACCESS_KEY] => DeviceAuth::SharedAccessKey(parse_key(
            pairs.get(SHARED_ACCESS_KEY).unwrap_or_default(),
        )?),
        [SHARED_ACCESS_SIGNATURE] => {
            let token = pairs.get(SHARED_ACCESS_SIGNATURE).unwrap_or_default();
            SasToken::parse(token)
                .map_err(|source| ConnectionStringError::InvalidSignature { source })?;
            DeviceAuth::SharedAccessSignature(token.to_owned())
        }
        [_] => {
            if !pairs
                .get(X509)
                .unwrap_or_default()
                .eq_ignore_ascii_case("true")
            {
                return Err(ConnectionStringError::InvalidX509);
            }
            DeviceAuth::X509
        }
    };
    let gateway_host_name = pairs
        .get(GATEWAY_HOST_NAME)
        .map(|g| parse_host(GATEWAY_HOST_NAME, g))
        .transpose()?;
    Ok(DeviceConnectionString {
        host_name,
        device_id: device_id.to_owned(),
        module_id: module_id.map(str::to_owned),
        auth,
        gateway_host_name,
    })
}

impl FromStr for ConnectionString {
    type Err = ConnectionStringError;

    /// Parses either form; `SharedAccessKeyName` selects the service form, `DeviceId` the
    /// device form.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let pairs = Pairs::parse(s)?;
        match (pairs.get(SHARED_ACCESS_KEY_NAME), pairs.get(DEVICE_ID)) {
            (Some(_), Some(_)) => Err(ConnectionStringError::Mixed {
                first: SHARED_ACCESS_KEY_NAME,
                second: DEVICE_ID,
                expected: "use `SharedAccessKeyName` for a service (policy) string or `DeviceId` for a device string, not both",
            }),
            (Some(_), None) => service_from_pairs(&pairs).map(ConnectionString::Service),
            (None, Some(_)) => device_from_pairs(&pairs).map(ConnectionString::Device),
            (None, None) => Err(ConnectionStringError::MissingKey {
                key: DEVICE_ID,
                expected: "give `DeviceId` for a device string or `SharedAccessKeyName` for a service (policy) string",
            }),
        }
    }
}

impl FromStr for ServiceConnectionString {
    type Err = ConnectionStringError;

    /// Parses the service form only.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let pairs = Pairs::parse(s)?;
        reject(&pairs, &[DEVICE_ID], "service", SERVICE_EXPECTED)?;
        service_from_pairs(&pairs)
    }
}

impl FromStr for DeviceConnectionString {
    type Err = ConnectionStringError;

    /// Parses the device or module form only.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        device_from_pairs(&Pairs::parse(s)?)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const DEVICE_KEY: &str = "ZGV2aWNlLWtleS0wMTIzNDU2Nzg5YWJjZGVmMDEyMw==";
    const SERVICE_KEY: &str = "c2VydmljZS1rZXktMDEyMzQ1Njc4OWFiY2RlZjAxMjM=";

    fn device(s: &str) -> DeviceConnectionString {
        match s.parse::<ConnectionString>() {
            Ok(ConnectionString::Device(d)) => d,
            other => panic!("{s}: {other:?}"),
        }
    }

    fn err(s: &str) -> String {
        match s.parse::<ConnectionString>() {
            Err(e) => e.to_string(),
            Ok(c) => panic!("{s} parsed as {c:?}"),
        }
    }

    #[test]
    fn parses_service_form_with_port() {
        let s = format!(
            "HostName=localhost:8443;SharedAccessKeyName=iothubowner;SharedAccessKey={SERVICE_KEY}"
        );
        let ConnectionString::Service(cs) = s.parse().unwrap() else {
            panic!("not a service string")
        };
        assert_eq!(cs.host_name.host(), "localhost");
        assert_eq!(cs.host_name.port(), Some(8443));
        assert_eq!(cs.host_name.port_or(443), 8443);
        assert_eq!(cs.host_name.to_string(), "localhost:8443");
        assert_eq!(cs.policy_name, "iothubowner");
        assert_eq!(cs.key.as_bytes(), b"service-key-0123456789abcdef0123");
        assert_eq!(cs.to_secret_string(), s);
        assert_eq!(
            cs.to_string(),
            "HostName=localhost:8443;SharedAccessKeyName=iothubowner;SharedAccessKey=<redacted>"
        );
        assert_eq!(s.parse::<ServiceConnectionString>().unwrap(), cs);
    }

    #[test]
    fn parses_device_forms() {
        let d = device(&format!(
            "HostName=h.azure-devices.net;DeviceId=dev1;SharedAccessKey={DEVICE_KEY}"
        ));
        assert_eq!(d.device_id, "dev1");
        assert_eq!(d.module_id, None);
        assert_eq!(d.client_id(), "dev1");
        assert_eq!(d.resource_uri(), "h.azure-devices.net/devices/dev1");
        assert_eq!(d.transport_host().host(), "h.azure-devices.net");
        assert!(matches!(d.auth, DeviceAuth::SharedAccessKey(_)));

        let m = device(&format!(
            "HostName=h;DeviceId=dev1;ModuleId=mod1;SharedAccessKey={DEVICE_KEY};GatewayHostName=localhost"
        ));
        assert_eq!(m.client_id(), "dev1/mod1");
        assert_eq!(m.resource_uri(), "h/devices/dev1/modules/mod1");
        assert_eq!(m.transport_host().host(), "localhost");

        let x = device("HostName=h;DeviceId=dev1;x509=true");
        assert_eq!(x.auth, DeviceAuth::X509);
        assert_eq!(x.to_secret_string(), "HostName=h;DeviceId=dev1;x509=true");

        let token = "SharedAccessSignature sr=h%2Fdevices%2Fdev1&sig=abc%3D&se=1795856933";
        let t = device(&format!(
            "HostName=h;DeviceId=dev1;SharedAccessSignature={token}"
        ));
        assert_eq!(t.auth, DeviceAuth::SharedAccessSignature(token.to_owned()));
        assert_eq!(
            t.to_string(),
            "HostName=h;DeviceId=dev1;SharedAccessSignature=<redacted>"
        );
        assert_eq!(
            t.to_secret_string(),
            format!("HostName=h;DeviceId=dev1;SharedAccessSignature={token}")
        );
    }

    #[test]
    fn refuses_a_key_of_padding_only() {
        // Fuzzing regression (fuzz/ connection_string): `==` decoded to an empty key.
        for key in ["=", "==", "==="] {
            for s in [
                format!("HostName=localhost;DeviceId=dev1;SharedAccessKey={key}"),
                format!("HostName=h;SharedAccessKeyName=iothubowner;SharedAccessKey={key}"),
            ] {
                assert!(
                    err(&s).contains("`SharedAccessKey` has an empty value"),
                    "{s}"
                );
            }
        }
    }

    #[test]
    fn keeps_padding_and_round_trips_secret_string() {
        let s = "HostName=h;DeviceId=d;SharedAccessKey=YWJj==";
        let d = device(s);
        let DeviceAuth::SharedAccessKey(k) = &d.auth else {
            panic!()
        };
        assert_eq!(k.as_bytes(), b"abc");
        let full = format!(
            "HostName=h;DeviceId=d;ModuleId=m;SharedAccessKey={DEVICE_KEY};GatewayHostName=gw:8883"
        );
        assert_eq!(device(&full).to_secret_string(), full);
    }

    #[test]
    fn never_shows_secrets() {
        let s = format!("HostName=h;DeviceId=d;SharedAccessKey={DEVICE_KEY}");
        let c: ConnectionString = s.parse().unwrap();
        for shown in [format!("{c}"), format!("{c:?}"), format!("{c:#?}")] {
            assert!(!shown.contains(DEVICE_KEY), "{shown}");
            assert!(!shown.contains("ZGV2aWNl"), "{shown}");
        }
        let t = "HostName=h;DeviceId=d;SharedAccessSignature=SharedAccessSignature sr=h&sig=c2VjcmV0&se=1";
        let c: ConnectionString = t.parse().unwrap();
        for shown in [format!("{c}"), format!("{c:?}")] {
            assert!(!shown.contains("c2VjcmV0"), "{shown}");
        }
        let k = SharedKey::from_bytes(b"secret".to_vec());
        assert_eq!(format!("{k} {k:?}"), "<redacted> SharedKey(<redacted>)");
    }

    #[test]
    fn error_messages_name_the_key() {
        let k = DEVICE_KEY;
        let table: &[(&str, &str)] = &[
            ("", "connection string is empty"),
            (
                "hostname=h;DeviceId=d;SharedAccessKey=YWJj",
                "connection string key `hostname` is not recognised; keys are case-sensitive: did you mean `HostName`?",
            ),
            (
                "HostName=h;DeviceId=d;Foo=bar",
                "key `Foo` is not recognised; expected one of `HostName`",
            ),
            (
                "HostName=h;DeviceId=d;X509Cert=true",
                "did you mean `x509`?",
            ),
            (
                "HostName=h;DeviceId=d",
                "missing `SharedAccessKey`; give exactly one of",
            ),
            (
                "HostName=h;DeviceId=d;SharedAccessKey=YWJj;",
                "empty pair at position 4",
            ),
            ("HostName=h;;DeviceId=d", "empty pair at position 2"),
            (
                "HostName=h;DeviceId=d;DeviceId=e;SharedAccessKey=YWJj",
                "key `DeviceId` appears more than once",
            ),
            (
                "HostName=h;DeviceId=;SharedAccessKey=YWJj",
                "key `DeviceId` has an empty value",
            ),
            ("HostName=h;DeviceId=d;SharedAccessKey", "pair 3 has no `=`"),
            ("=x;HostName=h", "pair 1 has an empty key name"),
            (
                "HostName=h;DeviceId=d;SharedAccessKey=not*base64",
                "key `SharedAccessKey` is not valid base64",
            ),
            (
                "HostName=h;DeviceId=d;SharedAccessKey=YWJj;x509=true",
                "mixes `SharedAccessKey` and `x509`",
            ),
            ("HostName=h;DeviceId=d;x509=yes", "`x509` must be `true`"),
            (
                "HostName=h;DeviceId=d;SharedAccessKeyName=p;SharedAccessKey=YWJj",
                "mixes `SharedAccessKeyName` and `DeviceId`",
            ),
            ("HostName=h;SharedAccessKey=YWJj", "missing `DeviceId`"),
            (
                "HostName=h;SharedAccessKeyName=p",
                "missing `SharedAccessKey`; a service connection string is",
            ),
            (
                "SharedAccessKeyName=p;SharedAccessKey=YWJj",
                "missing `HostName`",
            ),
            ("DeviceId=d;SharedAccessKey=YWJj", "missing `HostName`"),
            (
                "HostName=h;SharedAccessKeyName=p;SharedAccessKey=YWJj;x509=true",
                "key `x509` does not belong in a service connection string",
            ),
            (
                "HostName=h;DeviceId=d;SharedAccessSignature=sr=x",
                "`SharedAccessSignature` is not a valid sas token",
            ),
            (
                "HostName=h:99999;DeviceId=d;x509=true",
                "key `HostName` is not a valid host name",
            ),
            (
                "HostName=h;DeviceId=a+b;x509=true",
                "key `DeviceId` is not a valid id",
            ),
        ];
        for (input, want) in table {
            let got = err(input);
            assert!(got.contains(want), "{input:?}: got {got:?}, want {want:?}");
            assert!(!got.contains(k));
        }
    }

    #[test]
    fn error_sources_explain_details() {
        let e = "HostName=h;DeviceId=a+b;x509=true"
            .parse::<ConnectionString>()
            .unwrap_err();
        let ConnectionStringError::InvalidId { source, .. } = e else {
            panic!("{e:?}")
        };
        assert_eq!(
            source.to_string(),
            "device id `a+b` contains `+` at position 1; device ids allow ASCII letters, digits and -.%_*?!(),:=@$'"
        );
        let e = "HostName=h:x;DeviceId=d;x509=true"
            .parse::<ConnectionString>()
            .unwrap_err();
        let ConnectionStringError::InvalidHost { source, .. } = e else {
            panic!("{e:?}")
        };
        assert!(
            source
                .to_string()
                .contains("expected a number from 1 to 65535")
        );
    }

    #[test]
    fn validates_ids() {
        for ok in ["dev1", "a-b.c%d_e*f?g!h(i)j,k:l=m@n$o'p", &"x".repeat(128)] {
            assert_eq!(validate_device_id(ok), Ok(()), "{ok}");
        }
        assert_eq!(
            validate_device_id(""),
            Err(IdError::Empty { kind: "device" })
        );
        assert!(matches!(
            validate_device_id(&"x".repeat(129)),
            Err(IdError::TooLong { len: 129, .. })
        ));
        for bad in ["a#b", "a+b", "a b", "a/b", "dé"] {
            assert!(validate_device_id(bad).is_err(), "{bad}");
        }
        assert_eq!(validate_module_id("m+#1"), Ok(()));
        assert!(validate_module_id("m/1").is_err());
    }

    #[test]
    fn host_addr_parsing() {
        assert_eq!("h".parse::<HostAddr>().unwrap().port(), None);
        assert_eq!(HostAddr::new("h", Some(1)).unwrap().to_string(), "h:1");
        for bad in ["", ":1", "h:", "h:0", "h:+1", "h:1:2", "h h", "h/x"] {
            assert!(bad.parse::<HostAddr>().is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn parser_never_panics(s in "\\PC*") {
            let _ = s.parse::<ConnectionString>();
            let _ = s.parse::<HostAddr>();
        }

        #[test]
        fn parser_never_panics_on_near_misses(
            parts in proptest::collection::vec(
                ("(HostName|DeviceId|ModuleId|SharedAccessKey|SharedAccessKeyName|SharedAccessSignature|GatewayHostName|x509|hostname)",
                 "[A-Za-z0-9=+/:;. %]{0,12}"),
                0..6)
        ) {
            let s = parts.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(";");
            if let Ok(c) = s.parse::<ConnectionString>() {
                let again: ConnectionString = c.to_secret_string().parse().unwrap();
                proptest::prop_assert_eq!(again, c);
            }
        }
    }
}
