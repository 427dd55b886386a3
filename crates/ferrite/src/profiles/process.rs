//! Transformation and schema validation of one decoded message, as its
//! profile describes them. Pure: no I/O, so the pipeline, the dry run of the
//! API and the tests share it.

use std::collections::HashSet;

use evalexpr::{ContextWithMutableVariables, DefaultNumericTypes, HashMapContext, Node};
use ferrite_core::{TimestampNs, Value};

use super::spec::{KeySpec, ProfileSpec, TransformStep, UnknownKeys, ValueType};
use super::units::{self, Conversion};

/// One value of a decoded message.
#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    pub key: String,
    pub value: Value,
    /// The unit the payload named (SenML `u`), if any.
    pub unit: Option<String>,
}

/// The values of a message that share one timestamp.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub ts: TimestampNs,
    pub fields: Vec<Field>,
}

impl Record {
    fn get(&self, key: &str) -> Option<&Field> {
        self.fields.iter().find(|field| field.key == key)
    }

    fn get_mut(&mut self, key: &str) -> Option<&mut Field> {
        self.fields.iter_mut().find(|field| field.key == key)
    }
}

/// Why a message was not stored: the pipeline step that failed and a message
/// that names the value and says what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub stage: Stage,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Decode,
    Transform,
    Validate,
    Timestamp,
    /// The device's profile could not be loaded or compiled.
    Profile,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Transform => "transform",
            Stage::Validate => "validate",
            Stage::Timestamp => "timestamp",
            Stage::Profile => "profile",
        }
    }
}

/// A transformation step with its expression parsed and units checked.
#[derive(Debug, Clone)]
enum Step {
    Rename {
        from: String,
        to: String,
    },
    Scale {
        key: String,
        factor: f64,
        offset: f64,
    },
    Convert {
        key: String,
        conversion: Conversion,
    },
    Derive {
        key: String,
        expression: Box<Node<DefaultNumericTypes>>,
        inputs: Vec<String>,
    },
    Drop {
        keys: HashSet<String>,
    },
}

/// The transformation and validation part of a profile, checked once.
#[derive(Debug, Clone)]
pub struct Processor {
    profile: String,
    steps: Vec<Step>,
    schema: Vec<(String, KeySpec)>,
    unknown_keys: UnknownKeys,
}

/// Parses an expression of a `derive` step or an `expression` condition and
/// returns it with the keys it reads.
pub fn parse_expression(text: &str) -> Result<(Node<DefaultNumericTypes>, Vec<String>), String> {
    let node = evalexpr::build_operator_tree::<DefaultNumericTypes>(text)
        .map_err(|error| format!("invalid expression {text:?}: {error}"))?;
    // Names assigned inside the expression (`a = 17.27; ...`) are locals,
    // not keys of the message.
    let assigned: HashSet<String> = assigned_names(&node);
    let mut inputs: Vec<String> = node
        .iter_variable_identifiers()
        .filter(|name| !assigned.contains(*name))
        .map(str::to_owned)
        .collect();
    inputs.sort();
    inputs.dedup();
    // The parser accepts some malformed text (`1 + `) and unknown functions;
    // both fail at evaluation. A trial run with every key set to 1 finds
    // them when the profile is saved rather than on live data. Type errors
    // are expected in the trial (a key that holds booleans is 1 here) and
    // are left to the data.
    if let Err(error) = evaluate_raw(&node, &inputs, |_| Some(Value::Float(1.0)))
        && !is_type_error(&error)
    {
        return Err(format!("invalid expression {text:?}: {error}"));
    }
    Ok((node, inputs))
}

fn assigned_names(node: &Node<DefaultNumericTypes>) -> HashSet<String> {
    let mut names = HashSet::new();
    for child in node.iter() {
        if matches!(child.operator(), evalexpr::Operator::Assign)
            && let Some(target) = child.children().first()
            && let evalexpr::Operator::VariableIdentifierWrite { identifier } = target.operator()
        {
            names.insert(identifier.clone());
        }
    }
    names
}

