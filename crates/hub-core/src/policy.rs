//! Shared access policies and their permissions as a typed set (reference §2.3): the four
//! IoT Hub permissions, the five default policies, and what a device-key token grants.

use std::fmt;
use std::ops::{BitOr, BitOrAssign};
use std::str::FromStr;

/// One IoT Hub permission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Permission {
    /// Read the identity registry.
    RegistryRead,
    /// Write the identity registry.
    RegistryWrite,
    /// Service endpoints: twins, queries, C2D, methods, jobs.
    ServiceConnect,
    /// Device endpoints: D2C, C2D receive, twin notifications.
    DeviceConnect,
}

impl Permission {
    /// Every permission, in IoT Hub's order.
    pub const ALL: [Permission; 4] = [
        Permission::RegistryRead,
        Permission::RegistryWrite,
        Permission::ServiceConnect,
        Permission::DeviceConnect,
    ];

    /// The name as IoT Hub spells it (`RegistryRead`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::RegistryRead => "RegistryRead",
            Permission::RegistryWrite => "RegistryWrite",
            Permission::ServiceConnect => "ServiceConnect",
            Permission::DeviceConnect => "DeviceConnect",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A permission name that is not one of IoT Hub's four.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "permission `{name}` is not recognised; expected RegistryRead, RegistryWrite, ServiceConnect or DeviceConnect"
)]
pub struct PermissionError {
    /// The name as given.
    pub name: String,
}

impl FromStr for Permission {
    type Err = PermissionError;

    /// Parses a permission name, ignoring ASCII case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Permission::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| PermissionError {
                name: s.trim().to_owned(),
            })
    }
}

/// A set of permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Permissions(u8);

impl Permissions {
    /// No permissions.
    pub const NONE: Permissions = Permissions(0);
    /// All four permissions (what `iothubowner` has).
    pub const ALL: Permissions = Permissions(0b1111);

    /// Whether `permission` is in the set.
    pub fn contains(self, permission: Permission) -> bool {
        self.0 & permission.bit() != 0
    }

    /// Whether every permission of `other` is in the set.
    pub fn contains_all(self, other: Permissions) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The permissions in the set, in IoT Hub's order.
    pub fn iter(self) -> impl Iterator<Item = Permission> {
        Permission::ALL
            .into_iter()
            .filter(move |p| self.contains(*p))
    }
}

impl From<Permission> for Permissions {
    fn from(p: Permission) -> Self {
        Permissions(p.bit())
    }
}

impl FromIterator<Permission> for Permissions {
    fn from_iter<I: IntoIterator<Item = Permission>>(iter: I) -> Self {
        iter.into_iter().fold(Permissions::NONE, |acc, p| acc | p)
    }
}

impl<T: Into<Permissions>> BitOr<T> for Permissions {
    type Output = Permissions;
    fn bitor(self, rhs: T) -> Permissions {
        Permissions(self.0 | rhs.into().0)
    }
}

impl<T: Into<Permissions>> BitOr<T> for Permission {
    type Output = Permissions;
    fn bitor(self, rhs: T) -> Permissions {
        Permissions::from(self) | rhs
    }
}

impl<T: Into<Permissions>> BitOrAssign<T> for Permissions {
    fn bitor_assign(&mut self, rhs: T) {
        self.0 |= rhs.into().0;
    }
}

impl fmt::Display for Permissions {
    /// Comma-separated names as in IoT Hub's `rights` field, e.g.
    /// `RegistryRead, RegistryWrite`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(p.as_str())?;
        }
        Ok(())
    }
}

impl FromStr for Permissions {
    type Err = PermissionError;

    /// Parses comma-separated names (`RegistryRead, ServiceConnect`); empty means none.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.split(',')
            .filter(|p| !p.trim().is_empty())
            .map(str::parse::<Permission>)
            .collect()
    }
}

/// A shared access policy: a name (the token's `skn`) and what it grants.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Policy {
    /// The policy name, e.g. `iothubowner`.
    pub name: String,
    /// What tokens signed with this policy's key may do.
    pub permissions: Permissions,
}

impl Policy {
    /// The five policies every IoT Hub starts with.
    pub fn defaults() -> Vec<Policy> {
        DefaultPolicy::ALL.into_iter().map(Policy::from).collect()
    }
}

impl From<DefaultPolicy> for Policy {
    fn from(p: DefaultPolicy) -> Self {
        Policy {
            name: p.name().to_owned(),
            permissions: p.permissions(),
        }
    }
}

/// What a device-key token (no `skn`) grants: DeviceConnect for that device only.
pub const DEVICE_TOKEN_PERMISSIONS: Permissions = Permissions(1 << 3);

