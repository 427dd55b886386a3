//! The profile document: what users write in YAML or JSON, store through
//! the API and keep in version control.
//!
//! ```yaml
//! name: th-sensor
//! description: Temperature and humidity sensor
//! codec: { type: script, script: "function decodeUplink(input) { ... }" }
//! keys:
//!   temperature: { type: number, unit: Cel, min: -40, max: 85, required: true }
//!   humidity: { type: number, unit: "%RH", min: 0, max: 100 }
//! unknown_keys: accept
//! transform:
//!   - rename: { from: temp, to: temperature }
//!   - scale: { key: temperature, factor: 0.1 }
//!   - convert: { key: temperature, from: degF, to: Cel }
//!   - derive: { key: dew_point, expression: "temperature - (100 - humidity) / 5" }
//! enrich: { labels: true, attributes: [location] }
//! rules:
//!   - name: overheating
//!     severity: critical
//!     condition: { threshold: { key: temperature, op: ">", value: 30 } }
//!     for: 1m
//! retention: 90d
//! ```
//!
//! Every field has a default, so `name` alone is a valid profile: JSON
//! telemetry, no schema, no rules. Unknown fields are rejected, so a typo
//! does not silently switch a check off.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::rules::RuleSpec;

/// Maximum length of a profile name, in bytes.
pub const MAX_NAME_BYTES: usize = 128;
/// Largest script of a scripted codec, in bytes.
pub const MAX_SCRIPT_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default)]
    pub codec: CodecSpec,
    /// The schema: the keys a message may carry after transformation.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub keys: BTreeMap<String, KeySpec>,
    /// What happens to keys the schema does not list.
    #[serde(default)]
    pub unknown_keys: UnknownKeys,
    /// Steps applied in order to every decoded message, before the schema
    /// check.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub transform: Vec<TransformStep>,
    #[serde(default)]
    pub enrich: EnrichSpec,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleSpec>,
    /// How long raw points of this profile's devices are kept; the
    /// tenant's retention applies when it is shorter or this is absent.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub retention: Option<Duration>,
}

/// The payload codec. Built-in formats decode in the adapter and the
/// pipeline; `cayenne_lpp` and `script` take the raw bytes.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum CodecSpec {
    /// Telemetry JSON: flat objects, `{"ts", "values"}` records and arrays.
    #[default]
    Json,
    /// SenML (RFC 8428) in JSON or CBOR; the content type tells which.
    Senml,
    /// Cayenne Low Power Payload.
    CayenneLpp,
    /// A JavaScript `decodeUplink(input)` in the style of The Things Stack
    /// device repository.
    Script {
        script: String,
        /// Maximum run time of one call (default 100 ms).
        #[serde(
            default,
            with = "humantime_serde",
            skip_serializing_if = "Option::is_none"
        )]
        max_run_time: Option<Duration>,
    },
}

impl CodecSpec {
    pub fn name(&self) -> &'static str {
        match self {
            CodecSpec::Json => "json",
            CodecSpec::Senml => "senml",
            CodecSpec::CayenneLpp => "cayenne_lpp",
            CodecSpec::Script { .. } => "script",
        }
    }

    /// True when the codec takes raw bytes, which adapters pass on without
    /// checking their syntax.
    pub fn takes_raw_bytes(&self) -> bool {
        matches!(self, CodecSpec::CayenneLpp | CodecSpec::Script { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub value_type: Option<ValueType>,
    /// The unit values are stored in. SenML values in another unit of the
    /// same quantity are converted to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// Every message must carry this key.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub required: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueType {
    /// An integer or a float.
    Number,
    /// An integer; a float is rejected even when it is whole.
    Integer,
    Boolean,
    String,
}

impl ValueType {
    pub fn as_str(self) -> &'static str {
        match self {
            ValueType::Number => "number",
            ValueType::Integer => "integer",
            ValueType::Boolean => "boolean",
            ValueType::String => "string",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownKeys {
    /// Store keys the schema does not list.
    #[default]
    Accept,
    /// Drop them and store the rest of the message.
    Drop,
    /// Reject the whole message to the dead-letter log.
    Reject,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum TransformStep {
    /// Renames a key; a message without it is left as it is.
    Rename { from: String, to: String },
    /// Replaces a numeric value `v` by `v * factor + offset`.
    Scale {
        key: String,
        #[serde(default = "one")]
        factor: f64,
        #[serde(default)]
        offset: f64,
    },
    /// Converts a numeric value between units of the same quantity.
    Convert {
        key: String,
        from: String,
        to: String,
    },
    /// Adds a key computed from other keys of the same message. The key is
    /// skipped when a key the expression reads is missing.
    Derive { key: String, expression: String },
    /// Removes keys.
    Drop { keys: Vec<String> },
}

fn one() -> f64 {
    1.0
}

/// Device properties attached to every processed message (live events,
/// rule messages and actions), and usable as filters and groups in fleet
/// queries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrichSpec {
    /// Attach the device's labels.
    #[serde(default = "yes")]
    pub labels: bool,
    /// Device attributes to attach, by name (for example `location`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attributes: Vec<String>,
}

impl Default for EnrichSpec {
    fn default() -> Self {
        EnrichSpec {
            labels: true,
            attributes: Vec::new(),
        }
    }
}

fn yes() -> bool {
    true
}