fn is_type_error(error: &evalexpr::EvalexprError<DefaultNumericTypes>) -> bool {
    use evalexpr::EvalexprError::*;
    matches!(
        error,
        ExpectedString { .. }
            | ExpectedInt { .. }
            | ExpectedFloat { .. }
            | ExpectedNumber { .. }
            | ExpectedNumberOrString { .. }
            | ExpectedBoolean { .. }
            | ExpectedTuple { .. }
            | ExpectedFixedLengthTuple { .. }
            | ExpectedRangedLengthTuple { .. }
            | ExpectedEmpty { .. }
            | TypeError { .. }
            | WrongTypeCombination { .. }
    )
}

/// Evaluates an expression over the values of a message. Integers enter as
/// floats, so `humidity / 100` divides as people expect and not as integer
/// division. Returns `Ok(None)` when a key it reads is missing. A panic
/// inside the expression library (some string functions panic on text that
/// is not ASCII) becomes an error.
pub fn evaluate(
    expression: &Node<DefaultNumericTypes>,
    inputs: &[String],
    lookup: impl Fn(&str) -> Option<Value>,
) -> Result<Option<evalexpr::Value<DefaultNumericTypes>>, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        evaluate_raw(expression, inputs, lookup)
    }))
    .unwrap_or_else(|_| {
        Err(evalexpr::EvalexprError::CustomMessage(
            "the expression failed on this input (a string function met text it cannot handle)"
                .to_owned(),
        ))
    })
    .map_err(|error| error.to_string())
}

fn evaluate_raw(
    expression: &Node<DefaultNumericTypes>,
    inputs: &[String],
    lookup: impl Fn(&str) -> Option<Value>,
) -> Result<
    Option<evalexpr::Value<DefaultNumericTypes>>,
    evalexpr::EvalexprError<DefaultNumericTypes>,
> {
    let mut context = HashMapContext::<DefaultNumericTypes>::new();
    for input in inputs {
        let Some(value) = lookup(input) else {
            return Ok(None);
        };
        let value = match value {
            Value::Float(v) => evalexpr::Value::Float(v),
            Value::Int(v) => evalexpr::Value::Float(v as f64),
            Value::Bool(v) => evalexpr::Value::Boolean(v),
            Value::Str(v) => evalexpr::Value::String(v),
        };
        context.set_value(input.clone(), value)?;
    }
    expression.eval_with_context_mut(&mut context).map(Some)
}

