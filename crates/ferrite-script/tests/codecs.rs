//! Realistic payload formatters written for these tests in the style of The
//! Things Stack device repository, run through the public API.

use ferrite_script::{Decoder, DownlinkInput, Limits, ScriptError, UplinkInput};
use serde_json::json;

const TEMPERATURE_HUMIDITY: &str = include_str!("codecs/temperature_humidity.js");
const MULTI_PORT: &str = include_str!("codecs/multi_port.js");
const WEATHER_STATION: &str = include_str!("codecs/weather_station.js");
const THERMOSTAT: &str = include_str!("codecs/thermostat.js");

/// 2024-05-01T12:00:00Z in milliseconds.
const RECV_TIME_MS: i64 = 1_714_564_800_000;

fn compile(source: &str) -> Decoder {
    match Decoder::compile(source, Limits::default()) {
        Ok(decoder) => decoder,
        Err(error) => panic!("compile failed: {error}"),
    }
}

fn uplink(bytes: &[u8], f_port: u8) -> UplinkInput<'_> {
    UplinkInput {
        bytes,
        f_port,
        recv_time_ms: RECV_TIME_MS,
    }
}

#[test]
fn temperature_positive_and_negative() {
    let mut decoder = compile(TEMPERATURE_HUMIDITY);

    // 23.45 °C, 51.2 %, 87 % battery.
    let decoded = decoder
        .decode_uplink(&uplink(&[0x09, 0x29, 0x02, 0x00, 87], 1))
        .unwrap();
    assert_eq!(
        serde_json::Value::Object(decoded.data),
        json!({ "temperature": 23.45, "humidity": 51.2, "battery": 87 })
    );
    assert!(decoded.warnings.is_empty());

    // -12.5 °C is 0xFB1E as a signed 16-bit value.
    let decoded = decoder
        .decode_uplink(&uplink(&[0xFB, 0x1E, 0x01, 0xF4, 10], 1))
        .unwrap();
    assert_eq!(decoded.data["temperature"], json!(-12.5));
    assert_eq!(decoded.data["humidity"], json!(50));
}

#[test]
fn temperature_integral_value_stays_integer() {
    let mut decoder = compile(TEMPERATURE_HUMIDITY);

    // 20.00 °C must come out as the JSON integer 20, not 20.0.
    let decoded = decoder
        .decode_uplink(&uplink(&[0x07, 0xD0, 0x01, 0xF4, 50], 1))
        .unwrap();
    assert_eq!(
        serde_json::to_string(&decoded.data["temperature"]).unwrap(),
        "20"
    );
}

#[test]
fn temperature_humidity_warning() {
    let mut decoder = compile(TEMPERATURE_HUMIDITY);

    // Humidity 0x0400 = 102.4 %.
    let decoded = decoder
        .decode_uplink(&uplink(&[0x00, 0x00, 0x04, 0x00, 50], 1))
        .unwrap();
    assert_eq!(decoded.data["humidity"], json!(102.4));
    assert_eq!(decoded.warnings, vec!["humidity above 100 %: 102.4"]);
}

#[test]
fn temperature_bad_length_returns_errors() {
    let mut decoder = compile(TEMPERATURE_HUMIDITY);

    let error = decoder
        .decode_uplink(&uplink(&[0x09, 0x29], 1))
        .unwrap_err();
    assert_eq!(
        error,
        ScriptError::ReturnedErrors {
            function: "decodeUplink",
            errors: vec!["expected 5 bytes, got 2".to_owned()],
            warnings: vec![],
        }
    );
    assert_eq!(
        error.to_string(),
        "decodeUplink returned errors: expected 5 bytes, got 2"
    );

    // The decoder keeps working after a returned error.
    assert!(decoder.decode_uplink(&uplink(&[0, 0, 0, 0, 0], 1)).is_ok());
}

#[test]
fn multi_port_each_port() {
    let mut decoder = compile(MULTI_PORT);

    let status = decoder.decode_uplink(&uplink(&[60, 0b11], 1)).unwrap();
    assert_eq!(
        serde_json::Value::Object(status.data),
        json!({ "type": "status", "batteryVoltage": 3.2, "moving": true, "buttonPressed": true })
    );

    // 52.5200066, 13.4049540, altitude -12 m.
    let latitude = 525_200_066_i32.to_be_bytes();
    let longitude = 134_049_540_i32.to_be_bytes();
    let altitude = (-12_i16).to_be_bytes();
    let mut position = Vec::new();
    position.extend_from_slice(&latitude);
    position.extend_from_slice(&longitude);
    position.extend_from_slice(&altitude);
    let decoded = decoder.decode_uplink(&uplink(&position, 2)).unwrap();
    assert_eq!(
        serde_json::Value::Object(decoded.data),
        json!({ "type": "position", "latitude": 52.5200066, "longitude": 13.404954, "altitude": -12 })
    );

    let mut counters = Vec::new();
    counters.extend_from_slice(&4_000_000_000_u32.to_le_bytes());
    counters.extend_from_slice(&7_u32.to_le_bytes());
    let decoded = decoder.decode_uplink(&uplink(&counters, 3)).unwrap();
    assert_eq!(decoded.data["counters"], json!([4_000_000_000_u64, 7]));
}

