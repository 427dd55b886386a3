//! Action specifications: what a rule does when one of its alarms changes.
//!
//! People write these inside device profiles, in YAML or JSON. Parsing
//! rejects unknown fields and unknown action types. [`ActionSpec::validate`]
//! checks every value, with an error that names the field, shows the value
//! and suggests a valid one.

use std::collections::BTreeMap;
use std::fmt;

use reqwest::header::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

use super::ActionEvent;
use super::secrets::SEALED_PREFIX;
use crate::live::AlarmChange;
use crate::metadata::ActionKind;

/// Longest accepted webhook URL, in bytes.
const MAX_URL_BYTES: usize = 2048;
/// Most extra headers one webhook may set.
const MAX_HEADERS: usize = 32;
/// Longest accepted header value and secret, in bytes.
const MAX_HEADER_VALUE_BYTES: usize = 4096;
/// Longest accepted topic template, in bytes. MQTT allows 65,535; a topic
/// this long is a mistake.
const MAX_TOPIC_BYTES: usize = 1024;
/// Longest accepted command method, in bytes.
const MAX_METHOD_BYTES: usize = 256;
/// Largest accepted command `params`, in bytes of JSON.
const MAX_PARAMS_BYTES: usize = 64 * 1024;

/// The placeholders a topic template may use.
pub const TOPIC_PLACEHOLDERS: [&str; 5] =
    ["device_id", "device_name", "rule", "severity", "change"];

/// Header names that Ferrite sets itself or that HTTP reserves.
const RESERVED_HEADERS: [&str; 6] = [
    "content-type",
    "content-length",
    "host",
    "transfer-encoding",
    "connection",
    "user-agent",
];

/// One action of a rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ActionSpec {
    /// POST the alarm change as JSON to a URL.
    Webhook(WebhookSpec),
    /// Publish the alarm change as JSON to the external broker of
    /// `[actions.mqtt]`.
    MqttPublish(MqttPublishSpec),
    /// Send a ThingsBoard-style RPC request to the alarm's device over
    /// Ferrite's MQTT server.
    Command(CommandSpec),
}

/// A webhook: `POST url` with the event as the JSON body.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSpec {
    /// `http` or `https` URL of the receiver.
    pub url: String,
    /// HMAC-SHA256 key for the `X-Ferrite-Signature` header; without it the
    /// request is not signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Extra request headers, such as an `Authorization` header.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Alarm changes that trigger the webhook.
    #[serde(default = "default_triggers")]
    pub on: Vec<Trigger>,
}

/// A publish to the external broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttPublishSpec {
    /// Topic name with optional placeholders, such as
    /// `alarms/{device_name}/{rule}`.
    pub topic: String,
    /// 0 or 1.
    #[serde(default = "default_qos")]
    pub qos: u8,
    #[serde(default)]
    pub retain: bool,
    #[serde(default = "default_triggers")]
    pub on: Vec<Trigger>,
}

/// An RPC request to the alarm's device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandSpec {
    /// The RPC method, such as `setValve`.
    pub method: String,
    /// Any JSON value; an empty object when left out.
    #[serde(default = "empty_object")]
    pub params: serde_json::Value,
    #[serde(default = "default_triggers")]
    pub on: Vec<Trigger>,
}

/// An alarm change that can trigger an action: the values of `on`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    Raised,
    Updated,
    Acknowledged,
    Cleared,
}

impl Trigger {
    fn matches(self, change: AlarmChange) -> bool {
        matches!(
            (self, change),
            (Trigger::Raised, AlarmChange::Raised)
                | (Trigger::Updated, AlarmChange::Updated)
                | (Trigger::Acknowledged, AlarmChange::Acknowledged)
                | (Trigger::Cleared, AlarmChange::Cleared)
        )
    }
}

fn default_triggers() -> Vec<Trigger> {
    vec![Trigger::Raised, Trigger::Cleared]
}

fn default_qos() -> u8 {
    1
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

/// An invalid value in an action: the field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} action: {field}: {message}")]
pub struct SpecError {
    pub kind: &'static str,
    pub field: &'static str,
    pub message: String,
}

impl fmt::Debug for WebhookSpec {
    // Written out so that the secret and header values (often credentials)
    // never reach a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSpec")
            .field("url", &self.url)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("on", &self.on)
            .finish()
    }
}

