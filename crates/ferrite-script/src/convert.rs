//! Conversion of the values a script returns into JSON.
//!
//! The rules follow `JSON.stringify` where JSON can carry the value, with
//! these differences, each reported by path (such as `data.sensors[1].value`):
//! - `undefined` is left out of objects and becomes `null` in arrays, with a
//!   warning.
//! - `NaN`, `Infinity` and `-Infinity` become `null`, with a warning.
//! - Functions, symbols and promises are an error, because they are never
//!   meant as data.
//! - A BigInt becomes a JSON integer if it fits in 64 bits, and is an error
//!   otherwise.
//! - Typed arrays become JSON arrays of numbers.
//! - Integral numbers up to 2^53 become JSON integers, so `21` stays `21`
//!   and does not become `21.0`.
//!
//! Objects with a `toJSON` method, such as `Date`, are converted through it.
//! Keys come out sorted, because `serde_json::Map` is ordered by key.

use std::fmt;

use rquickjs::function::This;
use rquickjs::{Array, Object, Type, Value};
use serde_json::{Map, Number};

use crate::ScriptError;
use crate::engine::Failure;

/// Deepest nesting of arrays and objects accepted in a result. Deeper
/// structures are almost always circular references.
const MAX_DEPTH: usize = 64;

/// Largest integer that a JavaScript number represents exactly, 2^53.
const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_992.0;

/// Converts one call's result and keeps count of its size.
pub(crate) struct Converter {
    function: &'static str,
    limit: usize,
    remaining: usize,
    warnings: Vec<String>,
}

impl Converter {
    pub(crate) fn new(function: &'static str, max_output_bytes: usize) -> Converter {
        Converter {
            function,
            limit: max_output_bytes,
            remaining: max_output_bytes,
            warnings: Vec::new(),
        }
    }