#[test]
fn multi_port_unknown_port() {
    let mut decoder = compile(MULTI_PORT);

    let error = decoder.decode_uplink(&uplink(&[1, 2, 3], 9)).unwrap_err();
    let ScriptError::ReturnedErrors { errors, .. } = error else {
        panic!("expected ReturnedErrors, got {error:?}");
    };
    assert_eq!(errors, vec!["unknown fPort 9"]);
}

fn weather_payload(battery: u8) -> Vec<u8> {
    let mut bytes = b"WS01".to_vec();
    bytes.extend_from_slice(&1013.25_f32.to_be_bytes());
    bytes.extend_from_slice(&523_u16.to_be_bytes());
    bytes.push(6); // SE
    bytes.push(30); // measured 30 s before reception
    bytes.push(battery);
    bytes
}

#[test]
fn weather_station_helpers_and_date() {
    let mut decoder = compile(WEATHER_STATION);

    let decoded = decoder
        .decode_uplink(&uplink(&weather_payload(80), 5))
        .unwrap();
    assert_eq!(
        serde_json::Value::Object(decoded.data),
        json!({
            "station": "WS01",
            "pressure": 1013.3,
            "wind": { "speed": 5.23, "direction": "SE" },
            "battery": 80,
            "measuredAt": "2024-05-01T11:59:30.000Z"
        })
    );
    assert!(decoded.warnings.is_empty());
}

#[test]
fn weather_station_low_battery_warning() {
    let mut decoder = compile(WEATHER_STATION);

    let decoded = decoder
        .decode_uplink(&uplink(&weather_payload(15), 5))
        .unwrap();
    assert_eq!(decoded.warnings, vec!["battery low: 15 %"]);
    assert_eq!(decoded.data["battery"], json!(15));
}

#[test]
fn weather_station_short_payload() {
    let mut decoder = compile(WEATHER_STATION);

    let error = decoder.decode_uplink(&uplink(b"WS01", 5)).unwrap_err();
    assert_eq!(
        error,
        ScriptError::ReturnedErrors {
            function: "decodeUplink",
            errors: vec!["payload too short: 4 bytes, expected 13".to_owned()],
            warnings: vec![],
        }
    );
}

#[test]
fn thermostat_encode_commands() {
    let mut decoder = compile(THERMOSTAT);

    let encoded = decoder
        .encode_downlink(&json!({ "setpoint": 21.5 }))
        .unwrap();
    assert_eq!(encoded.bytes, vec![0x01, 43]);
    assert_eq!(encoded.f_port, Some(10));
    assert!(encoded.warnings.is_empty());

    let encoded = decoder
        .encode_downlink(&json!({ "intervalMinutes": 2000 }))
        .unwrap();
    assert_eq!(encoded.bytes, vec![0x02, 0x05, 0xA0]);
    assert_eq!(encoded.warnings, vec!["interval clamped to 1440 minutes"]);

    // A Uint8Array is accepted as well as a plain array.
    let encoded = decoder.encode_downlink(&json!({ "reboot": true })).unwrap();
    assert_eq!(encoded.bytes, vec![0xFF]);
}

#[test]
fn thermostat_encode_errors() {
    let mut decoder = compile(THERMOSTAT);

    let error = decoder
        .encode_downlink(&json!({ "setpoint": 40 }))
        .unwrap_err();
    assert_eq!(
        error,
        ScriptError::ReturnedErrors {
            function: "encodeDownlink",
            errors: vec!["setpoint must be between 5 and 30 °C".to_owned()],
            warnings: vec![],
        }
    );

    let error = decoder
        .encode_downlink(&json!({ "colour": "red" }))
        .unwrap_err();
    assert!(
        matches!(error, ScriptError::ReturnedErrors { .. }),
        "{error:?}"
    );
}

#[test]
fn thermostat_downlink_round_trip() {
    let mut decoder = compile(THERMOSTAT);

    for command in [
        json!({ "setpoint": 19.5 }),
        json!({ "intervalMinutes": 15 }),
        json!({ "reboot": true }),
    ] {
        let encoded = decoder.encode_downlink(&command).unwrap();
        let decoded = decoder
            .decode_downlink(&DownlinkInput {
                bytes: &encoded.bytes,
                f_port: encoded.f_port.unwrap(),
            })
            .unwrap();
        assert_eq!(serde_json::Value::Object(decoded.data), command);
    }
}

#[test]
fn encode_without_function_is_missing() {
    let mut decoder = compile(TEMPERATURE_HUMIDITY);

    let error = decoder
        .encode_downlink(&json!({ "setpoint": 20 }))
        .unwrap_err();
    assert_eq!(
        error,
        ScriptError::MissingFunction {
            name: "encodeDownlink"
        }
    );
    let error = decoder
        .decode_downlink(&DownlinkInput {
            bytes: &[1],
            f_port: 10,
        })
        .unwrap_err();
    assert_eq!(
        error,
        ScriptError::MissingFunction {
            name: "decodeDownlink"
        }
    );
}
