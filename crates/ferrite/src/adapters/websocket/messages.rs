//! The JSON messages of the device WebSocket: parsing what devices send
//! and rendering what the server sends. No I/O.
//!
//! From the device:
//! - `{"type": "telemetry", "id": "m1", "data": <telemetry>}`, where
//!   `data` is telemetry JSON as the HTTP endpoints take it and `id` is an
//!   optional string or integer that the reply carries back;
//! - `{"type": "command_response", "id": 17, "result": <any JSON>}`, the
//!   response to the command with request id 17.
//!
//! From the server:
//! - `{"type": "ack", "id": "m1"}` once the ingest log has stored the
//!   telemetry message;
//! - `{"type": "error", "id": "m1", "error": "invalid_json", "message": "..."}`
//!   for a message that was rejected (`id` is null when it was not found);
//!   an error `rate_limited` adds `limit` (the setting), `limit_value`
//!   (per second) and `retry_after` (seconds);
//! - `{"type": "command", "id": 17, "method": "reboot", "params": {...}}`.

use std::collections::BTreeMap;

use serde_json::value::RawValue;
use serde_json::{Value, json};

/// Maximum length of a client-chosen message id, in characters.
pub const MAX_ID_CHARS: usize = 128;

/// A message from the device.
#[derive(Debug)]
pub enum ClientMessage<'a> {
    Telemetry {
        /// Echoed in the reply; null when the device sent none.
        id: Value,
        /// The telemetry JSON, exactly as sent.
        data: &'a RawValue,
    },
    CommandResponse {
        request_id: u32,
        /// The response payload for the waiting request, as JSON text.
        result: String,
    },
}

/// A rejected message: the error code, an explanation, and the message's
/// id when it could be read.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageError {
    pub id: Value,
    /// Short, stable code, also the `reason` of the rejection metric.
    pub code: &'static str,
    pub message: String,
    /// For `rate_limited`: the setting, its value per second and the
    /// seconds to wait.
    pub limit: Option<(&'static str, u32, u64)>,
}

impl MessageError {
    /// Creates an error that echoes `id` only when it is a valid message
    /// id, so that an error reply never repeats a large or odd input.
    pub fn new(id: Value, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            id: if is_valid_id(&id) { id } else { Value::Null },
            code,
            message: message.into(),
            limit: None,
        }
    }

    /// Creates the error of a message over a rate limit.
    pub fn rate_limited(id: Value, limited: &crate::limits::RateLimited) -> Self {
        Self {
            limit: Some((
                limited.limit.setting(),
                limited.per_second,
                limited.retry_after_secs(),
            )),
            ..Self::new(id, "rate_limited", limited.to_string())
        }
    }

    fn invalid(id: Value, message: impl Into<String>) -> Self {
        Self::new(id, "invalid_message", message)
    }
}

const FORMAT_HINT: &str = r#"send {"type":"telemetry","id":"m1","data":{"temperature":21.5}} or {"type":"command_response","id":17,"result":{...}}"#;

/// Parses a text message from the device.
pub fn parse_client_message(text: &str) -> Result<ClientMessage<'_>, MessageError> {
    let fields: BTreeMap<String, &RawValue> = serde_json::from_str(text).map_err(|error| {
        MessageError::new(
            Value::Null,
            "invalid_json",
            format!("the message is not a JSON object ({error}); {FORMAT_HINT}"),
        )
    })?;
    let id: Value = match fields.get("id") {
        Some(raw) => serde_json::from_str(raw.get()).unwrap_or(Value::Null),
        None => Value::Null,
    };
    let kind = match fields.get("type") {
        Some(raw) => serde_json::from_str::<String>(raw.get()).map_err(|_| {
            MessageError::invalid(
                id.clone(),
                format!("\"type\" must be a string; {FORMAT_HINT}"),
            )
        })?,
        None => {
            return Err(MessageError::invalid(
                id,
                format!("the message has no \"type\"; {FORMAT_HINT}"),
            ));
        }
    };

    match kind.as_str() {
        "telemetry" => parse_telemetry(&fields, id),
        "command_response" => parse_command_response(&fields, id),
        other => Err(MessageError::invalid(
            id,
            format!(
                "unknown message type {:?}: a device sends \"telemetry\" or \"command_response\"",
                shorten(other)
            ),
        )),
    }
}

