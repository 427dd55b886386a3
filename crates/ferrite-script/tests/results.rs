//! Validation and conversion of what formatters return.

use ferrite_script::{DecodedPayload, Decoder, EncodedDownlink, Limits, ScriptError, UplinkInput};
use serde_json::json;

const INPUT: UplinkInput<'static> = UplinkInput {
    bytes: &[1, 2, 3],
    f_port: 1,
    recv_time_ms: 0,
};

/// Compiles a formatter whose `decodeUplink` returns `expression` and calls it once.
fn decode_returning(expression: &str) -> Result<DecodedPayload, ScriptError> {
    let source = format!("function decodeUplink(input) {{ return {expression}; }}");
    Decoder::compile(&source, Limits::default())?.decode_uplink(&INPUT)
}

/// Compiles a formatter whose `encodeDownlink` returns `expression` and calls it once.
fn encode_returning(expression: &str) -> Result<EncodedDownlink, ScriptError> {
    let source = format!(
        "function decodeUplink(input) {{ return {{ data: {{}} }}; }}
         function encodeDownlink(input) {{ return {expression}; }}"
    );
    Decoder::compile(&source, Limits::default())?.encode_downlink(&json!({}))
}

fn bad_result_message(result: Result<impl std::fmt::Debug, ScriptError>) -> String {
    match result {
        Err(ScriptError::BadResult { message, .. }) => message,
        other => panic!("expected BadResult, got {other:?}"),
    }
}

#[test]
fn result_not_an_object() {
    let cases = [
        ("undefined", "it is not an object"),
        ("42", "it is not an object"),
        ("'text'", "it is not an object"),
        ("[1, 2]", "it is an array"),
        ("function () {}", "it is a function"),
    ];
    for (expression, expected) in cases {
        let message = bad_result_message(decode_returning(expression));
        assert!(message.starts_with(expected), "{expression}: {message}");
    }
}

#[test]
fn result_without_data_or_errors() {
    let message = bad_result_message(decode_returning("{ warnings: ['w'] }"));
    assert!(
        message.starts_with("it has neither data nor errors"),
        "{message}"
    );
}

#[test]
fn data_not_an_object() {
    let cases = [
        ("{ data: [1, 2] }", "data is an array"),
        ("{ data: 21.5 }", "data is a number"),
        ("{ data: 'x' }", "data is a string"),
        ("{ data: true }", "data is a boolean"),
    ];
    for (expression, expected) in cases {
        let message = bad_result_message(decode_returning(expression));
        assert!(message.starts_with(expected), "{expression}: {message}");
    }
}

#[test]
fn async_function_is_rejected() {
    let source = "async function decodeUplink(input) { return { data: {} }; }";
    let error = Decoder::compile(source, Limits::default())
        .unwrap()
        .decode_uplink(&INPUT)
        .unwrap_err();
    let message = bad_result_message(Err::<(), _>(error));
    assert!(message.contains("Promise"), "{message}");
}

#[test]
fn nan_and_infinity_become_null_with_warning() {
    let decoded =
        decode_returning("{ data: { a: NaN, b: Infinity, c: -Infinity, d: 1 } }").unwrap();
    assert_eq!(
        serde_json::Value::Object(decoded.data),
        json!({ "a": null, "b": null, "c": null, "d": 1 })
    );
    assert_eq!(
        decoded.warnings,
        vec![
            "data.a is NaN, which JSON cannot represent, and was replaced by null",
            "data.b is infinite, which JSON cannot represent, and was replaced by null",
            "data.c is infinite, which JSON cannot represent, and was replaced by null",
        ]
    );
}

#[test]
fn undefined_left_out_with_warning() {
    let decoded =
        decode_returning("{ data: { a: undefined, list: [1, undefined] }, warnings: ['own'] }")
            .unwrap();
    assert_eq!(
        serde_json::Value::Object(decoded.data),
        json!({ "list": [1, null] })
    );
    assert_eq!(
        decoded.warnings,
        vec![
            "own",
            "data.a is undefined and was left out",
            "data.list[1] is undefined and was replaced by null",
        ]
    );
}

