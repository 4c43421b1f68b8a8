//! Who may do what: the hub's shared access policies with their keys ([`PolicyKeys`]), the
//! checks of a service request's SAS token against a policy and permission, and of a device's
//! or module's MQTT CONNECT (client id, username, SAS signed with the identity's key or a
//! policy's).

use std::fmt;

use serde::{Deserialize, Serialize};

use hub_core::policy::{Permission, Permissions, Policy};
use hub_core::sas::SasToken;

use super::modules::split_key;
use super::record::{DeviceRecord, random_key};
use super::{AuthError, Hub, OperationError, lock};

/// Clock skew tolerated on SAS expiry.
pub const SAS_SKEW_SECS: u64 = 300;

/// A shared access policy and its keys (`Debug` leaves the keys out).
#[derive(Clone, Serialize, Deserialize)]
pub struct PolicyKeys {
    /// Policy name (`iothubowner`, `service`, ...).
    pub name: String,
    /// Base64 primary key.
    pub primary_key: String,
    /// Base64 secondary key.
    pub secondary_key: String,
}

impl std::fmt::Debug for PolicyKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyKeys")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The hub's policies with their permissions: loaded from the store, or made with fresh keys for
/// a new hub (and saved).
pub(super) fn load_policies(
    store: &crate::store::Store,
) -> Result<Vec<(PolicyKeys, Permissions)>, OperationError> {
    let policies: Vec<PolicyKeys> = match store.meta("policies")? {
        Some(text) => serde_json::from_str(&text).map_err(|e| {
            OperationError::Unreadable(format!("the hub store's policy record is unreadable: {e}"))
        })?,
        None => {
            let fresh: Vec<PolicyKeys> = Policy::defaults()
                .iter()
                .map(|p| PolicyKeys {
                    name: p.name.to_string(),
                    primary_key: random_key(),
                    secondary_key: random_key(),
                })
                .collect();
            let text = serde_json::to_string(&fresh)
                .map_err(|e| OperationError::Internal(e.to_string()))?;
            store.write(&[crate::store::Write::PutMeta {
                key: "policies".into(),
                value: text,
            }])?;
            fresh
        }
    };
    let defaults = Policy::defaults();
    Ok(policies
        .into_iter()
        .map(|keys| {
            let permissions = defaults
                .iter()
                .find(|p| p.name == keys.name)
                .map(|p| p.permissions)
                .unwrap_or_default();
            (keys, permissions)
        })
        .collect())
}

impl Hub {
    /// The keys of a policy, for writing connection strings.
    pub fn policy_keys(&self, name: &str) -> Option<PolicyKeys> {
        self.inner
            .policies
            .iter()
            .find(|(k, _)| k.name == name)
            .map(|(k, _)| k.clone())
    }

    /// What a policy grants (the dashboard acts as one).
    pub fn policy_permissions(&self, name: &str) -> Option<Permissions> {
        self.inner
            .policies
            .iter()
            .find(|(k, _)| k.name == name)
            .map(|(_, permissions)| *permissions)
    }

    /// A device's primary key (for writing its connection string).
    pub fn device_primary_key(&self, id: &str) -> Option<String> {
        lock(&self.inner.state)
            .devices
            .get(id)
            .and_then(|d| d.primary_key.clone())
    }

    fn audience_ok(&self, token: &SasToken, path: &str) -> bool {
        self.inner
            .host_names
            .iter()
            .any(|host| token.covers(host, path))
    }

    /// Checks a service request's `Authorization` header and that its policy grants `needed`.
    pub fn authorize_service(
        &self,
        header: &str,
        needed: Permission,
        now_unix: u64,
    ) -> Result<(), AuthError> {
        let permissions = self.authenticate_service(header, now_unix)?;
        if !permissions.contains(needed) {
            return Err(AuthError::MissingPermission(needed));
        }
        Ok(())
    }

    /// Checks a service request's `Authorization` header (a policy token for this hub, signed
    /// with the policy's key, not expired) and returns what the policy grants.
    pub fn authenticate_service(
        &self,
        header: &str,
        now_unix: u64,
    ) -> Result<Permissions, AuthError> {
        let token = SasToken::parse(header).map_err(|e| AuthError::Malformed(e.to_string()))?;
        token
            .check_expiry(now_unix, SAS_SKEW_SECS)
            .map_err(|e| AuthError::Refused(e.to_string()))?;
        let Some(policy_name) = token.key_name.as_deref() else {
            return Err(AuthError::Refused(
                "a device token cannot call service APIs; use a shared access policy (skn)".into(),
            ));
        };
        let Some((keys, permissions)) = self
            .inner
            .policies
            .iter()
            .find(|(k, _)| k.name == policy_name)
        else {
            return Err(AuthError::Refused(format!(
                "unknown shared access policy `{policy_name}`"
            )));
        };
        self.verify_with_keys(&token, &keys.primary_key, &keys.secondary_key)?;
        if !self.audience_ok(&token, "") {
            return Err(AuthError::Refused(format!(
                "the token's audience `{}` is not this hub ({})",
                token.resource,
                self.host_name()
            )));
        }
        Ok(*permissions)
    }

