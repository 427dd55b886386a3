//! The public entry point: a compiled payload formatter and its calls.

use std::fmt;

use rquickjs::{Array, Constructor, Ctx, Object, Value};
use serde_json::Map;

use crate::convert::{Converter, Path, array_length, describe_type, element, is_typed_array};
use crate::engine::{Call, Engine, Failure};
use crate::{Limits, ScriptError};

/// Maximum absolute time value of a JavaScript `Date`, in milliseconds from the
/// Unix epoch in either direction (ECMAScript's time value range).
const MAX_DATE_MS: i64 = 8_640_000_000_000_000;

/// LoRaWAN application ports; 0 carries MAC commands and 224 the test
/// protocol, so formatters must not choose them.
const F_PORT_RANGE: std::ops::RangeInclusive<u8> = 1..=223;

/// Input of [`Decoder::decode_uplink`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UplinkInput<'a> {
    /// The decrypted FRMPayload, passed to the script as `input.bytes`, an
    /// array of numbers from 0 to 255.
    pub bytes: &'a [u8],
    /// The LoRaWAN FPort, passed as `input.fPort`.
    pub f_port: u8,
    /// Time the uplink was received, in milliseconds since the Unix epoch,
    /// passed as `input.recvTime`, a `Date`.
    pub recv_time_ms: i64,
}

/// Input of [`Decoder::decode_downlink`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DownlinkInput<'a> {
    /// The FRMPayload, passed as `input.bytes`.
    pub bytes: &'a [u8],
    /// The LoRaWAN FPort, passed as `input.fPort`.
    pub f_port: u8,
}

/// A successful result of `decodeUplink` or `decodeDownlink`.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedPayload {
    /// The `data` object the script returned.
    pub data: Map<String, serde_json::Value>,
    /// The script's `warnings`, followed by warnings about values that JSON
    /// cannot represent, such as `data.temperature is NaN, which JSON cannot
    /// represent, and was replaced by null`.
    pub warnings: Vec<String>,
}

/// A successful result of `encodeDownlink`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedDownlink {
    /// The FRMPayload the script returned as `bytes`.
    pub bytes: Vec<u8>,
    /// The FPort the script chose, if it returned one.
    pub f_port: Option<u8>,
    /// The script's `warnings`.
    pub warnings: Vec<String>,
}

/// A payload formatter compiled from JavaScript source.
///
/// A decoder keeps the script's global state from one call to the next,
/// except after a call that ends in a timeout, memory exhaustion or a stack
/// overflow: then it discards the state and evaluates the source again
/// before its next call. [`Decoder::reset`] does the same on request.
///
/// A decoder is neither `Send` nor `Sync`, because the QuickJS runtime it
/// owns is bound to one thread. Create one per worker thread.
pub struct Decoder {
    source: String,
    limits: Limits,
    /// `None` after a resource limit was hit or after [`Decoder::reset`];
    /// the next call evaluates the source again.
    engine: Option<Engine>,
}

impl Decoder {
    /// Compiles `source` and runs its top-level code under `limits`.
    ///
    /// Fails if a limit is zero, the source is too long, the source has a
    /// syntax error (with its line and column), the top-level code throws or
    /// hits a limit, or the script defines no `decodeUplink` function.
    pub fn compile(source: &str, limits: Limits) -> Result<Decoder, ScriptError> {
        limits.validate()?;
        if source.len() > limits.max_source_bytes {
            return Err(ScriptError::SourceTooLarge {
                size: source.len(),
                limit: limits.max_source_bytes,
            });
        }

        // rquickjs passes the source as a C string, which cannot contain NUL.
        if let Some(offset) = source.find('\0') {
            let before = &source[..offset];
            let line = before.matches('\n').count() + 1;
            let column = before
                .rsplit('\n')
                .next()
                .unwrap_or_default()
                .chars()
                .count()
                + 1;
            return Err(ScriptError::Syntax {
                message: "the source contains a NUL character; remove it".to_owned(),
                line: u32::try_from(line).unwrap_or(u32::MAX),
                column: u32::try_from(column).unwrap_or(u32::MAX),
            });
        }

        let engine = Engine::new(source, &limits)?;
        Ok(Decoder {
            source: source.to_owned(),
            limits,
            engine: Some(engine),
        })
    }