#[test]
fn function_value_names_key() {
    let message = bad_result_message(decode_returning(
        "{ data: { sensors: [{ ok: 1 }, { read: function () {} }] } }",
    ));
    assert_eq!(
        message,
        "data.sensors[1].read is a function, which JSON cannot represent; call it and return its result"
    );
}

#[test]
fn symbol_value_names_key() {
    let message = bad_result_message(decode_returning("{ data: { 'odd key': Symbol('s') } }"));
    assert!(
        message.starts_with("data[\"odd key\"] is a symbol"),
        "{message}"
    );
}

#[test]
fn bigint_values() {
    let decoded = decode_returning("{ data: { counter: 9007199254740993n } }").unwrap();
    assert_eq!(decoded.data["counter"], json!(9_007_199_254_740_993_i64));

    let message = bad_result_message(decode_returning("{ data: { big: 2n ** 70n } }"));
    assert!(
        message.starts_with("data.big is a BigInt outside"),
        "{message}"
    );
}

#[test]
fn circular_reference_rejected() {
    let source = "function decodeUplink(input) {
        var data = { name: 'loop' };
        data.self = data;
        return { data: data };
    }";
    let error = Decoder::compile(source, Limits::default())
        .unwrap()
        .decode_uplink(&INPUT)
        .unwrap_err();
    let message = bad_result_message(Err::<(), _>(error));
    assert!(message.contains("circular references"), "{message}");
}

#[test]
fn date_typed_array_and_to_json() {
    let decoded = decode_returning(
        "{ data: {
            at: new Date(Date.UTC(2024, 0, 2, 3, 4, 5)),
            raw: new Uint8Array([1, 2, 255]),
            signed: new Int16Array([-2, 3]),
            custom: { toJSON: function (key) { return key + '!'; } }
        } }",
    )
    .unwrap();
    assert_eq!(
        serde_json::Value::Object(decoded.data),
        json!({
            "at": "2024-01-02T03:04:05.000Z",
            "raw": [1, 2, 255],
            "signed": [-2, 3],
            "custom": "custom!"
        })
    );
}

#[test]
fn output_too_large() {
    let source = "function decodeUplink(input) {
        return { data: { text: 'x'.repeat(300 * 1024) } };
    }";
    let error = Decoder::compile(source, Limits::default())
        .unwrap()
        .decode_uplink(&INPUT)
        .unwrap_err();
    assert_eq!(
        error,
        ScriptError::OutputTooLarge {
            function: "decodeUplink",
            limit: 256 * 1024
        }
    );
}

#[test]
fn sparse_array_output_bounded() {
    // Four billion holes must stop at the output limit, not run for minutes.
    let source = "function decodeUplink(input) {
        var list = [];
        list.length = 4294967295;
        return { data: { list: list } };
    }";
    let started = std::time::Instant::now();
    let error = Decoder::compile(source, Limits::default())
        .unwrap()
        .decode_uplink(&INPUT)
        .unwrap_err();
    assert!(
        matches!(error, ScriptError::OutputTooLarge { .. }),
        "{error:?}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
}

#[test]
fn errors_in_other_shapes() {
    let error = decode_returning("{ errors: 'single message' }").unwrap_err();
    assert_eq!(
        error,
        ScriptError::ReturnedErrors {
            function: "decodeUplink",
            errors: vec!["single message".to_owned()],
            warnings: vec![],
        }
    );

    let error =
        decode_returning("{ errors: [new Error('bad header')], warnings: ['w1'] }").unwrap_err();
    assert_eq!(
        error,
        ScriptError::ReturnedErrors {
            function: "decodeUplink",
            errors: vec!["Error: bad header".to_owned()],
            warnings: vec!["w1".to_owned()],
        }
    );

    // An empty errors array means success.
    let decoded = decode_returning("{ data: { a: 1 }, errors: [] }").unwrap();
    assert_eq!(decoded.data["a"], json!(1));
}

