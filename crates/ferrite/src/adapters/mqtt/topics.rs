//! Authorization of topics: which topics a device may publish to and which
//! filters it may subscribe to.
//!
//! A device owns two spellings of the same namespace:
//! - `v1/devices/me/...`, ThingsBoard's convention, so existing firmware and
//!   `tb-mqtt-client` work unchanged;
//! - `devices/{device id}/...` with its own id.
//!
//! Both spellings name the same topic: the router works on the part after
//! the prefix (the suffix) and delivers with the prefix that the subscriber
//! used. Everything outside the namespace is rejected. Only the suffix
//! `telemetry` is stored in the ingest log for now.

use crate::ids::DeviceId;

/// Prefix of ThingsBoard's device topics; `me` is the connected device.
const ME_PREFIX: &str = "v1/devices/me/";
/// First level of the topics that name a device by its id.
const BY_ID_FIRST_LEVEL: &str = "devices/";
/// The suffix of the telemetry topic in both spellings.
pub const TELEMETRY_SUFFIX: &str = "telemetry";
/// The suffix of the topic on which a device publishes its attributes,
/// which the tenant's applications also receive.
pub const ATTRIBUTES_SUFFIX: &str = "attributes";

/// Target of a PUBLISH topic, seen from the device that sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishTarget<'a> {
    /// `v1/devices/me/telemetry` or `devices/{own id}/telemetry`.
    Telemetry,
    /// Another topic in the device's namespace, such as
    /// `v1/devices/me/attributes`; `suffix` is the part after the prefix.
    OwnTopic { suffix: &'a str },
    /// A topic outside the device's namespace.
    Forbidden,
}

/// A subscription filter accepted for a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizedFilter {
    /// Length of the namespace prefix in the filter, so that deliveries use
    /// the spelling the subscriber chose.
    pub prefix_len: usize,
    /// The filter after the prefix, matched against topic suffixes.
    pub suffix_filter: String,
}

/// Reason a subscription filter is rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterRejection {
    /// The filter breaks the wildcard rules of the MQTT specification.
    Invalid,
    /// `$share/...` where a plain filter is expected, such as inside a
    /// shared subscription's filter.
    Shared,
    /// The filter reaches outside the device's namespace.
    NotAuthorized,
}

/// Prefix of a shared subscription filter, `$share/{ShareName}/{filter}`.
pub const SHARE_PREFIX: &str = "$share/";

/// A shared subscription filter split into its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedFilter<'a> {
    pub share_name: &'a str,
    /// The topic filter after the ShareName.
    pub filter: &'a str,
    /// Bytes before `filter`: `$share/`, the ShareName and `/`.
    pub prefix_len: usize,
}

/// Splits `$share/{ShareName}/{filter}`. Returns `Ok(None)` for a filter
/// that is not shared, and `Err` when the ShareName is empty, contains
/// `+` or `#`, or is not followed by `/` and a filter ([MQTT-4.8.2-1],
/// [MQTT-4.8.2-2]).
pub fn split_shared(filter: &str) -> Result<Option<SharedFilter<'_>>, FilterRejection> {
    let Some(rest) = filter.strip_prefix(SHARE_PREFIX) else {
        return Ok(None);
    };
    let Some((share_name, inner)) = rest.split_once('/') else {
        return Err(FilterRejection::Invalid);
    };
    if share_name.is_empty() || share_name.contains(['+', '#']) || inner.is_empty() {
        return Err(FilterRejection::Invalid);
    }
    Ok(Some(SharedFilter {
        share_name,
        filter: inner,
        prefix_len: filter.len() - inner.len(),
    }))
}

/// Splits `topic` into its namespace prefix length and suffix when it lies
/// in the namespace of `device_id`.
fn own_suffix(topic: &str, device_id: DeviceId) -> Option<(usize, &str)> {
    if let Some(suffix) = topic.strip_prefix(ME_PREFIX) {
        return (!suffix.is_empty()).then_some((ME_PREFIX.len(), suffix));
    }

    let rest = topic.strip_prefix(BY_ID_FIRST_LEVEL)?;
    let (id, suffix) = rest.split_once('/')?;
    // Parsing (rather than comparing text) accepts every spelling of the
    // same UUID, such as upper case.
    let id: DeviceId = id.parse().ok()?;
    if id != device_id || suffix.is_empty() {
        return None;
    }
    Some((topic.len() - suffix.len(), suffix))
}