/// IoT Hub's default shared access policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DefaultPolicy {
    /// `iothubowner`: all permissions.
    IotHubOwner,
    /// `service`: ServiceConnect.
    Service,
    /// `device`: DeviceConnect.
    Device,
    /// `registryRead`: RegistryRead.
    RegistryRead,
    /// `registryReadWrite`: RegistryRead and RegistryWrite.
    RegistryReadWrite,
}

impl DefaultPolicy {
    /// All five, in the portal's order.
    pub const ALL: [DefaultPolicy; 5] = [
        DefaultPolicy::IotHubOwner,
        DefaultPolicy::Service,
        DefaultPolicy::Device,
        DefaultPolicy::RegistryRead,
        DefaultPolicy::RegistryReadWrite,
    ];

    /// The policy name (`skn`).
    pub fn name(self) -> &'static str {
        match self {
            DefaultPolicy::IotHubOwner => "iothubowner",
            DefaultPolicy::Service => "service",
            DefaultPolicy::Device => "device",
            DefaultPolicy::RegistryRead => "registryRead",
            DefaultPolicy::RegistryReadWrite => "registryReadWrite",
        }
    }

    /// What the policy grants.
    pub fn permissions(self) -> Permissions {
        match self {
            DefaultPolicy::IotHubOwner => Permissions::ALL,
            DefaultPolicy::Service => Permission::ServiceConnect.into(),
            DefaultPolicy::Device => Permission::DeviceConnect.into(),
            DefaultPolicy::RegistryRead => Permission::RegistryRead.into(),
            DefaultPolicy::RegistryReadWrite => {
                Permission::RegistryRead | Permission::RegistryWrite
            }
        }
    }

    /// The default policy with this exact (case-sensitive) name, if any.
    pub fn from_name(name: &str) -> Option<DefaultPolicy> {
        DefaultPolicy::ALL.into_iter().find(|p| p.name() == name)
    }
}

impl fmt::Display for DefaultPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use Permission::*;

    #[test]
    fn default_policies_match_reference_table() {
        let table = [
            (
                "iothubowner",
                RegistryRead | RegistryWrite | ServiceConnect | DeviceConnect,
            ),
            ("service", ServiceConnect.into()),
            ("device", DeviceConnect.into()),
            ("registryRead", RegistryRead.into()),
            ("registryReadWrite", RegistryRead | RegistryWrite),
        ];
        let defaults = Policy::defaults();
        assert_eq!(defaults.len(), table.len());
        for (policy, (name, perms)) in defaults.iter().zip(table) {
            assert_eq!(policy.name, name);
            assert_eq!(policy.permissions, perms, "{name}");
            assert_eq!(
                DefaultPolicy::from_name(name).map(Policy::from).as_ref(),
                Some(policy)
            );
        }
        assert_eq!(DefaultPolicy::from_name("IotHubOwner"), None);
        assert_eq!(DEVICE_TOKEN_PERMISSIONS, Permissions::from(DeviceConnect));
    }

    #[test]
    fn set_operations() {
        let mut p = Permissions::NONE;
        assert!(p.is_empty());
        p |= ServiceConnect;
        assert!(p.contains(ServiceConnect));
        assert!(!p.contains(DeviceConnect));
        assert!(Permissions::ALL.contains_all(p));
        assert!(!p.contains_all(Permissions::ALL));
        assert_eq!(p.iter().collect::<Vec<_>>(), vec![ServiceConnect]);
        assert_eq!(
            [RegistryRead, DeviceConnect]
                .into_iter()
                .collect::<Permissions>(),
            RegistryRead | DeviceConnect
        );
    }

    #[test]
    fn display_and_parse() {
        assert_eq!(
            Permissions::ALL.to_string(),
            "RegistryRead, RegistryWrite, ServiceConnect, DeviceConnect"
        );
        assert_eq!(Permissions::NONE.to_string(), "");
        assert_eq!(
            "registryread,ServiceConnect".parse(),
            Ok(RegistryRead | ServiceConnect)
        );
        assert_eq!("".parse(), Ok(Permissions::NONE));
        let e = "RegistryRead, Admin".parse::<Permissions>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "permission `Admin` is not recognised; expected RegistryRead, RegistryWrite, ServiceConnect or DeviceConnect"
        );
        for p in (0..16u8).map(Permissions) {
            assert_eq!(p.to_string().parse(), Ok(p));
        }
    }

    proptest::proptest! {
        #[test]
        fn parser_never_panics(s in "\\PC*") {
            let _ = s.parse::<Permissions>();
            let _ = s.parse::<Permission>();
        }
    }
}