    /// Returns the limits the decoder was compiled with.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Discards the script's global state. The next call evaluates the
    /// source again, which takes about as long as [`Decoder::compile`].
    pub fn reset(&mut self) {
        self.engine = None;
    }

    /// Calls `decodeUplink({ bytes, fPort, recvTime })`.
    ///
    /// Fails with [`ScriptError::ReturnedErrors`] if the script returns a
    /// non-empty `errors` array, and with [`ScriptError::BadResult`] if it
    /// returns no `data` object.
    pub fn decode_uplink(
        &mut self,
        input: &UplinkInput<'_>,
    ) -> Result<DecodedPayload, ScriptError> {
        if !(-MAX_DATE_MS..=MAX_DATE_MS).contains(&input.recv_time_ms) {
            return Err(ScriptError::InvalidInput(format!(
                "recv_time_ms {} is outside the range of a JavaScript Date (±{MAX_DATE_MS} ms from 1970-01-01)",
                input.recv_time_ms
            )));
        }
        self.call(&DecodeUplink(*input))
    }

    /// Calls `encodeDownlink({ data })`.
    ///
    /// Fails with [`ScriptError::MissingFunction`] if the script defines no
    /// `encodeDownlink`, and with [`ScriptError::ReturnedErrors`] if it
    /// returns a non-empty `errors` array. Fails with
    /// [`ScriptError::BadResult`] if `bytes` is missing or contains a value
    /// that is not an integer from 0 to 255. The same applies if `fPort` is
    /// present but not an integer from 1 to 223.
    pub fn encode_downlink(
        &mut self,
        data: &serde_json::Value,
    ) -> Result<EncodedDownlink, ScriptError> {
        self.call(&EncodeDownlink(data))
    }

    /// Calls `decodeDownlink({ bytes, fPort })`, which decodes a downlink
    /// payload back into the object `encodeDownlink` took.
    ///
    /// Fails like [`Decoder::decode_uplink`], and with
    /// [`ScriptError::MissingFunction`] if the script defines no
    /// `decodeDownlink`.
    pub fn decode_downlink(
        &mut self,
        input: &DownlinkInput<'_>,
    ) -> Result<DecodedPayload, ScriptError> {
        self.call(&DecodeDownlink(*input))
    }

    fn call<C: Call>(&mut self, call: &C) -> Result<C::Output, ScriptError> {
        let engine = match &mut self.engine {
            Some(engine) => engine,
            None => self.engine.insert(Engine::new(&self.source, &self.limits)?),
        };

        let result = engine.call(call);
        if let Err(error) = &result
            && error.is_resource_limit()
        {
            self.engine = None;
        }
        result
    }
}

impl fmt::Debug for Decoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decoder")
            .field("source_bytes", &self.source.len())
            .field("limits", &self.limits)
            .field("evaluated", &self.engine.is_some())
            .finish()
    }
}

struct DecodeUplink<'a>(UplinkInput<'a>);

impl Call for DecodeUplink<'_> {
    type Output = DecodedPayload;

    fn function(&self) -> &'static str {
        "decodeUplink"
    }

    fn input<'js>(&self, ctx: &Ctx<'js>, date: &Constructor<'js>) -> rquickjs::Result<Value<'js>> {
        let input = payload_input(ctx, self.0.bytes, self.0.f_port)?;
        // The range check in `decode_uplink` keeps the time value exact in an f64.
        let recv_time: Value = date.construct((self.0.recv_time_ms as f64,))?;
        input.set("recvTime", recv_time)?;
        Ok(input.into_value())
    }

    fn output<'js>(
        &self,
        result: Value<'js>,
        converter: &mut Converter,
    ) -> Result<DecodedPayload, Failure> {
        decoded_payload(result, converter)
    }
}