    /// Returns the name of the function whose result is converted.
    pub(crate) fn function(&self) -> &'static str {
        self.function
    }

    /// Returns the warnings that the conversion produced.
    pub(crate) fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }

    /// Builds an error about the result of the current call.
    pub(crate) fn bad_result(&self, message: String) -> Failure {
        Failure::Script(ScriptError::BadResult {
            function: self.function,
            message,
        })
    }

    /// Counts `bytes` of output against the limit.
    pub(crate) fn charge(&mut self, bytes: usize) -> Result<(), Failure> {
        match self.remaining.checked_sub(bytes) {
            Some(remaining) => {
                self.remaining = remaining;
                Ok(())
            }
            None => Err(Failure::Script(ScriptError::OutputTooLarge {
                function: self.function,
                limit: self.limit,
            })),
        }
    }

    /// Reads `warnings` or `errors` from a result: an array of messages, a
    /// single string, or `undefined` or `null` for none. Messages that are
    /// not strings, such as Error objects, are converted with `String()`.
    pub(crate) fn messages(
        &mut self,
        value: Value<'_>,
        name: &str,
    ) -> Result<Vec<String>, Failure> {
        if value.is_undefined() || value.is_null() {
            return Ok(Vec::new());
        }
        if let Some(text) = value.as_string() {
            let text = text.to_string()?;
            self.charge(text.len() + 4)?;
            return Ok(vec![text]);
        }
        let Some(array) = value.as_array() else {
            return Err(self.bad_result(format!(
                "{name} is {}; it must be an array of strings",
                describe_type(&value)
            )));
        };

        let mut messages = Vec::new();
        let length = array_length(array.as_object())?.unwrap_or(0);
        for index in 0..length {
            self.charge(1)?;
            let item: Value = array.get(index)?;
            if item.is_undefined() || item.is_null() {
                continue;
            }
            if item.is_symbol() {
                return Err(self.bad_result(format!("{name}[{index}] is a symbol; use a string")));
            }
            let text = item.get::<rquickjs::Coerced<String>>()?.0;
            self.charge(text.len() + 4)?;
            messages.push(text);
        }
        Ok(messages)
    }

    /// Converts the object at `path` to a JSON object.
    pub(crate) fn object(
        &mut self,
        object: &Object<'_>,
        path: &mut Path,
    ) -> Result<Map<String, serde_json::Value>, Failure> {
        self.object_entries(object, path, 0)
    }

    /// Converts `value` at `path`. Returns `None` for `undefined`, which the
    /// caller leaves out or replaces.
    fn value(
        &mut self,
        value: Value<'_>,
        path: &mut Path,
        depth: usize,
    ) -> Result<Option<serde_json::Value>, Failure> {
        if depth > MAX_DEPTH {
            return Err(self.bad_result(format!(
                "{path} is nested more than {MAX_DEPTH} levels deep; circular references cannot be converted to JSON"
            )));
        }

        let json = match value.type_of() {
            Type::Uninitialized | Type::Undefined => return Ok(None),
            Type::Null => {
                self.charge(4)?;
                serde_json::Value::Null
            }
            Type::Bool => {
                self.charge(5)?;
                serde_json::Value::Bool(value.as_bool().unwrap_or_default())
            }
            Type::Int => {
                self.charge(11)?;
                serde_json::Value::from(value.as_int().unwrap_or_default())
            }
            Type::Float => {
                self.charge(24)?;
                self.number(value.as_float().unwrap_or(f64::NAN), path)?
            }
            Type::String => {
                let text: String = value.get()?;
                self.charge(text.len() + 2)?;
                serde_json::Value::String(text)
            }
            Type::BigInt => {
                self.charge(20)?;
                let Some(big) = value.as_big_int() else {
                    return Err(self.bad_result(format!("{path} is a BigInt that cannot be read")));
                };
                // BigInt::to_i64 wraps around outside the i64 range, so
                // the decimal text is parsed instead.
                let text = big
                    .clone()
                    .into_value()
                    .get::<rquickjs::Coerced<String>>()?
                    .0;
                if let Ok(integer) = text.parse::<i64>() {
                    serde_json::Value::from(integer)
                } else if let Ok(integer) = text.parse::<u64>() {
                    serde_json::Value::from(integer)
                } else {
                    return Err(self.bad_result(format!(
                        "{path} is a BigInt outside the 64-bit integer range; convert it to a string"
                    )));
                }
            }
            Type::Symbol => {
                return Err(self.bad_result(format!(
                    "{path} is a symbol, which JSON cannot represent; use a string"
                )));
            }
            Type::Function | Type::Constructor => {
                return Err(self.bad_result(format!(
                    "{path} is a function, which JSON cannot represent; call it and return its result"
                )));
            }
            Type::Promise => {
                return Err(self.bad_result(format!(
                    "{path} is a Promise; formatters must compute their result synchronously"
                )));
            }
            Type::Array => {
                let Some(array) = value.as_array() else {
                    return Err(self.bad_result(format!("{path} is an array that cannot be read")));
                };
                serde_json::Value::Array(self.array(array, path, depth)?)
            }
            Type::Object | Type::Exception | Type::Proxy => {
                let Some(object) = value.as_object() else {
                    return Err(self.bad_result(format!("{path} is an object that cannot be read")));
                };
                return self.composite(object, path, depth);
            }
            Type::Module | Type::Unknown => {
                return Err(self.bad_result(format!(
                    "{path} is a {}, which JSON cannot represent",
                    value.type_name()
                )));
            }
        };
        Ok(Some(json))
    }

    /// Converts an object that is not an array: through its `toJSON` method
    /// if it has one, as a typed array, or property by property.
    fn composite(
        &mut self,
        object: &Object<'_>,
        path: &mut Path,
        depth: usize,
    ) -> Result<Option<serde_json::Value>, Failure> {
        let to_json: Value = object.get("toJSON")?;
        if let Some(to_json) = to_json.as_function() {
            let key = path.last_key();
            let replacement: Value = to_json.call((This(object.clone()), key))?;
            return self.value(replacement, path, depth + 1);
        }

        if is_typed_array(object)
            && let Some(length) = array_length(object)?
        {
            self.charge(2)?;
            let mut array = Vec::with_capacity(length.min(1024));
            for index in 0..length {
                self.charge(1)?;
                let value = element(object, index)?;
                path.push(Segment::Index(index));
                let converted = self.value(value, path, depth + 1)?;
                path.pop();
                array.push(converted.unwrap_or(serde_json::Value::Null));
            }
            return Ok(Some(serde_json::Value::Array(array)));
        }

        Ok(Some(serde_json::Value::Object(
            self.object_entries(object, path, depth)?,
        )))
    }

    fn object_entries(
        &mut self,
        object: &Object<'_>,
        path: &mut Path,
        depth: usize,
    ) -> Result<Map<String, serde_json::Value>, Failure> {
        self.charge(2)?;
        let mut map = Map::new();
        for entry in object.props::<String, Value>() {
            let (key, value) = entry?;
            self.charge(key.len() + 4)?;
            path.push(Segment::Key(key.clone()));
            let converted = self.value(value, path, depth + 1)?;
            if converted.is_none() {
                self.warn(format!("{path} is undefined and was left out"))?;
            }
            path.pop();

            if let Some(json) = converted {
                map.insert(key, json);
            }
        }
        Ok(map)
    }

    fn array(
        &mut self,
        array: &Array<'_>,
        path: &mut Path,
        depth: usize,
    ) -> Result<Vec<serde_json::Value>, Failure> {
        self.charge(2)?;
        let length = array_length(array.as_object())?.unwrap_or(0);
        let mut items = Vec::with_capacity(length.min(1024));
        for index in 0..length {
            self.charge(1)?;
            let element: Value = array.get(index)?;
            path.push(Segment::Index(index));
            let converted = self.value(element, path, depth + 1)?;
            if converted.is_none() {
                self.warn(format!("{path} is undefined and was replaced by null"))?;
            }
            path.pop();
            items.push(converted.unwrap_or(serde_json::Value::Null));
        }
        Ok(items)
    }

    fn number(&mut self, number: f64, path: &Path) -> Result<serde_json::Value, Failure> {
        if number.is_finite() && number.fract() == 0.0 && number.abs() <= MAX_SAFE_INTEGER {
            // The range check above makes the cast exact; -0.0 becomes 0.
            return Ok(serde_json::Value::from(number as i64));
        }
        if let Some(number) = Number::from_f64(number) {
            return Ok(serde_json::Value::Number(number));
        }
        let name = if number.is_nan() { "NaN" } else { "infinite" };
        self.warn(format!(
            "{path} is {name}, which JSON cannot represent, and was replaced by null"
        ))?;
        Ok(serde_json::Value::Null)
    }

    fn warn(&mut self, message: String) -> Result<(), Failure> {
        self.charge(message.len() + 4)?;
        self.warnings.push(message);
        Ok(())
    }
}