/// Cuts text from the client to at most 64 characters, so that an error
/// message does not repeat a large input.
fn shorten(text: &str) -> String {
    const MAX_CHARS: usize = 64;
    match text.char_indices().nth(MAX_CHARS) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_owned(),
    }
}

fn parse_telemetry<'a>(
    fields: &BTreeMap<String, &'a RawValue>,
    id: Value,
) -> Result<ClientMessage<'a>, MessageError> {
    check_fields(fields, &["type", "id", "data"], &id)?;
    if !is_valid_id(&id) {
        return Err(MessageError::invalid(
            Value::Null,
            format!("\"id\" must be a string of at most {MAX_ID_CHARS} characters or an integer"),
        ));
    }
    let Some(data) = fields.get("data").copied() else {
        return Err(MessageError::invalid(
            id,
            r#"a telemetry message needs "data" with the telemetry JSON, such as {"temperature":21.5}"#,
        ));
    };
    Ok(ClientMessage::Telemetry { id, data })
}

fn parse_command_response<'a>(
    fields: &BTreeMap<String, &'a RawValue>,
    id: Value,
) -> Result<ClientMessage<'a>, MessageError> {
    check_fields(fields, &["type", "id", "result"], &id)?;
    let Some(request_id) = id.as_u64().and_then(|id| u32::try_from(id).ok()) else {
        return Err(MessageError::invalid(
            id,
            "a command_response needs the \"id\" of the command it responds to, an integer",
        ));
    };
    let result = fields
        .get("result")
        .map_or_else(|| "null".to_owned(), |raw| raw.get().to_owned());
    Ok(ClientMessage::CommandResponse { request_id, result })
}

/// True for null, a string of at most [`MAX_ID_CHARS`] characters, or an
/// integer.
fn is_valid_id(id: &Value) -> bool {
    match id {
        Value::Null => true,
        Value::String(text) => text.chars().count() <= MAX_ID_CHARS,
        Value::Number(number) => number.is_i64() || number.is_u64(),
        _ => false,
    }
}

fn check_fields(
    fields: &BTreeMap<String, &RawValue>,
    allowed: &[&str],
    id: &Value,
) -> Result<(), MessageError> {
    match fields.keys().find(|name| !allowed.contains(&name.as_str())) {
        Some(unknown) => Err(MessageError::invalid(
            id.clone(),
            format!(
                "unknown field {:?}; this message type takes {}",
                shorten(unknown),
                allowed.join(", ")
            ),
        )),
        None => Ok(()),
    }
}

/// Renders the acknowledgement of a stored telemetry message.
pub fn ack(id: &Value) -> String {
    json!({"type": "ack", "id": id}).to_string()
}

/// Renders a rejection; the socket stays open.
pub fn error(error: &MessageError) -> String {
    let mut reply = json!({
        "type": "error",
        "id": error.id,
        "error": error.code,
        "message": error.message,
    });
    if let Some((setting, per_second, retry_after)) = error.limit {
        reply["limit"] = json!(setting);
        reply["limit_value"] = json!(per_second);
        reply["retry_after"] = json!(retry_after);
    }
    reply.to_string()
}

