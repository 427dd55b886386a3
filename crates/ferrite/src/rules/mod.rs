//! Rules of a profile and their evaluation on processed messages.
//!
//! A rule has a condition; while the condition holds on a device, the rule's
//! alarm for that device is active. Pipeline workers evaluate rules right
//! after a message is stored, in log order per device, and turn edges of
//! the condition into [`Transition`]s for the alarm manager
//! (`crate::alarms`), which persists alarms and runs actions.
//!
//! ## Semantics
//! - Conditions see the message's values merged over the newest earlier
//!   value of each key of the device, so an expression over `temperature`
//!   and `humidity` works when the two arrive in separate messages. A
//!   condition whose keys have never arrived is unknown and changes nothing.
//! - Time is the points' timestamp, not the server clock, so replaying the
//!   log gives the same transitions. `for: 1m` raises only once the
//!   condition has held on every message for a minute of data time.
//! - `rate_of_change` compares a key's value with its previous value:
//!   `|Δvalue| / Δt`, scaled to `per`, above `max` holds. Points out of
//!   order (older than the previous one) are not used for rates.
//! - `no_data` holds when a device has sent nothing for the duration. The alarm manager checks it on a timer, because silence
//!   brings no message to evaluate; a worker clears it when data arrives.
//! - Workers compare the outcome of each message with the alarm manager's
//!   open alarms (shared, read without waiting): a rule that holds raises
//!   unless its alarm is open with the rule's severity, and a rule that no
//!   longer holds clears an open alarm. So an alarm cleared by hand is
//!   raised again by the next message that meets the condition, a new
//!   severity takes effect, and a restart needs no state. The manager
//!   ignores what it has already applied.
//! - Only the end state of a message counts, and points older than the
//!   newest value of their key (late data, replayed dead letters) are
//!   stored without raising or clearing alarms about the present.
//! - `all` and `any` use three-valued logic: a condition whose keys have not
//!   arrived is unknown, and `any` holds as soon as one known branch holds.

use std::collections::HashMap;
use std::time::Duration;

use evalexpr::{DefaultNumericTypes, Node};
use ferrite_core::{TimestampNs, Value};
use serde::{Deserialize, Serialize};

use crate::actions::ActionSpec;
use crate::profiles::process::{Record, evaluate, parse_expression};

/// Maximum length of a rule name, in bytes.
const MAX_RULE_NAME_BYTES: usize = 128;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Unique within the profile; alarms refer to their rule by name.
    pub name: String,
    #[serde(default)]
    pub severity: Severity,
    pub condition: Condition,
    /// How long the condition must hold before the alarm is raised.
    #[serde(
        rename = "for",
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub hold: Option<Duration>,
    /// The condition that clears the alarm (for hysteresis). Without it the
    /// alarm clears as soon as `condition` no longer holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clear: Option<Condition>,
    /// Alarm message; `{key}` is replaced by the key's value, `{device}` by
    /// the device name and `{rule}` by the rule name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<ActionSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Indeterminate,
    Warning,
    Minor,
    #[default]
    Major,
    Critical,
}