struct DecodeDownlink<'a>(DownlinkInput<'a>);

impl Call for DecodeDownlink<'_> {
    type Output = DecodedPayload;

    fn function(&self) -> &'static str {
        "decodeDownlink"
    }

    fn input<'js>(&self, ctx: &Ctx<'js>, _date: &Constructor<'js>) -> rquickjs::Result<Value<'js>> {
        Ok(payload_input(ctx, self.0.bytes, self.0.f_port)?.into_value())
    }

    fn output<'js>(
        &self,
        result: Value<'js>,
        converter: &mut Converter,
    ) -> Result<DecodedPayload, Failure> {
        decoded_payload(result, converter)
    }
}

struct EncodeDownlink<'a>(&'a serde_json::Value);

impl Call for EncodeDownlink<'_> {
    type Output = EncodedDownlink;

    fn function(&self) -> &'static str {
        "encodeDownlink"
    }

    fn input<'js>(&self, ctx: &Ctx<'js>, _date: &Constructor<'js>) -> rquickjs::Result<Value<'js>> {
        // Serializing a serde_json::Value cannot fail, because its map keys are
        // always strings.
        let text = serde_json::to_string(self.0).unwrap_or_else(|_| "null".to_owned());
        let data = ctx.json_parse(text)?;
        let input = Object::new(ctx.clone())?;
        input.set("data", data)?;
        Ok(input.into_value())
    }

    fn output<'js>(
        &self,
        result: Value<'js>,
        converter: &mut Converter,
    ) -> Result<EncodedDownlink, Failure> {
        let result = result_object(result, converter)?;
        let (warnings, errors) = messages(&result, converter)?;
        if !errors.is_empty() {
            return Err(returned_errors(converter, errors, warnings));
        }

        let bytes = frm_payload(result.get("bytes")?, converter)?;
        let f_port = f_port(result.get("fPort")?, converter)?;
        Ok(EncodedDownlink {
            bytes,
            f_port,
            warnings,
        })
    }
}

/// Builds `{ bytes, fPort }` with `bytes` as a plain array of numbers, as
/// The Things Stack passes it.
fn payload_input<'js>(ctx: &Ctx<'js>, bytes: &[u8], f_port: u8) -> rquickjs::Result<Object<'js>> {
    let array = Array::new(ctx.clone())?;
    for (index, byte) in bytes.iter().enumerate() {
        array.set(index, i32::from(*byte))?;
    }
    let input = Object::new(ctx.clone())?;
    input.set("bytes", array)?;
    input.set("fPort", i32::from(f_port))?;
    Ok(input)
}

/// Reads the result of `decodeUplink` or `decodeDownlink`.
fn decoded_payload(
    result: Value<'_>,
    converter: &mut Converter,
) -> Result<DecodedPayload, Failure> {
    let result = result_object(result, converter)?;
    let (mut warnings, errors) = messages(&result, converter)?;
    if !errors.is_empty() {
        return Err(returned_errors(converter, errors, warnings));
    }

    let data: Value = result.get("data")?;
    if data.is_undefined() || data.is_null() {
        return Err(converter.bad_result(
            "it has neither data nor errors; return { data: { ... } } on success or { errors: [\"...\"] } on failure"
                .to_owned(),
        ));
    }
    let object = match data.as_object() {
        Some(object) if !data.is_array() && !data.is_function() && !data.is_promise() => object,
        _ => {
            return Err(converter.bad_result(format!(
                "data is {}; it must be an object such as {{ temperature: 21.5 }}",
                describe_type(&data)
            )));
        }
    };

    let data = converter.object(object, &mut Path::new("data"))?;
    warnings.extend(converter.take_warnings());
    Ok(DecodedPayload { data, warnings })
}