impl ActionSpec {
    pub fn kind(&self) -> ActionKind {
        match self {
            ActionSpec::Webhook(_) => ActionKind::Webhook,
            ActionSpec::MqttPublish(_) => ActionKind::MqttPublish,
            ActionSpec::Command(_) => ActionKind::Command,
        }
    }

    /// Returns the alarm changes that trigger this action.
    pub fn on(&self) -> &[Trigger] {
        match self {
            ActionSpec::Webhook(spec) => &spec.on,
            ActionSpec::MqttPublish(spec) => &spec.on,
            ActionSpec::Command(spec) => &spec.on,
        }
    }

    /// True when `change` is one of the action's triggers.
    pub fn is_triggered_by(&self, change: AlarmChange) -> bool {
        self.on().iter().any(|trigger| trigger.matches(change))
    }

    /// Checks every value of the action. The error names the field and the
    /// value and suggests a valid one.
    pub fn validate(&self) -> Result<(), SpecError> {
        let kind = self.kind().as_str();
        let invalid = |field: &'static str, message: String| SpecError {
            kind,
            field,
            message,
        };
        validate_triggers(self.on()).map_err(|message| invalid("on", message))?;
        match self {
            ActionSpec::Webhook(spec) => {
                validate_url(&spec.url).map_err(|message| invalid("url", message))?;
                if let Some(secret) = &spec.secret {
                    validate_secret(secret).map_err(|message| invalid("secret", message))?;
                }
                validate_headers(&spec.headers).map_err(|message| invalid("headers", message))
            }
            ActionSpec::MqttPublish(spec) => {
                validate_topic_template(&spec.topic)
                    .map_err(|message| invalid("topic", message))?;
                if spec.qos > 1 {
                    return Err(invalid(
                        "qos",
                        format!("qos {} is not supported: use 0 or 1", spec.qos),
                    ));
                }
                Ok(())
            }
            ActionSpec::Command(spec) => {
                validate_method(&spec.method).map_err(|message| invalid("method", message))?;
                validate_params(&spec.params).map_err(|message| invalid("params", message))
            }
        }
    }

    /// Where the action sends to, as the deliveries API shows it: the URL
    /// without credentials and query, the topic, or the command method.
    pub fn target(&self, event: &ActionEvent) -> String {
        match self {
            ActionSpec::Webhook(spec) => display_url(&spec.url),
            ActionSpec::MqttPublish(spec) => render_topic(&spec.topic, event),
            ActionSpec::Command(spec) => spec.method.clone(),
        }
    }
}

fn validate_triggers(on: &[Trigger]) -> Result<(), String> {
    if on.is_empty() {
        return Err(
            "the list is empty, so the action would never run: list one or more of raised, updated, acknowledged, cleared, or leave on out for raised and cleared"
                .to_owned(),
        );
    }
    for (index, trigger) in on.iter().enumerate() {
        if on[..index].contains(trigger) {
            return Err(format!(
                "{} is listed twice; list each change once",
                serde_json::to_string(trigger).unwrap_or_default()
            ));
        }
    }
    Ok(())
}