/// Classifies a PUBLISH topic name sent by `device_id`. The caller has
/// already checked that the name is valid (non-empty, no wildcards).
pub fn classify_publish(topic: &str, device_id: DeviceId) -> PublishTarget<'_> {
    match own_suffix(topic, device_id) {
        Some((_, TELEMETRY_SUFFIX)) => PublishTarget::Telemetry,
        Some((_, suffix)) => PublishTarget::OwnTopic { suffix },
        None => PublishTarget::Forbidden,
    }
}

/// Returns whether `topic` is a valid PUBLISH topic name: non-empty and
/// free of wildcards and U+0000 ([MQTT-3.3.2-2], [MQTT-4.7.3-1],
/// [MQTT-4.7.3-2]).
pub fn is_valid_topic_name(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// Returns whether `filter` follows the wildcard rules: `+` and `#` fill a
/// whole level and `#` comes last ([MQTT-4.7.1-2], [MQTT-4.7.1-3]).
pub fn is_valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let is_last = levels.peek().is_none();
        if level.contains('#') && (level != "#" || !is_last) {
            return false;
        }
        if level.contains('+') && level != "+" {
            return false;
        }
    }
    true
}

/// Checks a SUBSCRIBE filter of `device_id`: it must be valid and begin
/// with `v1/devices/me/` or `devices/{own id}/`; wildcards may follow.
pub fn authorize_filter(
    filter: &str,
    device_id: DeviceId,
) -> Result<AuthorizedFilter, FilterRejection> {
    if filter.starts_with("$share/") {
        return Err(FilterRejection::Shared);
    }
    if !is_valid_filter(filter) {
        return Err(FilterRejection::Invalid);
    }

    // A wildcard in the id level (`devices/+/...`) fails to parse as a
    // device id, so it is rejected like any other device's id.
    let (prefix_len, suffix_filter) =
        own_suffix(filter, device_id).ok_or(FilterRejection::NotAuthorized)?;
    Ok(AuthorizedFilter {
        prefix_len,
        suffix_filter: suffix_filter.to_owned(),
    })
}