    fn verify_with_keys(
        &self,
        token: &SasToken,
        primary: &str,
        secondary: &str,
    ) -> Result<(), AuthError> {
        for key in [primary, secondary] {
            // A device without symmetric keys (X.509, `none`) has empty ones here: an HMAC with
            // an empty key is one anybody can compute, so it must never authenticate.
            if let Ok(key) = hub_core::connection_string::SharedKey::from_base64(key)
                && !key.as_bytes().is_empty()
                && token.verify_signature(&key).is_ok()
            {
                return Ok(());
            }
        }
        Err(AuthError::Refused(
            "the signature does not match the key".into(),
        ))
    }

    /// Authenticates an MQTT CONNECT: client id, username and SAS password. The client id is
    /// `{deviceId}` for a device and `{deviceId}/{moduleId}` for a module, whose username is
    /// `{host}/{deviceId}/{moduleId}/?api-version=...` and whose token's audience is
    /// `{host}/devices/{deviceId}/modules/{moduleId}`, signed with the module's own key
    /// ([DOCS mqtt] "Using the MQTT protocol directly (as a module)"; reference §2.2, §7.3).
    /// The grant it returns is checked again when the session registers
    /// ([`Hub::attach_session`]), so an identity disabled, deleted or given new keys in between
    /// does not get a session.
    pub fn authenticate_device(
        &self,
        client_id: &str,
        username: &str,
        password: &str,
        now_unix: u64,
    ) -> Result<DeviceGrant, AuthError> {
        let (device_id, module_id) = split_key(client_id);
        // Username is `{host}/{clientId}/?api-version=...`; any api-version is accepted.
        let expected_user = client_id;
        let user_identity = username
            .split_once('/')
            .and_then(|(_host, rest)| rest.split_once("/?").map(|(id, _)| id).or(Some(rest)))
            .map(|id| id.trim_end_matches('/'));
        if user_identity != Some(expected_user) {
            return Err(AuthError::Refused(format!(
                "the MQTT username must be `{{host}}/{expected_user}/?api-version=...`"
            )));
        }
        let token = SasToken::parse(password).map_err(|e| AuthError::Malformed(e.to_string()))?;
        token
            .check_expiry(now_unix, SAS_SKEW_SECS)
            .map_err(|e| AuthError::Refused(e.to_string()))?;
        let path = match module_id {
            Some(module_id) => format!("devices/{device_id}/modules/{module_id}"),
            None => format!("devices/{device_id}"),
        };
        if !self.audience_ok(&token, &path) {
            return Err(AuthError::Refused(format!(
                "the token's audience `{}` does not cover {}/{path}",
                token.resource,
                self.host_name()
            )));
        }
        // The audience is a segment prefix ("URI prefix (by segment) of the endpoints that can be
        // accessed with this token"), but "SAS tokens granted to devices must be scoped to an
        // individual device; for example, `myHub.azure-devices.net/devices/device1`", and "a
        // token signed with a device identity's symmetric key only grants the DeviceConnect
        // permission for the associated device identity" (Microsoft Learn, "Control access to
        // IoT Hub with shared access signatures", SAS token structure / Generate SAS tokens).
        // So a device-key token (no `skn`) scoped to the hub root or to `{hub}/devices` is
        // refused. A policy token keeps the prefix rule: "A protocol gateway could use the same
        // token for all devices simply setting the resource URI to `myhub.azure-devices.net/devices`"
        // (same page, "Use a shared access policy to access on behalf of a device").
        // A module's key-signed token must name the module, not only its device: the module
        // is an identity of its own, with its own keys.
        let too_broad = match module_id {
            Some(_) => self.audience_ok(&token, &format!("devices/{device_id}/modules")),
            None => self.audience_ok(&token, "devices"),
        };
        if token.key_name.is_none() && too_broad {
            return Err(AuthError::Refused(format!(
                "a token signed with an identity's key must be scoped to {}/{path}, not `{}`",
                self.host_name(),
                token.resource
            )));
        }
        let (primary, secondary, enabled) = {
            let state = lock(&self.inner.state);
            let Some(device) = state.devices.get(device_id) else {
                return Err(AuthError::Refused(format!(
                    "device {device_id} is not registered"
                )));
            };
            let enabled = device.status == "enabled";
            match module_id {
                None => (
                    device.primary_key.clone(),
                    device.secondary_key.clone(),
                    enabled,
                ),
                Some(module_id) => {
                    let Some(module) = device.modules.get(module_id) else {
                        return Err(AuthError::Refused(format!(
                            "module {module_id} of device {device_id} is not registered"
                        )));
                    };
                    (
                        module.primary_key.clone(),
                        module.secondary_key.clone(),
                        enabled,
                    )
                }
            }
        };
        let credential = match token.key_name.as_deref() {
            Some(policy) => {
                let Some((keys, permissions)) =
                    self.inner.policies.iter().find(|(k, _)| k.name == policy)
                else {
                    return Err(AuthError::Refused(format!(
                        "unknown shared access policy `{policy}`"
                    )));
                };
                self.verify_with_keys(&token, &keys.primary_key, &keys.secondary_key)?;
                if !permissions.contains(Permission::DeviceConnect) {
                    return Err(AuthError::MissingPermission(Permission::DeviceConnect));
                }
                Credential::Policy
            }
            None => {
                self.verify_with_keys(
                    &token,
                    primary.as_deref().unwrap_or_default(),
                    secondary.as_deref().unwrap_or_default(),
                )?;
                Credential::DeviceKeys { primary, secondary }
            }
        };
        if !enabled {
            return Err(AuthError::DeviceDisabled(device_id.to_owned()));
        }
        Ok(DeviceGrant {
            expiry: Some(token.expiry),
            credential,
        })
    }
}