fn validate_url(text: &str) -> Result<(), String> {
    if text.len() > MAX_URL_BYTES {
        return Err(format!(
            "the URL has {} bytes, more than the limit of {MAX_URL_BYTES}",
            text.len()
        ));
    }
    let url = reqwest::Url::parse(text).map_err(|error| {
        format!("{text:?} is not a valid URL ({error}); write one such as https://example.com/hooks/alarms")
    })?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(format!(
            "{:?} uses the scheme {:?}; only http and https are supported",
            display_url(text),
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{:?} has no host", display_url(text)));
    }
    Ok(())
}

fn validate_secret(secret: &str) -> Result<(), String> {
    // A sealed value was checked in plain text before it was sealed.
    if secret.starts_with(SEALED_PREFIX) {
        return Ok(());
    }
    if secret.is_empty() {
        return Err("the secret is empty; leave secret out to send unsigned requests".to_owned());
    }
    if secret.len() > MAX_HEADER_VALUE_BYTES {
        return Err(format!(
            "the secret has {} bytes, more than the limit of {MAX_HEADER_VALUE_BYTES}",
            secret.len()
        ));
    }
    Ok(())
}

fn validate_headers(headers: &BTreeMap<String, String>) -> Result<(), String> {
    if headers.len() > MAX_HEADERS {
        return Err(format!(
            "{} headers given, more than the limit of {MAX_HEADERS}",
            headers.len()
        ));
    }
    for (name, value) in headers {
        if HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(format!(
                "{name:?} is not a valid header name: use letters, digits and - only"
            ));
        }
        let lower = name.to_ascii_lowercase();
        if RESERVED_HEADERS.contains(&lower.as_str()) || lower.starts_with("x-ferrite-") {
            return Err(format!(
                "{name:?} is set by Ferrite and cannot be overridden; remove it"
            ));
        }
        if value.starts_with(SEALED_PREFIX) {
            continue;
        }
        // The value is not shown, because headers often carry credentials.
        if value.len() > MAX_HEADER_VALUE_BYTES || HeaderValue::from_str(value).is_err() {
            return Err(format!(
                "the value of {name:?} is not a valid header value: use at most {MAX_HEADER_VALUE_BYTES} bytes of visible ASCII characters and spaces"
            ));
        }
    }
    Ok(())
}

fn validate_topic_template(template: &str) -> Result<(), String> {
    if template.is_empty() {
        return Err("the topic is empty; write one such as alarms/{device_name}".to_owned());
    }
    if template.len() > MAX_TOPIC_BYTES {
        return Err(format!(
            "the topic has {} bytes, more than the limit of {MAX_TOPIC_BYTES}",
            template.len()
        ));
    }
    if template.contains(['+', '#']) {
        return Err(format!(
            "{template:?} contains a wildcard (+ or #), which only subscriptions may use"
        ));
    }
    if template.starts_with('$') {
        return Err(format!(
            "{template:?} starts with $, which brokers reserve for their own topics"
        ));
    }
    if template.chars().any(char::is_control) {
        return Err(format!("{template:?} contains a control character"));
    }
    let mut rest = template;
    while let Some(open) = rest.find(['{', '}']) {
        if rest.as_bytes()[open] == b'}' {
            return Err(format!(
                "{template:?} has a }} without {{; placeholders are written {{name}}"
            ));
        }
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            return Err(format!(
                "{template:?} has a {{ without }}; placeholders are written {{name}}"
            ));
        };
        let name = &after[..close];
        if !TOPIC_PLACEHOLDERS.contains(&name) {
            return Err(format!(
                "{template:?} uses the unknown placeholder {{{name}}}; use {}",
                TOPIC_PLACEHOLDERS
                    .map(|known| format!("{{{known}}}"))
                    .join(", ")
            ));
        }
        rest = &after[close + 1..];
    }
    Ok(())
}

/// Checks the method of an RPC command.
pub fn validate_method(method: &str) -> Result<(), String> {
    if method.trim().is_empty() {
        return Err("the method is empty; write the RPC method the device expects".to_owned());
    }
    if method.len() > MAX_METHOD_BYTES {
        return Err(format!(
            "the method has {} bytes, more than the limit of {MAX_METHOD_BYTES}",
            method.len()
        ));
    }
    if method.chars().any(char::is_control) {
        return Err(format!("{method:?} contains a control character"));
    }
    Ok(())
}

/// Checks the size of the params of an RPC command.
pub fn validate_params(params: &serde_json::Value) -> Result<(), String> {
    let size = serde_json::to_vec(params).map_or(0, |json| json.len());
    if size > MAX_PARAMS_BYTES {
        return Err(format!(
            "params take {size} bytes of JSON, more than the limit of {MAX_PARAMS_BYTES}; send less data or let the device fetch it"
        ));
    }
    Ok(())
}

/// Returns the URL without user name, password, query and fragment, which
/// may contain credentials. Text that does not parse is returned as is.
pub fn display_url(text: &str) -> String {
    let Ok(mut url) = reqwest::Url::parse(text) else {
        return text.to_owned();
    };
    // These setters fail only for URLs that cannot have credentials, which
    // then have none to remove.
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.set_query(None);
    url.set_fragment(None);
    url.to_string()
}

