//! Typed identifiers. Every id is a UUID in its own type so that a device id
//! cannot be passed where a tenant id belongs.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        // Not every id type uses every constructor.
        #[allow(dead_code)]
        impl $name {
            pub fn new_random() -> Self {
                Self(Uuid::new_v4())
            }

            pub fn as_bytes(&self) -> &[u8; 16] {
                self.0.as_bytes()
            }

            pub fn from_bytes(bytes: [u8; 16]) -> Self {
                Self(Uuid::from_bytes(bytes))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

uuid_id!(
    /// An isolated organization; every device, user and series belongs to one.
    TenantId
);
uuid_id!(
    /// A device that sends telemetry.
    DeviceId
);
uuid_id!(
    /// A person who logs in to the API.
    UserId
);
uuid_id!(
    /// An API key for scripts and services.
    ApiKeyId
);
uuid_id!(
    /// A device profile: codec, key schema, transformations and rules
    /// shared by a kind of device.
    ProfileId
);
uuid_id!(
    /// One alarm: a rule's condition on one device, from raised to cleared.
    AlarmId
);
uuid_id!(
    /// A service that gets access tokens with the OAuth 2.0 client
    /// credentials grant.
    ServiceAccountId
);