impl Processor {
    /// Checks the transformation steps and the schema of `spec`. Returns
    /// every problem found, each naming the step or key.
    pub fn new(spec: &ProfileSpec) -> Result<Processor, Vec<String>> {
        let mut problems = Vec::new();
        let mut steps = Vec::with_capacity(spec.transform.len());
        for (index, step) in spec.transform.iter().enumerate() {
            let at = format!("transform[{index}]");
            match step {
                TransformStep::Rename { from, to } => {
                    check_key(&mut problems, &at, from);
                    check_key(&mut problems, &at, to);
                    steps.push(Step::Rename {
                        from: from.clone(),
                        to: to.clone(),
                    });
                }
                TransformStep::Scale {
                    key,
                    factor,
                    offset,
                } => {
                    check_key(&mut problems, &at, key);
                    if !factor.is_finite() || !offset.is_finite() {
                        problems.push(format!("{at}: factor and offset must be finite numbers"));
                    }
                    steps.push(Step::Scale {
                        key: key.clone(),
                        factor: *factor,
                        offset: *offset,
                    });
                }
                TransformStep::Convert { key, from, to } => {
                    check_key(&mut problems, &at, key);
                    match Conversion::new(from, to) {
                        Ok(conversion) => steps.push(Step::Convert {
                            key: key.clone(),
                            conversion,
                        }),
                        Err(error) => problems.push(format!("{at}: {error}")),
                    }
                }
                TransformStep::Derive { key, expression } => {
                    check_key(&mut problems, &at, key);
                    match parse_expression(expression) {
                        Ok((_, inputs)) if inputs.is_empty() => problems.push(format!(
                            "{at}: the expression {expression:?} reads no key; derive a key from other keys of the message"
                        )),
                        Ok((node, inputs)) => steps.push(Step::Derive {
                            key: key.clone(),
                            expression: Box::new(node),
                            inputs,
                        }),
                        Err(error) => problems.push(format!("{at}: {error}")),
                    }
                }
                TransformStep::Drop { keys } => {
                    if keys.is_empty() {
                        problems.push(format!("{at}: drop lists no keys"));
                    }
                    steps.push(Step::Drop {
                        keys: keys.iter().cloned().collect(),
                    });
                }
            }
        }

        for (key, spec) in &spec.keys {
            let at = format!("keys.{key}");
            check_key(&mut problems, "keys", key);
            if let (Some(min), Some(max)) = (spec.min, spec.max)
                && min > max
            {
                problems.push(format!("{at}: min {min} is above max {max}"));
            }
            if (spec.min.is_some() || spec.max.is_some())
                && matches!(
                    spec.value_type,
                    Some(ValueType::Boolean | ValueType::String)
                )
            {
                problems.push(format!(
                    "{at}: min and max apply to numbers, but the key's type is {}",
                    spec.value_type.map_or("", ValueType::as_str)
                ));
            }
            if let Some(unit) = &spec.unit
                && unit.trim().is_empty()
            {
                problems.push(format!("{at}: unit is empty; leave it out instead"));
            }
        }

        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Processor {
            profile: spec.name.clone(),
            steps,
            schema: spec
                .keys
                .iter()
                .map(|(key, spec)| (key.clone(), spec.clone()))
                .collect(),
            unknown_keys: spec.unknown_keys,
        })
    }

    /// Applies the transformation steps, then checks every record against
    /// the schema. A message is stored whole or not at all, so the first
    /// problem rejects all of it.
    pub fn run(&self, records: &mut [Record]) -> Result<(), Rejection> {
        for record in records.iter_mut() {
            self.transform(record).map_err(|reason| Rejection {
                stage: Stage::Transform,
                reason,
            })?;
            self.validate(record).map_err(|reason| Rejection {
                stage: Stage::Validate,
                reason,
            })?;
        }
        Ok(())
    }

    fn transform(&self, record: &mut Record) -> Result<(), String> {
        for step in &self.steps {
            match step {
                Step::Rename { from, to } => {
                    if record.get(from).is_some() {
                        record.fields.retain(|field| &field.key != to);
                        if let Some(field) = record.get_mut(from) {
                            field.key = to.clone();
                        }
                    }
                }
                Step::Scale {
                    key,
                    factor,
                    offset,
                } => {
                    if let Some(field) = record.get_mut(key) {
                        field.value = scale(field, *factor, *offset)?;
                    }
                }
                Step::Convert { key, conversion } => {
                    if let Some(field) = record.get_mut(key) {
                        let value = numeric(field, "convert")?;
                        field.value = finite(key, conversion.apply(value))?;
                        field.unit = None;
                    }
                }
                Step::Derive {
                    key,
                    expression,
                    inputs,
                } => {
                    let result = evaluate(expression, inputs, |name| {
                        record.get(name).map(|field| field.value.clone())
                    })
                    .map_err(|error| {
                        format!("the expression that derives {key:?} failed: {error}")
                    })?;
                    let Some(result) = result else { continue };
                    let value = match result {
                        evalexpr::Value::Float(v) => finite(key, v)?,
                        evalexpr::Value::Int(v) => Value::Int(v),
                        evalexpr::Value::Boolean(v) => Value::Bool(v),
                        evalexpr::Value::String(v) => Value::Str(v),
                        other => {
                            return Err(format!(
                                "the expression that derives {key:?} returned {other:?}, which is not a number, boolean or string"
                            ));
                        }
                    };
                    record.fields.retain(|field| &field.key != key);
                    record.fields.push(Field {
                        key: key.clone(),
                        value,
                        unit: None,
                    });
                }
                Step::Drop { keys } => record.fields.retain(|field| !keys.contains(&field.key)),
            }
        }
        Ok(())
    }

    fn validate(&self, record: &mut Record) -> Result<(), String> {
        let profile = &self.profile;
        if self.unknown_keys != UnknownKeys::Accept {
            let known = |key: &str| self.schema.iter().any(|(name, _)| name == key);
            if self.unknown_keys == UnknownKeys::Reject
                && let Some(field) = record.fields.iter().find(|field| !known(&field.key))
            {
                return Err(format!(
                    "key {:?} is not in the schema of profile {profile:?}, which rejects unknown keys; add the key to the profile or set unknown_keys to accept or drop",
                    field.key
                ));
            }
            record.fields.retain(|field| known(&field.key));
        }

        for (key, spec) in &self.schema {
            let Some(field) = record.get_mut(key) else {
                if spec.required {
                    return Err(format!(
                        "required key {key:?} of profile {profile:?} is missing"
                    ));
                }
                continue;
            };
            if let (Some(expected), Some(given)) = (&spec.unit, field.unit.as_deref())
                && !units::same_unit(expected, given)
            {
                let conversion = Conversion::new(given, expected).map_err(|error| {
                    format!("key {key:?} arrived in unit {given:?}, but profile {profile:?} stores {expected:?}: {error}")
                })?;
                let value = numeric(field, "unit conversion")?;
                field.value = finite(key, conversion.apply(value))?;
            }
            field.unit = None;
            check_value(profile, key, spec, &field.value)?;
        }
        Ok(())
    }
}