/// Checks that a function returned an object.
fn result_object<'js>(result: Value<'js>, converter: &Converter) -> Result<Object<'js>, Failure> {
    if result.is_promise() {
        return Err(converter.bad_result(
            "it is a Promise; formatters must return their result directly, not from an async function"
                .to_owned(),
        ));
    }
    match result.into_object() {
        Some(object) if !object.is_array() && !object.is_function() => Ok(object),
        other => {
            let described = other
                .map(|object| describe_type(object.as_value()))
                .unwrap_or("not an object");
            Err(converter.bad_result(format!(
                "it is {described}; it must be an object such as {{ data: {{ ... }}, warnings: [], errors: [] }}"
            )))
        }
    }
}

/// Reads `warnings` and `errors` from a result object.
fn messages(
    result: &Object<'_>,
    converter: &mut Converter,
) -> Result<(Vec<String>, Vec<String>), Failure> {
    let warnings = converter.messages(result.get("warnings")?, "warnings")?;
    let errors = converter.messages(result.get("errors")?, "errors")?;
    Ok((warnings, errors))
}

fn returned_errors(converter: &Converter, errors: Vec<String>, warnings: Vec<String>) -> Failure {
    Failure::Script(ScriptError::ReturnedErrors {
        function: converter.function(),
        errors,
        warnings,
    })
}

/// Reads `bytes` from the result of `encodeDownlink`: an array or typed array
/// of integers from 0 to 255.
fn frm_payload(value: Value<'_>, converter: &mut Converter) -> Result<Vec<u8>, Failure> {
    if value.is_undefined() || value.is_null() {
        return Err(converter.bad_result(
            "it has neither bytes nor errors; return { bytes: [...], fPort: 1 } on success or { errors: [\"...\"] } on failure"
                .to_owned(),
        ));
    }
    let not_an_array = |converter: &Converter| {
        converter.bad_result(format!(
            "bytes is {}; it must be an array of integers from 0 to 255",
            describe_type(&value)
        ))
    };
    let Some(object) = value.as_object() else {
        return Err(not_an_array(converter));
    };
    if !object.is_array() && !is_typed_array(object) {
        return Err(not_an_array(converter));
    }
    let Some(length) = array_length(object)? else {
        return Err(not_an_array(converter));
    };

    let mut bytes = Vec::with_capacity(length.min(256));
    for index in 0..length {
        converter.charge(4)?;
        let element = element(object, index)?;
        let byte = element
            .as_number()
            .filter(|number| number.fract() == 0.0 && (0.0..=255.0).contains(number));
        match byte {
            // The filter above makes the cast exact.
            Some(byte) => bytes.push(byte as u8),
            None => {
                return Err(converter.bad_result(format!(
                    "bytes[{index}] is {}; each byte must be an integer from 0 to 255",
                    describe_value(&element)
                )));
            }
        }
    }
    Ok(bytes)
}

/// Reads the optional `fPort` from the result of `encodeDownlink`.
fn f_port(value: Value<'_>, converter: &Converter) -> Result<Option<u8>, Failure> {
    if value.is_undefined() || value.is_null() {
        return Ok(None);
    }
    let port = value
        .as_number()
        .filter(|number| number.fract() == 0.0)
        .filter(|number| {
            (f64::from(*F_PORT_RANGE.start())..=f64::from(*F_PORT_RANGE.end())).contains(number)
        });
    match port {
        // The filter above makes the cast exact.
        Some(port) => Ok(Some(port as u8)),
        None => Err(converter.bad_result(format!(
            "fPort is {}; it must be an integer from {} to {}",
            describe_value(&value),
            F_PORT_RANGE.start(),
            F_PORT_RANGE.end()
        ))),
    }
}

/// Describes a small value for an error message: numbers by value, other
/// values by type.
fn describe_value(value: &Value<'_>) -> String {
    match value.as_number() {
        Some(number) => number.to_string(),
        None => describe_type(value).to_owned(),
    }
}