/// What authenticated a device or module connection, kept until its session is registered.
pub struct DeviceGrant {
    /// When the token expires (Unix seconds); `None` for sessions made by tests.
    pub(super) expiry: Option<u64>,
    credential: Credential,
}

enum Credential {
    /// A shared access policy with DeviceConnect (policies do not change while the hub runs).
    Policy,
    /// The identity's own keys (the device's, or the module's) as they were when the token
    /// was verified.
    DeviceKeys {
        primary: Option<String>,
        secondary: Option<String>,
    },
    /// A session opened by a unit test, with no token.
    #[cfg(test)]
    Test,
}

impl DeviceGrant {
    /// When the token expires (Unix seconds), if it does.
    pub fn expiry(&self) -> Option<u64> {
        self.expiry
    }

    /// A grant for in-crate tests: no token, no expiry, still refused for a missing or
    /// disabled device.
    #[cfg(test)]
    pub(crate) fn for_tests() -> DeviceGrant {
        DeviceGrant {
            expiry: None,
            credential: Credential::Test,
        }
    }

    /// Whether `device` still admits this grant: registered, enabled and, for a device-key
    /// token, with the keys that verified it. Called under the state lock by
    /// [`Hub::attach_session`], the same lock a registry change is applied under before it closes
    /// the device's sessions, so either the change sees the new session and closes it, or the
    /// session sees the change and is refused.
    pub(super) fn still_valid(
        &self,
        key: &str,
        device: Option<&DeviceRecord>,
    ) -> Result<(), AuthError> {
        let (device_id, module_id) = split_key(key);
        let Some(device) = device else {
            return Err(AuthError::Refused(format!(
                "device {device_id} was deleted while it connected"
            )));
        };
        if device.status != "enabled" {
            return Err(AuthError::DeviceDisabled(device_id.to_owned()));
        }
        let (primary, secondary) = match module_id {
            None => (&device.primary_key, &device.secondary_key),
            Some(module_id) => match device.modules.get(module_id) {
                Some(module) => (&module.primary_key, &module.secondary_key),
                None => {
                    return Err(AuthError::Refused(format!(
                        "module {key} was deleted while it connected"
                    )));
                }
            },
        };
        match &self.credential {
            Credential::DeviceKeys {
                primary: was_primary,
                secondary: was_secondary,
            } if was_primary != primary || was_secondary != secondary => Err(AuthError::Refused(
                format!("the keys of {key} changed while it connected"),
            )),
            _ => Ok(()),
        }
    }
}

// Keys are secrets: never printed.
impl fmt::Debug for DeviceGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceGrant")
            .field("expiry", &self.expiry)
            .finish_non_exhaustive()
    }
}