fn check_value(profile: &str, key: &str, spec: &KeySpec, value: &Value) -> Result<(), String> {
    if let Some(expected) = spec.value_type {
        let matches = matches!(
            (expected, value),
            (ValueType::Number, Value::Float(_) | Value::Int(_))
                | (ValueType::Integer, Value::Int(_))
                | (ValueType::Boolean, Value::Bool(_))
                | (ValueType::String, Value::Str(_))
        );
        if !matches {
            return Err(format!(
                "key {key:?} = {} is {}, but profile {profile:?} expects {}",
                render(value),
                type_name(value),
                expected.as_str()
            ));
        }
    }
    if let Some(number) = value.as_f64() {
        if let Some(min) = spec.min
            && number < min
        {
            return Err(format!(
                "key {key:?} = {} is below the minimum {min} of profile {profile:?}",
                render(value)
            ));
        }
        if let Some(max) = spec.max
            && number > max
        {
            return Err(format!(
                "key {key:?} = {} is above the maximum {max} of profile {profile:?}",
                render(value)
            ));
        }
    } else if spec.min.is_some() || spec.max.is_some() {
        return Err(format!(
            "key {key:?} = {} is {}, but profile {profile:?} gives it a numeric range",
            render(value),
            type_name(value)
        ));
    }
    Ok(())
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Float(_) => "a float",
        Value::Int(_) => "an integer",
        Value::Bool(_) => "a boolean",
        Value::Str(_) => "a string",
    }
}

fn render(value: &Value) -> String {
    match value {
        Value::Float(v) => v.to_string(),
        Value::Int(v) => v.to_string(),
        Value::Bool(v) => v.to_string(),
        Value::Str(v) => format!("{:?}", crate::profiles::preview(v)),
    }
}

/// Scales a value. An integer stays an integer when the factor and offset
/// are whole and the result fits, so a key of type `integer` can be scaled.
fn scale(field: &Field, factor: f64, offset: f64) -> Result<Value, String> {
    if let Value::Int(value) = field.value
        && factor.fract() == 0.0
        && offset.fract() == 0.0
        && let Some(scaled) = (factor.abs() < 9.0e15 && offset.abs() < 9.0e15)
            .then(|| value.checked_mul(factor as i64)?.checked_add(offset as i64))
            .flatten()
    {
        return Ok(Value::Int(scaled));
    }
    let value = numeric(field, "scale")?;
    finite(&field.key, value * factor + offset)
}

fn numeric(field: &Field, step: &str) -> Result<f64, String> {
    field.value.as_f64().ok_or_else(|| {
        format!(
            "{step} needs a number, but key {:?} is {}",
            field.key,
            type_name(&field.value)
        )
    })
}

fn finite(key: &str, value: f64) -> Result<Value, String> {
    if value.is_finite() {
        Ok(Value::Float(value))
    } else {
        Err(format!(
            "the transformation of key {key:?} produced {value}, which cannot be stored"
        ))
    }
}

fn check_key(problems: &mut Vec<String>, at: &str, key: &str) {
    if key.is_empty() {
        problems.push(format!("{at}: a key is empty"));
    } else if key.len() > ferrite_codec::MAX_KEY_BYTES {
        problems.push(format!(
            "{at}: key {:?} is longer than {} bytes",
            crate::profiles::preview(key),
            ferrite_codec::MAX_KEY_BYTES
        ));
    }
}