/// Fills the placeholders of a validated topic template. Values have `/`,
/// `+`, `#` and control characters replaced by `_`, so that a device name
/// cannot add topic levels or wildcards.
pub fn render_topic(template: &str, event: &ActionEvent) -> String {
    let mut topic = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        topic.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            break;
        };
        push_topic_value(&mut topic, &placeholder_value(&after[..close], event));
        rest = &after[close + 1..];
    }
    topic.push_str(rest);
    topic
}

fn placeholder_value(name: &str, event: &ActionEvent) -> String {
    match name {
        "device_id" => event.device_id.to_string(),
        "device_name" => event.device_name.clone(),
        "change" => event.change.as_str().to_owned(),
        "rule" | "severity" => match event.alarm.get(name) {
            Some(serde_json::Value::String(text)) => text.clone(),
            Some(serde_json::Value::Null) | None => String::new(),
            Some(other) => other.to_string(),
        },
        _ => String::new(),
    }
}

fn push_topic_value(topic: &mut String, value: &str) {
    for character in value.chars() {
        if matches!(character, '/' | '+' | '#') || character.is_control() {
            topic.push('_');
        } else {
            topic.push(character);
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::ids::{DeviceId, TenantId};

    fn parse(value: serde_json::Value) -> Result<ActionSpec, String> {
        serde_json::from_value::<ActionSpec>(value).map_err(|error| error.to_string())
    }

    fn validation_error(value: serde_json::Value) -> String {
        parse(value)
            .expect("the spec parses")
            .validate()
            .expect_err("the spec is invalid")
            .to_string()
    }

    fn event() -> ActionEvent {
        ActionEvent {
            tenant_id: TenantId::new_random(),
            device_id: DeviceId::new_random(),
            device_name: "pump/7+#".to_owned(),
            change: AlarmChange::Raised,
            alarm: json!({"id": "x", "rule": "high temp", "severity": "critical"}),
        }
    }

    #[test]
    fn webhook_parses_with_defaults() {
        let spec = parse(json!({"type": "webhook", "url": "https://example.com/hook"})).unwrap();
        let ActionSpec::Webhook(webhook) = &spec else {
            panic!("not a webhook: {spec:?}");
        };
        assert_eq!(webhook.on, [Trigger::Raised, Trigger::Cleared]);
        assert_eq!(webhook.secret, None);
        assert!(webhook.headers.is_empty());
        assert_eq!(spec.validate(), Ok(()));
        assert!(spec.is_triggered_by(AlarmChange::Cleared));
        assert!(!spec.is_triggered_by(AlarmChange::Updated));
    }

    #[test]
    fn each_type_parses_with_defaults() {
        let mqtt = parse(json!({"type": "mqtt_publish", "topic": "alarms/{device_name}"})).unwrap();
        assert_eq!(
            mqtt,
            ActionSpec::MqttPublish(MqttPublishSpec {
                topic: "alarms/{device_name}".to_owned(),
                qos: 1,
                retain: false,
                on: default_triggers(),
            })
        );
        let command =
            parse(json!({"type": "command", "method": "reboot", "on": ["raised"]})).unwrap();
        assert_eq!(
            command,
            ActionSpec::Command(CommandSpec {
                method: "reboot".to_owned(),
                params: json!({}),
                on: vec![Trigger::Raised],
            })
        );
    }

    #[test]
    fn unknown_fields_and_types_are_rejected() {
        let error =
            parse(json!({"type": "webhook", "url": "http://a", "secrte": "x"})).unwrap_err();
        assert!(error.contains("secrte"), "{error}");
        let error = parse(json!({"type": "webhok", "url": "http://a"})).unwrap_err();
        assert!(
            error.contains("webhok") && error.contains("mqtt_publish"),
            "{error}"
        );
        let error = parse(json!({"url": "http://a"})).unwrap_err();
        assert!(error.contains("type"), "{error}");
        let error = parse(json!({"type": "webhook"})).unwrap_err();
        assert!(error.contains("url"), "{error}");
        let error = parse(json!({"type": "command", "method": "x", "on": ["rased"]})).unwrap_err();
        assert!(error.contains("rased"), "{error}");
    }

    #[test]
    fn invalid_values_name_field_and_value() {
        let cases = [
            (
                json!({"type": "webhook", "url": "ftp://example.com"}),
                "url",
                "scheme",
            ),
            (
                json!({"type": "webhook", "url": "example.com/hook"}),
                "url",
                "not a valid URL",
            ),
            (
                json!({"type": "webhook", "url": "http://a", "secret": ""}),
                "secret",
                "empty",
            ),
            (
                json!({"type": "webhook", "url": "http://a", "headers": {"Content-Type": "x"}}),
                "headers",
                "Content-Type",
            ),
            (
                json!({"type": "webhook", "url": "http://a", "headers": {"X-Ferrite-Event": "x"}}),
                "headers",
                "X-Ferrite-Event",
            ),
            (
                json!({"type": "webhook", "url": "http://a", "headers": {"bad name": "x"}}),
                "headers",
                "bad name",
            ),
            (
                json!({"type": "webhook", "url": "http://a", "headers": {"X-Token": "a\nb"}}),
                "headers",
                "X-Token",
            ),
            (
                json!({"type": "webhook", "url": "http://a", "on": []}),
                "on",
                "empty",
            ),
            (
                json!({"type": "webhook", "url": "http://a", "on": ["raised", "raised"]}),
                "on",
                "twice",
            ),
            (
                json!({"type": "mqtt_publish", "topic": "a/+/b"}),
                "topic",
                "wildcard",
            ),
            (
                json!({"type": "mqtt_publish", "topic": ""}),
                "topic",
                "empty",
            ),
            (
                json!({"type": "mqtt_publish", "topic": "$SYS/x"}),
                "topic",
                "reserve",
            ),
            (
                json!({"type": "mqtt_publish", "topic": "a/{devce}"}),
                "topic",
                "{devce}",
            ),
            (
                json!({"type": "mqtt_publish", "topic": "a/{rule"}),
                "topic",
                "without",
            ),
            (
                json!({"type": "mqtt_publish", "topic": "a/rule}"}),
                "topic",
                "without",
            ),
            (
                json!({"type": "mqtt_publish", "topic": "a", "qos": 2}),
                "qos",
                "qos 2",
            ),
            (json!({"type": "command", "method": " "}), "method", "empty"),
        ];
        for (spec, field, fragment) in cases {
            let error = validation_error(spec.clone());
            assert!(
                error.contains(&format!(": {field}: ")),
                "{spec}: error does not name {field}: {error}"
            );
            assert!(
                error.contains(fragment),
                "{spec}: error does not mention {fragment:?}: {error}"
            );
        }
    }

    #[test]
    fn header_value_is_not_shown_in_errors() {
        let error = validation_error(
            json!({"type": "webhook", "url": "http://a", "headers": {"Authorization": "Bearer s3cr3t\n"}}),
        );
        assert!(!error.contains("s3cr3t"), "{error}");
    }

    #[test]
    fn debug_output_hides_secret_and_header_values() {
        let spec = parse(json!({
            "type": "webhook", "url": "http://a", "secret": "s3cr3t",
            "headers": {"Authorization": "Bearer t0ken"}
        }))
        .unwrap();
        let text = format!("{spec:?}");
        assert!(
            !text.contains("s3cr3t") && !text.contains("t0ken"),
            "{text}"
        );
        assert!(text.contains("Authorization"), "{text}");
    }

    #[test]
    fn topic_placeholders_are_filled_and_sanitized() {
        let event = event();
        let topic = render_topic(
            "alarms/{device_name}/{rule}/{severity}/{change}/{device_id}",
            &event,
        );
        assert_eq!(
            topic,
            format!(
                "alarms/pump_7__/high temp/critical/raised/{}",
                event.device_id
            )
        );
    }

    #[test]
    fn missing_alarm_fields_render_empty() {
        let mut event = event();
        event.alarm = json!({"id": "x"});
        assert_eq!(render_topic("a/{rule}/{severity}", &event), "a//");
    }

    #[test]
    fn target_hides_url_credentials_and_query() {
        assert_eq!(
            display_url("https://user:pass@example.com:8443/hook?token=abc#x"),
            "https://example.com:8443/hook"
        );
    }

    #[test]
    fn spec_round_trips_through_json() {
        let spec = parse(json!({
            "type": "webhook", "url": "http://a/b", "secret": "k",
            "headers": {"X-Api-Key": "v"}, "on": ["acknowledged"]
        }))
        .unwrap();
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["type"], "webhook");
        assert_eq!(parse(json).unwrap(), spec);
    }
}