#[test]
fn warnings_wrong_type() {
    let message = bad_result_message(decode_returning("{ data: {}, warnings: 5 }"));
    assert_eq!(
        message,
        "warnings is a number; it must be an array of strings"
    );
}

#[test]
fn getter_exception_reported() {
    let error = decode_returning(
        "{ data: Object.defineProperty({}, 'x', { enumerable: true, get: function () { throw new Error('no x'); } }) }",
    )
    .unwrap_err();
    let ScriptError::Exception { message, .. } = error else {
        panic!("expected Exception, got {error:?}");
    };
    assert_eq!(message, "Error: no x");
}

#[test]
fn encode_missing_bytes() {
    let message = bad_result_message(encode_returning("{ fPort: 1 }"));
    assert!(
        message.starts_with("it has neither bytes nor errors"),
        "{message}"
    );
}

#[test]
fn encode_invalid_bytes() {
    let cases = [
        (
            "{ bytes: 'AQID' }",
            "bytes is a string; it must be an array of integers from 0 to 255",
        ),
        (
            "{ bytes: [1, 256] }",
            "bytes[1] is 256; each byte must be an integer from 0 to 255",
        ),
        (
            "{ bytes: [1.5] }",
            "bytes[0] is 1.5; each byte must be an integer from 0 to 255",
        ),
        (
            "{ bytes: [-1] }",
            "bytes[0] is -1; each byte must be an integer from 0 to 255",
        ),
        (
            "{ bytes: ['1'] }",
            "bytes[0] is a string; each byte must be an integer from 0 to 255",
        ),
        (
            "{ bytes: [1, , 3] }",
            "bytes[1] is undefined; each byte must be an integer from 0 to 255",
        ),
        (
            "{ bytes: { length: 1 } }",
            "bytes is an object; it must be an array of integers from 0 to 255",
        ),
    ];
    for (expression, expected) in cases {
        let message = bad_result_message(encode_returning(expression));
        assert_eq!(message, expected, "{expression}");
    }
}

#[test]
fn encode_f_port_range() {
    assert_eq!(encode_returning("{ bytes: [1] }").unwrap().f_port, None);
    assert_eq!(
        encode_returning("{ bytes: [1], fPort: 223 }")
            .unwrap()
            .f_port,
        Some(223)
    );

    let cases = [
        (
            "{ bytes: [1], fPort: 0 }",
            "fPort is 0; it must be an integer from 1 to 223",
        ),
        (
            "{ bytes: [1], fPort: 224 }",
            "fPort is 224; it must be an integer from 1 to 223",
        ),
        (
            "{ bytes: [1], fPort: 2.5 }",
            "fPort is 2.5; it must be an integer from 1 to 223",
        ),
        (
            "{ bytes: [1], fPort: '2' }",
            "fPort is a string; it must be an integer from 1 to 223",
        ),
    ];
    for (expression, expected) in cases {
        let message = bad_result_message(encode_returning(expression));
        assert_eq!(message, expected, "{expression}");
    }
}

#[test]
fn encode_receives_data() {
    let source = "function decodeUplink(input) { return { data: {} }; }
        function encodeDownlink(input) {
            return { bytes: [input.data.list.length, input.data.nested.value], fPort: 2 };
        }";
    let mut decoder = Decoder::compile(source, Limits::default()).unwrap();
    let encoded = decoder
        .encode_downlink(&json!({ "list": [1, 2, 3], "nested": { "value": 200 } }))
        .unwrap();
    assert_eq!(encoded.bytes, vec![3, 200]);
    assert_eq!(encoded.f_port, Some(2));
}