/// Returns true if `object` is a typed array. `Float16Array` is not
/// recognised and is converted like a plain object with index keys, because
/// rquickjs reads it only with its `half` feature.
pub(crate) fn is_typed_array(object: &Object<'_>) -> bool {
    macro_rules! any_of {
        ($($item:ty),*) => {
            false $(|| object.is_typed_array::<$item>())*
        };
    }
    any_of!(
        u8,
        i8,
        u16,
        i16,
        u32,
        i32,
        u64,
        i64,
        f32,
        f64,
        rquickjs::U8Clamped
    )
}

/// Reads the `length` of an array or typed array, or returns `None` if it is
/// not a valid length. rquickjs's own `len` methods panic on lengths above
/// 2^31 - 1 and on a `length` that a script redefined, so they are not used.
pub(crate) fn array_length(object: &Object<'_>) -> rquickjs::Result<Option<usize>> {
    let length: Value = object.get("length")?;
    Ok(length
        .as_number()
        .filter(|length| *length >= 0.0 && length.fract() == 0.0)
        // Array lengths are below 2^32, so the cast is exact.
        .map(|length| length.min(f64::from(u32::MAX)) as usize))
}

/// Reads element `index` of an array or typed array.
pub(crate) fn element<'js>(object: &Object<'js>, index: usize) -> rquickjs::Result<Value<'js>> {
    // Arrays and typed arrays have fewer than 2^32 elements, so the index fits.
    object.get(u32::try_from(index).unwrap_or(u32::MAX))
}

/// Describes the type of a value for an error message.
pub(crate) fn describe_type(value: &Value<'_>) -> &'static str {
    match value.type_of() {
        Type::Uninitialized | Type::Undefined => "undefined",
        Type::Null => "null",
        Type::Bool => "a boolean",
        Type::Int | Type::Float => "a number",
        Type::String => "a string",
        Type::Symbol => "a symbol",
        Type::BigInt => "a BigInt",
        Type::Array => "an array",
        Type::Function | Type::Constructor => "a function",
        Type::Promise => "a Promise",
        Type::Object | Type::Exception | Type::Proxy => "an object",
        Type::Module | Type::Unknown => "a value of an unknown type",
    }
}

/// Location of a value inside a result, shown as `data.sensors[1].value`.
pub(crate) struct Path {
    segments: Vec<Segment>,
}

enum Segment {
    Key(String),
    Index(usize),
}

impl Path {
    pub(crate) fn new(root: &str) -> Path {
        Path {
            segments: vec![Segment::Key(root.to_owned())],
        }
    }

    fn push(&mut self, segment: Segment) {
        self.segments.push(segment);
    }

    fn pop(&mut self) {
        self.segments.pop();
    }

    /// Returns the key that `toJSON` receives: the last property name, or
    /// the index as a string.
    fn last_key(&self) -> String {
        match self.segments.last() {
            Some(Segment::Key(key)) => key.clone(),
            Some(Segment::Index(index)) => index.to_string(),
            None => String::new(),
        }
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (position, segment) in self.segments.iter().enumerate() {
            match segment {
                Segment::Index(index) => write!(f, "[{index}]")?,
                Segment::Key(key) if is_identifier(key) => {
                    if position > 0 {
                        f.write_str(".")?;
                    }
                    f.write_str(key)?;
                }
                Segment::Key(key) => write!(f, "[{key:?}]")?,
            }
        }
        Ok(())
    }
}

fn is_identifier(key: &str) -> bool {
    let mut chars = key.chars();
    chars
        .next()
        .is_some_and(|first| first.is_alphabetic() || first == '_' || first == '$')
        && chars.all(|c| c.is_alphanumeric() || c == '_' || c == '$')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_display() {
        let mut path = Path::new("data");
        path.push(Segment::Key("sensors".to_owned()));
        path.push(Segment::Index(1));
        path.push(Segment::Key("battery level".to_owned()));
        assert_eq!(path.to_string(), "data.sensors[1][\"battery level\"]");
    }
}