/// Returns whether a topic suffix matches a filter suffix, with the MQTT
/// wildcard rules: `+` matches one level, a trailing `#` matches the
/// parent level and every level below it.
pub fn suffix_matches(suffix_filter: &str, suffix: &str) -> bool {
    let mut filter_levels = suffix_filter.split('/');
    let mut topic_levels = suffix.split('/');
    loop {
        match (filter_levels.next(), topic_levels.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(filter), Some(topic)) if filter == topic => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: &str = "0191e0a4-5c3b-7f1e-9a2b-3c4d5e6f7a8b";
    const OTHER: &str = "0191e0a4-5c3b-7f1e-9a2b-000000000000";

    fn own_id() -> DeviceId {
        OWN.parse().expect("valid uuid")
    }

    #[test]
    fn publish_topics_are_classified() {
        let cases: &[(String, PublishTarget<'_>)] = &[
            ("v1/devices/me/telemetry".into(), PublishTarget::Telemetry),
            (format!("devices/{OWN}/telemetry"), PublishTarget::Telemetry),
            (
                format!("devices/{}/telemetry", OWN.to_uppercase()),
                PublishTarget::Telemetry,
            ),
            (
                "v1/devices/me/attributes".into(),
                PublishTarget::OwnTopic {
                    suffix: "attributes",
                },
            ),
            (
                "v1/devices/me/rpc/request/1".into(),
                PublishTarget::OwnTopic {
                    suffix: "rpc/request/1",
                },
            ),
            (
                format!("devices/{OWN}/attributes"),
                PublishTarget::OwnTopic {
                    suffix: "attributes",
                },
            ),
            (
                "v1/devices/me/telemetry/extra".into(),
                PublishTarget::OwnTopic {
                    suffix: "telemetry/extra",
                },
            ),
            (
                format!("devices/{OTHER}/telemetry"),
                PublishTarget::Forbidden,
            ),
            (
                "v1/devices/other/telemetry".into(),
                PublishTarget::Forbidden,
            ),
            ("v1/devices/me/".into(), PublishTarget::Forbidden),
            ("v1/devices/me".into(), PublishTarget::Forbidden),
            (format!("devices/{OWN}/"), PublishTarget::Forbidden),
            (format!("devices/{OWN}"), PublishTarget::Forbidden),
            (
                "devices/not-a-uuid/telemetry".into(),
                PublishTarget::Forbidden,
            ),
            ("telemetry".into(), PublishTarget::Forbidden),
            ("/v1/devices/me/telemetry".into(), PublishTarget::Forbidden),
            ("V1/devices/me/telemetry".into(), PublishTarget::Forbidden),
            ("v1/gateway/telemetry".into(), PublishTarget::Forbidden),
        ];
        for (topic, expected) in cases {
            assert_eq!(
                classify_publish(topic, own_id()),
                *expected,
                "topic {topic:?}"
            );
        }
    }

    #[test]
    fn subscription_filters_are_authorized() {
        let me_len = ME_PREFIX.len();
        let id_len = BY_ID_FIRST_LEVEL.len() + OWN.len() + 1;
        let accepted: &[(String, usize, &str)] = &[
            ("v1/devices/me/attributes".into(), me_len, "attributes"),
            (
                "v1/devices/me/rpc/request/+".into(),
                me_len,
                "rpc/request/+",
            ),
            ("v1/devices/me/#".into(), me_len, "#"),
            ("v1/devices/me/+".into(), me_len, "+"),
            (format!("devices/{OWN}/#"), id_len, "#"),
            (format!("devices/{OWN}/rpc/+/x"), id_len, "rpc/+/x"),
        ];
        for (filter, prefix_len, suffix_filter) in accepted {
            let authorized = authorize_filter(filter, own_id())
                .unwrap_or_else(|rejection| panic!("filter {filter:?} refused: {rejection:?}"));
            assert_eq!(authorized.prefix_len, *prefix_len, "filter {filter:?}");
            assert_eq!(
                authorized.suffix_filter, *suffix_filter,
                "filter {filter:?}"
            );
        }

        let refused: &[(String, FilterRejection)] = &[
            ("#".into(), FilterRejection::NotAuthorized),
            (
                "+/devices/me/telemetry".into(),
                FilterRejection::NotAuthorized,
            ),
            ("v1/devices/#".into(), FilterRejection::NotAuthorized),
            (
                "v1/devices/+/telemetry".into(),
                FilterRejection::NotAuthorized,
            ),
            ("v1/devices/me".into(), FilterRejection::NotAuthorized),
            ("v1/devices/me/".into(), FilterRejection::NotAuthorized),
            ("devices/+/telemetry".into(), FilterRejection::NotAuthorized),
            ("devices/#".into(), FilterRejection::NotAuthorized),
            (format!("devices/{OTHER}/#"), FilterRejection::NotAuthorized),
            ("v1/devices/me/a#".into(), FilterRejection::Invalid),
            ("v1/devices/me/#/a".into(), FilterRejection::Invalid),
            ("v1/devices/me/a+".into(), FilterRejection::Invalid),
            ("".into(), FilterRejection::Invalid),
            (
                "$share/group/v1/devices/me/telemetry".into(),
                FilterRejection::Shared,
            ),
        ];
        for (filter, expected) in refused {
            assert_eq!(
                authorize_filter(filter, own_id()),
                Err(*expected),
                "filter {filter:?}"
            );
        }
    }

    #[test]
    fn shared_filters_are_split() {
        let shared = split_shared("$share/group/v1/devices/me/#")
            .expect("valid")
            .expect("shared");
        assert_eq!(shared.share_name, "group");
        assert_eq!(shared.filter, "v1/devices/me/#");
        assert_eq!(shared.prefix_len, "$share/group/".len());
        assert_eq!(split_shared("v1/devices/me/#"), Ok(None));
        for invalid in [
            "$share/",
            "$share/group",
            "$share//a",
            "$share/g+/a",
            "$share/g#/a",
            "$share/g/",
        ] {
            assert_eq!(
                split_shared(invalid),
                Err(FilterRejection::Invalid),
                "filter {invalid:?}"
            );
        }
    }

    #[test]
    fn suffix_matching_follows_wildcard_rules() {
        let cases = [
            ("telemetry", "telemetry", true),
            ("telemetry", "attributes", false),
            ("#", "telemetry", true),
            ("#", "rpc/request/1", true),
            ("rpc/#", "rpc", true),
            ("rpc/#", "rpc/request/1", true),
            ("rpc/+", "rpc/request", true),
            ("rpc/+", "rpc/request/1", false),
            ("rpc/+/1", "rpc/request/1", true),
            ("+", "rpc/request", false),
            ("rpc/request", "rpc", false),
            ("rpc", "rpc/request", false),
            ("+/+", "a/", true),
        ];
        for (filter, suffix, expected) in cases {
            assert_eq!(
                suffix_matches(filter, suffix),
                expected,
                "filter {filter:?} suffix {suffix:?}"
            );
        }
    }

    #[test]
    fn topic_names_with_wildcards_are_invalid() {
        let cases = [
            ("v1/devices/me/telemetry", true),
            ("a", true),
            ("", false),
            ("v1/devices/me/+", false),
            ("v1/devices/me/#", false),
            ("a\0b", false),
        ];
        for (topic, expected) in cases {
            assert_eq!(is_valid_topic_name(topic), expected, "topic {topic:?}");
        }
    }
}