impl Severity {
    pub const ALL: [Severity; 5] = [
        Severity::Indeterminate,
        Severity::Warning,
        Severity::Minor,
        Severity::Major,
        Severity::Critical,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Indeterminate => "indeterminate",
            Severity::Warning => "warning",
            Severity::Minor => "minor",
            Severity::Major => "major",
            Severity::Critical => "critical",
        }
    }

    pub fn parse(text: &str) -> Option<Severity> {
        Some(match text {
            "indeterminate" => Severity::Indeterminate,
            "warning" => Severity::Warning,
            "minor" => Severity::Minor,
            "major" => Severity::Major,
            "critical" => Severity::Critical,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Condition {
    /// `key op value`, for example `temperature > 30`.
    Threshold {
        key: String,
        op: CompareOp,
        value: f64,
    },
    /// Holds when the value is outside `[min, max]`, or inside it with
    /// `inside: true`.
    Range {
        key: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        min: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max: Option<f64>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        inside: bool,
    },
    /// Holds when the value changes faster than `max` per `per`.
    RateOfChange {
        key: String,
        max: f64,
        #[serde(with = "humantime_serde")]
        per: Duration,
        #[serde(default)]
        direction: Direction,
    },
    /// Holds when the device sent nothing for `for`.
    NoData {
        #[serde(rename = "for", with = "humantime_serde")]
        duration: Duration,
    },
    /// A boolean expression over several keys, for example
    /// `temperature > 30 && humidity > 80`.
    Expression(String),
    /// Holds when every condition holds.
    All(Vec<Condition>),
    /// Holds when any condition holds.
    Any(Vec<Condition>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareOp {
    #[serde(rename = ">")]
    Greater,
    #[serde(rename = ">=")]
    GreaterOrEqual,
    #[serde(rename = "<")]
    Less,
    #[serde(rename = "<=")]
    LessOrEqual,
    #[serde(rename = "==")]
    Equal,
    #[serde(rename = "!=")]
    NotEqual,
}

impl CompareOp {
    fn as_str(self) -> &'static str {
        match self {
            CompareOp::Greater => ">",
            CompareOp::GreaterOrEqual => ">=",
            CompareOp::Less => "<",
            CompareOp::LessOrEqual => "<=",
            CompareOp::Equal => "==",
            CompareOp::NotEqual => "!=",
        }
    }

    fn holds(self, left: f64, right: f64) -> bool {
        match self {
            CompareOp::Greater => left > right,
            CompareOp::GreaterOrEqual => left >= right,
            CompareOp::Less => left < right,
            CompareOp::LessOrEqual => left <= right,
            CompareOp::Equal => left == right,
            CompareOp::NotEqual => left != right,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// A rise or a fall faster than `max`.
    #[default]
    Any,
    Rise,
    Fall,
}

/// A rule checked and ready to evaluate.
#[derive(Debug, Clone)]
pub struct CompiledRule {
    pub name: String,
    pub severity: Severity,
    condition: Compiled,
    clear: Option<Compiled>,
    hold_ns: i64,
    message: Option<String>,
    pub actions: Vec<ActionSpec>,
    /// The keys the rule reads; a message without any of them is skipped.
    keys: Vec<String>,
    /// Set for `no_data` rules, which the alarm manager evaluates.
    pub no_data: Option<NoData>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoData {
    pub duration: Duration,
}

#[derive(Debug, Clone)]
enum Compiled {
    Threshold {
        key: String,
        op: CompareOp,
        value: f64,
    },
    Range {
        key: String,
        min: f64,
        max: f64,
        inside: bool,
    },
    Rate {
        key: String,
        max: f64,
        per_ns: f64,
        direction: Direction,
    },
    NoData,
    Expression {
        text: String,
        node: Box<Node<DefaultNumericTypes>>,
        inputs: Vec<String>,
    },
    All(Vec<Compiled>),
    Any(Vec<Compiled>),
}

fn compile_condition(
    condition: &Condition,
    at: &str,
    nested: bool,
    problems: &mut Vec<String>,
    keys: &mut Vec<String>,
    no_data: &mut Option<NoData>,
) -> Option<Compiled> {
    Some(match condition {
        Condition::Threshold { key, op, value } => {
            if !value.is_finite() {
                problems.push(format!("{at}: value must be a finite number"));
            }
            keys.push(key.clone());
            Compiled::Threshold {
                key: key.clone(),
                op: *op,
                value: *value,
            }
        }
        Condition::Range {
            key,
            min,
            max,
            inside,
        } => {
            if min.is_none() && max.is_none() {
                problems.push(format!("{at}: a range needs min, max or both"));
            }
            let (min, max) = (
                min.unwrap_or(f64::NEG_INFINITY),
                max.unwrap_or(f64::INFINITY),
            );
            if min > max {
                problems.push(format!("{at}: min {min} is above max {max}"));
            }
            keys.push(key.clone());
            Compiled::Range {
                key: key.clone(),
                min,
                max,
                inside: *inside,
            }
        }
        Condition::RateOfChange {
            key,
            max,
            per,
            direction,
        } => {
            if !(max.is_finite() && *max >= 0.0) {
                problems.push(format!("{at}: max must be a finite number of at least 0"));
            }
            if per.is_zero() {
                problems.push(format!("{at}: per must be longer than 0 s, for example 1m"));
            }
            keys.push(key.clone());
            Compiled::Rate {
                key: key.clone(),
                max: *max,
                per_ns: per.as_nanos() as f64,
                direction: *direction,
            }
        }
        Condition::NoData { duration } => {
            if nested {
                problems.push(format!(
                    "{at}: no_data cannot be combined with other conditions; give it its own rule"
                ));
            }
            if duration.is_zero() {
                problems.push(format!(
                    "{at}: for must be longer than 0 s, for example 10m"
                ));
            }
            *no_data = Some(NoData {
                duration: *duration,
            });
            Compiled::NoData
        }
        Condition::Expression(text) => match parse_expression(text) {
            Ok((node, inputs)) => {
                if inputs.is_empty() {
                    problems.push(format!(
                        "{at}: the expression {text:?} reads no key of the message"
                    ));
                }
                keys.extend(inputs.iter().cloned());
                Compiled::Expression {
                    text: text.clone(),
                    node: Box::new(node),
                    inputs,
                }
            }
            Err(error) => {
                problems.push(format!("{at}: {error}"));
                return None;
            }
        },
        Condition::All(conditions) | Condition::Any(conditions) => {
            if conditions.is_empty() {
                problems.push(format!("{at}: lists no conditions"));
            }
            let compiled: Vec<Compiled> = conditions
                .iter()
                .enumerate()
                .filter_map(|(index, condition)| {
                    compile_condition(
                        condition,
                        &format!("{at}[{index}]"),
                        true,
                        problems,
                        keys,
                        no_data,
                    )
                })
                .collect();
            if matches!(condition, Condition::All(_)) {
                Compiled::All(compiled)
            } else {
                Compiled::Any(compiled)
            }
        }
    })
}

/// Checks the rules of a profile. Returns every problem found, each naming
/// the rule.
pub fn compile(rules: &[RuleSpec]) -> Result<Vec<CompiledRule>, Vec<String>> {
    let mut problems = Vec::new();
    let mut compiled = Vec::with_capacity(rules.len());
    for (index, rule) in rules.iter().enumerate() {
        let at = format!("rules[{index}] ({:?})", rule.name);
        if rule.name.trim().is_empty() || rule.name.len() > MAX_RULE_NAME_BYTES {
            problems.push(format!(
                "rules[{index}]: name must be 1 to {MAX_RULE_NAME_BYTES} bytes"
            ));
        }
        if rules[..index].iter().any(|other| other.name == rule.name) {
            problems.push(format!("{at}: another rule has the same name"));
        }
        let mut keys = Vec::new();
        let mut no_data = None;
        let condition = compile_condition(
            &rule.condition,
            &format!("{at}.condition"),
            false,
            &mut problems,
            &mut keys,
            &mut no_data,
        );
        let clear = rule.clear.as_ref().and_then(|clear| {
            let mut clear_no_data = None;
            compile_condition(
                clear,
                &format!("{at}.clear"),
                true,
                &mut problems,
                &mut keys,
                &mut clear_no_data,
            )
        });
        for (action_index, action) in rule.actions.iter().enumerate() {
            if let Err(error) = action.validate() {
                problems.push(format!("{at}.actions[{action_index}]: {error}"));
            }
        }
        if no_data.is_some() && (rule.clear.is_some() || rule.hold.is_some()) {
            problems.push(format!(
                "{at}: a no_data rule clears when data arrives; leave out clear and for"
            ));
        }
        keys.sort();
        keys.dedup();
        if let Some(condition) = condition {
            compiled.push(CompiledRule {
                name: rule.name.clone(),
                severity: rule.severity,
                condition,
                clear,
                hold_ns: rule
                    .hold
                    .map_or(0, |hold| i64::try_from(hold.as_nanos()).unwrap_or(i64::MAX)),
                message: rule.message.clone(),
                actions: rule.actions.clone(),
                keys,
                no_data,
            });
        }
    }
    if problems.is_empty() {
        Ok(compiled)
    } else {
        Err(problems)
    }
}

/// A raise or clear of one rule on one device, for the alarm manager.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub rule: String,
    pub raise: bool,
    pub severity: Severity,
    /// Timestamp of the point that caused it, in nanoseconds.
    pub ts: TimestampNs,
    pub message: String,
    /// The values the condition read.
    pub values: Vec<(String, Value)>,
    /// Ingest log position of the message, so that a replay after a crash
    /// does not apply the same change twice; `None` for the silence check.
    pub seq: Option<u64>,
}

/// Rule state a worker keeps per device between messages.
#[derive(Debug, Default)]
pub struct DeviceState {
    /// Newest value of each key a rule reads.
    latest: HashMap<String, (TimestampNs, Value)>,
    rules: HashMap<String, RuleState>,
}

#[derive(Debug, Default, Clone, Copy)]
struct RuleState {
    /// Data time at which the condition started to hold, for `for`.
    holding_since: Option<TimestampNs>,
}

/// Decision of the last record of a message that decided one rule.
#[derive(Debug, Clone)]
struct Outcome {
    raise: bool,
    ts: TimestampNs,
    values: Vec<(String, Value)>,
}

struct View<'a> {
    record: &'a Record,
    latest: &'a HashMap<String, (TimestampNs, Value)>,
}

impl View<'_> {
    fn value(&self, key: &str) -> Option<Value> {
        self.record
            .fields
            .iter()
            .find(|field| field.key == key)
            .map(|field| field.value.clone())
            .or_else(|| self.latest.get(key).map(|(_, value)| value.clone()))
    }

    fn number(&self, key: &str) -> Option<f64> {
        self.value(key).and_then(|value| value.as_f64())
    }
}

fn holds(condition: &Compiled, view: &View<'_>) -> Option<bool> {
    match condition {
        Compiled::Threshold { key, op, value } => Some(op.holds(view.number(key)?, *value)),
        Compiled::Range {
            key,
            min,
            max,
            inside,
        } => {
            let number = view.number(key)?;
            let within = number >= *min && number <= *max;
            Some(within == *inside)
        }
        Compiled::Rate {
            key,
            max,
            per_ns,
            direction,
        } => {
            let field = view.record.fields.iter().find(|field| &field.key == key)?;
            let current = field.value.as_f64()?;
            let (previous_ts, previous) = view.latest.get(key)?;
            let previous = previous.as_f64()?;
            let elapsed = view.record.ts - previous_ts;
            if elapsed <= 0 {
                return None;
            }
            let rate = (current - previous) / elapsed as f64 * per_ns;
            Some(match direction {
                Direction::Any => rate.abs() > *max,
                Direction::Rise => rate > *max,
                Direction::Fall => -rate > *max,
            })
        }
        // Data arrived, so the device is not silent.
        Compiled::NoData => Some(false),
        Compiled::Expression { node, inputs, .. } => {
            match evaluate(node, inputs, |key| view.value(key)) {
                Ok(Some(evalexpr::Value::Boolean(result))) => Some(result),
                // A missing key, an error or a non-boolean result leaves the
                // state as it is; profile checks cannot catch all of them
                // because types depend on the data.
                _ => None,
            }
        }
        // Three-valued logic: one false branch decides `all` and one true
        // branch decides `any`, even while other branches are unknown.
        Compiled::All(conditions) => {
            let mut unknown = false;
            for condition in conditions {
                match holds(condition, view) {
                    Some(false) => return Some(false),
                    Some(true) => {}
                    None => unknown = true,
                }
            }
            (!unknown).then_some(true)
        }
        Compiled::Any(conditions) => {
            let mut unknown = false;
            for condition in conditions {
                match holds(condition, view) {
                    Some(true) => return Some(true),
                    Some(false) => {}
                    None => unknown = true,
                }
            }
            (!unknown).then_some(false)
        }
    }
}

fn describe(condition: &Compiled) -> String {
    match condition {
        Compiled::Threshold { key, op, value } => format!("{key} {} {value}", op.as_str()),
        Compiled::Range {
            key,
            min,
            max,
            inside,
        } => format!(
            "{key} {} [{min}, {max}]",
            if *inside { "inside" } else { "outside" }
        ),
        Compiled::Rate { key, max, .. } => format!("{key} changes faster than {max}"),
        Compiled::NoData => "no data".to_owned(),
        Compiled::Expression { text, .. } => text.clone(),
        Compiled::All(conditions) => conditions
            .iter()
            .map(describe)
            .collect::<Vec<_>>()
            .join(" and "),
        Compiled::Any(conditions) => conditions
            .iter()
            .map(describe)
            .collect::<Vec<_>>()
            .join(" or "),
    }
}

fn render(value: &Value) -> String {
    match value {
        Value::Float(v) => v.to_string(),
        Value::Int(v) => v.to_string(),
        Value::Bool(v) => v.to_string(),
        Value::Str(v) => v.clone(),
    }
}

impl CompiledRule {
    fn message(&self, device: &str, values: &[(String, Value)], raise: bool) -> String {
        let Some(template) = &self.message else {
            let shown: Vec<String> = values
                .iter()
                .map(|(key, value)| format!("{key} = {}", render(value)))
                .collect();
            let state = if raise { "holds" } else { "no longer holds" };
            return format!(
                "{}: {} {state} ({})",
                self.name,
                describe(&self.condition),
                shown.join(", ")
            );
        };
        let mut text = template
            .replace("{device}", device)
            .replace("{rule}", &self.name);
        for (key, value) in values {
            text = text.replace(&format!("{{{key}}}"), &render(value));
        }
        text
    }
}

impl DeviceState {
    /// Evaluates `rules` on the records of one stored message, in order, and
    /// returns the transitions. Updates the remembered values afterwards.
    pub fn evaluate(
        &mut self,
        rules: &[CompiledRule],
        device: &str,
        records: &[Record],
        open: &dyn Fn(&str) -> Option<Severity>,
    ) -> Vec<Transition> {
        // The outcome of the last record that decided each rule. Only the
        // end state of a message counts, so a message of many records that
        // cross a threshold back and forth makes one change, not thousands.
        let mut outcomes: Vec<Option<Outcome>> = vec![None; rules.len()];
        for record in records {
            for (index, rule) in rules.iter().enumerate() {
                if !self.reads(rule, record) {
                    continue;
                }
                let view = View {
                    record,
                    latest: &self.latest,
                };
                let Some(condition) = holds(&rule.condition, &view) else {
                    continue;
                };
                let state = self.rules.entry(rule.name.clone()).or_default();
                let decision = if condition {
                    let since = *state.holding_since.get_or_insert(record.ts);
                    (record.ts.saturating_sub(since) >= rule.hold_ns).then_some(true)
                } else {
                    state.holding_since = None;
                    let cleared = match &rule.clear {
                        Some(clear) => holds(clear, &view),
                        None => Some(true),
                    };
                    (cleared == Some(true)).then_some(false)
                };
                let Some(raise) = decision else { continue };
                let values: Vec<(String, Value)> = rule
                    .keys
                    .iter()
                    .filter_map(|key| view.value(key).map(|value| (key.clone(), value)))
                    .collect();
                outcomes[index] = Some(Outcome {
                    raise,
                    ts: record.ts,
                    values,
                });
            }

            for field in &record.fields {
                let newer = self
                    .latest
                    .get(&field.key)
                    .is_none_or(|(ts, _)| *ts <= record.ts);
                if newer && rules.iter().any(|rule| rule.keys.contains(&field.key)) {
                    self.latest
                        .insert(field.key.clone(), (record.ts, field.value.clone()));
                }
            }
        }

        // The alarm manager's open alarms decide what is a change: a rule
        // that holds raises unless its alarm is open with the same severity
        // (so an alarm cleared by hand, or a new severity, takes effect),
        // and a rule that no longer holds clears an open alarm.
        let mut transitions = Vec::new();
        for (rule, outcome) in rules.iter().zip(outcomes) {
            let Some(outcome) = outcome else { continue };
            let open = open(&rule.name);
            let change = if outcome.raise {
                open != Some(rule.severity)
            } else {
                open.is_some()
            };
            if change {
                transitions.push(Transition {
                    rule: rule.name.clone(),
                    raise: outcome.raise,
                    severity: rule.severity,
                    ts: outcome.ts,
                    message: rule.message(device, &outcome.values, outcome.raise),
                    values: outcome.values,
                    seq: None,
                });
            }
        }
        transitions
    }

    /// True when `record` carries a key the rule reads, at a timestamp not
    /// older than the newest value of that key seen so far: late points are
    /// stored, but do not raise or clear alarms about the present. A
    /// no_data rule reads every message, which ends a silence.
    fn reads(&self, rule: &CompiledRule, record: &Record) -> bool {
        if rule.no_data.is_some() {
            return true;
        }
        rule.keys.iter().any(|key| {
            record.fields.iter().any(|field| &field.key == key)
                && self
                    .latest
                    .get(key)
                    .is_none_or(|(newest, _)| *newest <= record.ts)
        })
    }

    /// Forgets the state of rules that no longer exist, after a profile
    /// change.
    pub fn retain_rules(&mut self, rules: &[CompiledRule]) {
        self.rules
            .retain(|name, _| rules.iter().any(|rule| &rule.name == name));
    }
}

#[cfg(test)]
mod tests;
