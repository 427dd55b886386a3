//! Scopes of API keys and service accounts.
//!
//! A scope narrows what the credential's role allows; it never widens it.
//! A credential without scopes (users, API keys created without them) can
//! do everything its role allows. The REST API checks the scope of every
//! request in one place, [`required_scope`], from the method and the path.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use axum::http::Method;

use crate::metadata::Role;

/// One permission of a scoped credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Read telemetry: queries, fleet queries, export, live streams.
    TelemetryRead,
    /// Write telemetry on behalf of devices: line protocol, HTTP by device id.
    TelemetryWrite,
    /// Read devices, profiles, dead letters, credentials and LoRaWAN settings.
    DevicesRead,
    /// Create, change and delete those.
    DevicesWrite,
    /// Send commands and LoRaWAN downlinks to devices.
    CommandsWrite,
    /// Read alarms.
    AlarmsRead,
    /// Acknowledge and clear alarms.
    AlarmsWrite,
    /// Everything else: users, API keys, service accounts, actions,
    /// compaction. Implies every other scope.
    Admin,
}

/// Every scope, in the order of the documentation.
pub const ALL_SCOPES: [Scope; 8] = [
    Scope::TelemetryRead,
    Scope::TelemetryWrite,
    Scope::DevicesRead,
    Scope::DevicesWrite,
    Scope::CommandsWrite,
    Scope::AlarmsRead,
    Scope::AlarmsWrite,
    Scope::Admin,
];

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::TelemetryRead => "telemetry:read",
            Scope::TelemetryWrite => "telemetry:write",
            Scope::DevicesRead => "devices:read",
            Scope::DevicesWrite => "devices:write",
            Scope::CommandsWrite => "commands:write",
            Scope::AlarmsRead => "alarms:read",
            Scope::AlarmsWrite => "alarms:write",
            Scope::Admin => "admin",
        }
    }
}

impl Scope {
    /// The lowest role that can use this scope; a credential's scopes must
    /// not need more than its role.
    pub fn minimum_role(self) -> Role {
        match self {
            Scope::TelemetryRead | Scope::DevicesRead | Scope::AlarmsRead => Role::Viewer,
            Scope::TelemetryWrite
            | Scope::DevicesWrite
            | Scope::CommandsWrite
            | Scope::AlarmsWrite => Role::Operator,
            Scope::Admin => Role::Admin,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        ALL_SCOPES
            .into_iter()
            .find(|scope| scope.as_str() == text)
            .ok_or_else(|| {
                let known: Vec<_> = ALL_SCOPES.iter().map(|scope| scope.as_str()).collect();
                format!(
                    "unknown scope {text:?}: expected one of {}",
                    known.join(", ")
                )
            })
    }
}

/// A set of scopes, written as a space-separated list as in OAuth 2.0
/// (RFC 6749 section 3.3).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scopes(BTreeSet<Scope>);

impl Scopes {
    /// Parses a space-separated list; an empty list is an error, because
    /// a credential that may do nothing is a mistake.
    pub fn parse(text: &str) -> Result<Self, String> {
        let scopes = text
            .split_ascii_whitespace()
            .map(Scope::from_str)
            .collect::<Result<BTreeSet<_>, _>>()?;
        if scopes.is_empty() {
            return Err("the scope list is empty: give at least one scope, or leave scopes out for everything the role allows".to_owned());
        }
        Ok(Self(scopes))
    }

    /// Parses a JSON list of scope names.
    pub fn from_list(list: &[String]) -> Result<Self, String> {
        Self::parse(&list.join(" "))
    }

    /// Returns whether these scopes allow `scope`; `admin` allows all.
    pub fn allows(&self, scope: Scope) -> bool {
        self.0.contains(&Scope::Admin) || self.0.contains(&scope)
    }

    /// Returns whether every scope of `other` is allowed by these.
    pub fn covers(&self, other: &Scopes) -> bool {
        other.0.iter().all(|scope| self.allows(*scope))
    }