/// Renders a command for the device.
pub fn command(request_id: u32, method: &str, params: &Value) -> String {
    json!({"type": "command", "id": request_id, "method": method, "params": params}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_replies_echo_only_valid_ids() {
        let long_id = "i".repeat(100_000);
        let text = json!({"type": "unknown", "id": long_id}).to_string();
        let error = parse_client_message(&text).unwrap_err();
        assert_eq!(error.id, Value::Null);
        assert!(self::error(&error).len() < 1000);

        let text = json!({"type": "unknown", "id": "m1"}).to_string();
        assert_eq!(parse_client_message(&text).unwrap_err().id, json!("m1"));
    }

    #[test]
    fn telemetry_keeps_data_as_sent() {
        let text = r#"{"type":"telemetry","id":"m1","data":{"t":21.50,"on":true}}"#;
        match parse_client_message(text) {
            Ok(ClientMessage::Telemetry { id, data }) => {
                assert_eq!(id, json!("m1"));
                assert_eq!(data.get(), r#"{"t":21.50,"on":true}"#);
            }
            other => panic!("expected telemetry, got {other:?}"),
        }
    }

    #[test]
    fn telemetry_id_is_optional() {
        match parse_client_message(r#"{"type":"telemetry","data":[{"ts":1,"values":{"a":1}}]}"#) {
            Ok(ClientMessage::Telemetry { id, .. }) => assert_eq!(id, Value::Null),
            other => panic!("expected telemetry, got {other:?}"),
        }
    }

    #[test]
    fn command_response_carries_result_text() {
        match parse_client_message(r#"{"type":"command_response","id":17,"result":{"ok":1}}"#) {
            Ok(ClientMessage::CommandResponse { request_id, result }) => {
                assert_eq!(request_id, 17);
                assert_eq!(result, r#"{"ok":1}"#);
            }
            other => panic!("expected a command response, got {other:?}"),
        }
        match parse_client_message(r#"{"type":"command_response","id":3}"#) {
            Ok(ClientMessage::CommandResponse { result, .. }) => assert_eq!(result, "null"),
            other => panic!("expected a command response, got {other:?}"),
        }
    }

    #[test]
    fn rejections_name_the_problem() {
        let cases: [(&str, &str, Value, &str); 9] = [
            (
                "{not json",
                "invalid_json",
                Value::Null,
                "not a JSON object",
            ),
            ("[1,2]", "invalid_json", Value::Null, "not a JSON object"),
            (
                r#"{"id":"a","data":{}}"#,
                "invalid_message",
                json!("a"),
                "no \"type\"",
            ),
            (
                r#"{"type":5}"#,
                "invalid_message",
                Value::Null,
                "must be a string",
            ),
            (
                r#"{"type":"hello","id":2}"#,
                "invalid_message",
                json!(2),
                "unknown message type",
            ),
            (
                r#"{"type":"telemetry","id":"b"}"#,
                "invalid_message",
                json!("b"),
                "needs \"data\"",
            ),
            (
                r#"{"type":"telemetry","data":{},"extra":1}"#,
                "invalid_message",
                Value::Null,
                "unknown field \"extra\"",
            ),
            (
                r#"{"type":"telemetry","id":{"x":1},"data":{}}"#,
                "invalid_message",
                Value::Null,
                "\"id\" must be",
            ),
            (
                r#"{"type":"command_response","id":"x"}"#,
                "invalid_message",
                json!("x"),
                "an integer",
            ),
        ];
        for (text, code, id, fragment) in cases {
            let error = parse_client_message(text).expect_err(text);
            assert_eq!(error.code, code, "{text}");
            assert_eq!(error.id, id, "{text}");
            assert!(
                error.message.contains(fragment),
                "{text}: {}",
                error.message
            );
        }
    }

    #[test]
    fn replies_render_as_documented() {
        let ack: Value = serde_json::from_str(&ack(&json!("m1"))).expect("JSON");
        assert_eq!(ack, json!({"type": "ack", "id": "m1"}));

        let rejection = MessageError::new(json!(4), "invalid_json", "bad");
        let error: Value = serde_json::from_str(&error(&rejection)).expect("JSON");
        assert_eq!(
            error,
            json!({"type": "error", "id": 4, "error": "invalid_json", "message": "bad"})
        );

        let command: Value =
            serde_json::from_str(&command(9, "reboot", &json!({"a": 1}))).expect("JSON");
        assert_eq!(
            command,
            json!({"type": "command", "id": 9, "method": "reboot", "params": {"a": 1}})
        );
    }
}