    /// Fails with a sentence naming the first scope that `role` cannot use.
    pub fn check_role(&self, role: Role) -> Result<(), String> {
        match self.0.iter().find(|scope| scope.minimum_role() > role) {
            Some(scope) => Err(format!(
                "the scope {scope} needs at least the {} role, but the role is {role}",
                scope.minimum_role()
            )),
            None => Ok(()),
        }
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.0.iter().map(|scope| scope.as_str()).collect()
    }
}

impl fmt::Display for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.names().join(" "))
    }
}

/// Returns the scope that a REST API request needs, from its method and
/// path, or `None` for the endpoints every credential may call (the
/// caller's own identity under `/api/v1/auth/`). Paths not listed need
/// `admin`, so a new endpoint is closed to scoped credentials until it is
/// listed here.
pub fn required_scope(method: &Method, path: &str) -> Option<Scope> {
    let read = method == Method::GET || method == Method::HEAD;
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    // ["", "api", "v1", first, ...]
    let first = segments.get(3).copied().unwrap_or("");
    let third = segments.get(5).copied().unwrap_or("");
    let scope = match first {
        "auth" => return None,
        "telemetry" | "export" | "live" => Scope::TelemetryRead,
        "devices" if third == "telemetry" => {
            if read {
                Scope::TelemetryRead
            } else {
                Scope::TelemetryWrite
            }
        }
        "devices" if third == "commands" => Scope::CommandsWrite,
        "devices" if third == "lorawan" && segments.get(6) == Some(&"downlinks") && !read => {
            Scope::CommandsWrite
        }
        "alarms" if read => Scope::AlarmsRead,
        "alarms" => Scope::AlarmsWrite,
        "devices" | "profiles" | "dead-letters" | "lorawan" if read => Scope::DevicesRead,
        "devices" | "profiles" | "dead-letters" | "lorawan" => Scope::DevicesWrite,
        _ => Scope::Admin,
    };
    Some(scope)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_and_reject_unknown_names() {
        let scopes = Scopes::parse("devices:read telemetry:read").unwrap();
        assert!(scopes.allows(Scope::DevicesRead));
        assert!(!scopes.allows(Scope::DevicesWrite));
        assert!(
            Scopes::parse("devices:delete")
                .unwrap_err()
                .contains("devices:delete")
        );
        assert!(Scopes::parse("  ").is_err());
    }

    #[test]
    fn admin_scope_allows_everything() {
        let scopes = Scopes::parse("admin").unwrap();
        assert!(ALL_SCOPES.iter().all(|scope| scopes.allows(*scope)));
    }

    #[test]
    fn paths_map_to_scopes() {
        let cases = [
            (Method::GET, "/api/v1/devices", Some(Scope::DevicesRead)),
            (Method::POST, "/api/v1/devices", Some(Scope::DevicesWrite)),
            (
                Method::GET,
                "/api/v1/devices/x/telemetry",
                Some(Scope::TelemetryRead),
            ),
            (
                Method::GET,
                "/api/v1/devices/x/telemetry/latest",
                Some(Scope::TelemetryRead),
            ),
            (
                Method::POST,
                "/api/v1/devices/x/telemetry",
                Some(Scope::TelemetryWrite),
            ),
            (
                Method::POST,
                "/api/v1/devices/x/commands",
                Some(Scope::CommandsWrite),
            ),
            (
                Method::POST,
                "/api/v1/devices/x/lorawan/downlinks",
                Some(Scope::CommandsWrite),
            ),
            (
                Method::GET,
                "/api/v1/devices/x/lorawan/downlinks",
                Some(Scope::DevicesRead),
            ),
            (
                Method::GET,
                "/api/v1/telemetry/latest",
                Some(Scope::TelemetryRead),
            ),
            (Method::GET, "/api/v1/live/sse", Some(Scope::TelemetryRead)),
            (
                Method::POST,
                "/api/v1/alarms/x/ack",
                Some(Scope::AlarmsWrite),
            ),
            (Method::GET, "/api/v1/alarms", Some(Scope::AlarmsRead)),
            (Method::GET, "/api/v1/api-keys", Some(Scope::Admin)),
            (Method::GET, "/api/v1/users", Some(Scope::Admin)),
            (Method::GET, "/api/v1/auth/me", None),
        ];
        for (method, path, expected) in cases {
            assert_eq!(required_scope(&method, path), expected, "{method} {path}");
        }
    }
}
