use ferrite_core::Value;

use super::*;

/// Decodes a hex dump, ignoring whitespace.
fn from_hex(dump: &str) -> Vec<u8> {
    let digits: Vec<u8> = dump
        .bytes()
        .filter(|byte| !byte.is_ascii_whitespace())
        .collect();
    digits
        .chunks(2)
        .map(|pair| {
            let text = std::str::from_utf8(pair).expect("ASCII hex");
            u8::from_str_radix(text, 16).expect("hex digits")
        })
        .collect()
}

fn decode_hex(dump: &str) -> Vec<(String, Value)> {
    decode(&from_hex(dump)).unwrap_or_else(|error| panic!("{dump}: {error}"))
}

fn decode_error(dump: &str) -> LppError {
    match decode(&from_hex(dump)) {
        Ok(values) => panic!("{dump}: expected an error, got {values:?}"),
        Err(error) => error,
    }
}

fn values(pairs: &[(&str, Value)]) -> Vec<(String, Value)> {
    pairs
        .iter()
        .map(|(key, value)| ((*key).to_owned(), value.clone()))
        .collect()
}

fn assert_message_contains(error: &LppError, fragment: &str) {
    assert!(
        error.message.contains(fragment),
        "message {:?} does not contain {fragment:?}",
        error.message
    );
}

#[test]
fn documentation_two_temperatures() {
    // The first example of the myDevices Cayenne LPP documentation.
    let decoded = decode_hex("03 67 01 10 05 67 00 FF");

    assert_eq!(
        decoded,
        values(&[
            ("temperature_3", Value::Float(27.2)),
            ("temperature_5", Value::Float(25.5)),
        ])
    );
}

#[test]
fn documentation_accelerometer() {
    let decoded = decode_hex("06 71 04 D2 FB 2E 00 00");

    assert_eq!(
        decoded,
        values(&[
            ("accelerometer_6.x", Value::Float(1.234)),
            ("accelerometer_6.y", Value::Float(-1.234)),
            ("accelerometer_6.z", Value::Float(0.0)),
        ])
    );
}

#[test]
fn documentation_gps() {
    let decoded = decode_hex("01 88 06 76 5f f2 96 0a 00 03 e8");

    assert_eq!(
        decoded,
        values(&[
            ("gps_1.latitude", Value::Float(42.3519)),
            ("gps_1.longitude", Value::Float(-87.9094)),
            ("gps_1.altitude", Value::Float(10.0)),
        ])
    );
}

#[test]
fn every_type_once() {
    let cases: [(&str, &[(&str, Value)]); 26] = [
        ("01 00 01", &[("digital_in_1", Value::Int(1))]),
        ("02 01 00", &[("digital_out_2", Value::Int(0))]),
        ("03 02 01 2C", &[("analog_in_3", Value::Float(3.0))]),
        ("04 03 FF 38", &[("analog_out_4", Value::Float(-2.0))]),
        ("05 64 00 01 E2 40", &[("generic_5", Value::Int(123_456))]),
        ("06 65 01 F4", &[("luminosity_6", Value::Int(500))]),
        ("07 66 01", &[("presence_7", Value::Int(1))]),
        ("08 67 FF D7", &[("temperature_8", Value::Float(-4.1))]),
        ("09 68 61", &[("relative_humidity_9", Value::Float(48.5))]),
        (
            "0A 71 00 01 FF FF 03 E8",
            &[
                ("accelerometer_10.x", Value::Float(0.001)),
                ("accelerometer_10.y", Value::Float(-0.001)),
                ("accelerometer_10.z", Value::Float(1.0)),
            ],
        ),
        (
            "0B 73 27 97",
            &[("barometric_pressure_11", Value::Float(1013.5))],
        ),
        ("0C 74 01 4A", &[("voltage_12", Value::Float(3.3))]),
        ("0D 75 04 D2", &[("current_13", Value::Float(1.234))]),
        (
            "0E 76 00 0D BB A0",
            &[("frequency_14", Value::Int(900_000))],
        ),
        ("0F 78 4B", &[("percentage_15", Value::Int(75))]),
        ("10 79 FF 9C", &[("altitude_16", Value::Int(-100))]),
        ("11 7D 01 90", &[("concentration_17", Value::Int(400))]),
        ("12 80 05 DC", &[("power_18", Value::Int(1500))]),
        (
            "13 82 00 00 30 39",
            &[("distance_19", Value::Float(12.345))],
        ),
        ("14 83 00 01 E2 40", &[("energy_20", Value::Float(123.456))]),
        ("15 84 01 0E", &[("direction_21", Value::Int(270))]),
        (
            "16 85 66 3C 2B 00",
            &[("unix_time_22", Value::Int(1_715_219_200))],
        ),
        (
            "17 86 00 64 FF 9C 27 10",
            &[
                ("gyrometer_23.x", Value::Float(1.0)),
                ("gyrometer_23.y", Value::Float(-1.0)),
                ("gyrometer_23.z", Value::Float(100.0)),
            ],
        ),
        (
            "18 87 FF 80 00",
            &[
                ("colour_24.r", Value::Int(255)),
                ("colour_24.g", Value::Int(128)),
                ("colour_24.b", Value::Int(0)),
            ],
        ),
        (
            "19 88 F9 89 A1 00 1B 67 FF FF 9C",
            &[
                ("gps_25.latitude", Value::Float(-42.3519)),
                ("gps_25.longitude", Value::Float(0.7015)),
                ("gps_25.altitude", Value::Float(-1.0)),
            ],
        ),
        ("1A 8E 01", &[("switch_26", Value::Int(1))]),
    ];

    for (dump, expected) in cases {
        assert_eq!(decode_hex(dump), values(expected), "{dump}");
    }
    assert_eq!(cases.len(), DATA_TYPES.len());
}

#[test]
fn extreme_raw_values() {
    let cases: [(&str, &[(&str, Value)]); 8] = [
        ("01 02 80 00", &[("analog_in_1", Value::Float(-327.68))]),
        ("01 02 7F FF", &[("analog_in_1", Value::Float(327.67))]),
        ("01 67 80 00", &[("temperature_1", Value::Float(-3276.8))]),
        ("01 68 FF", &[("relative_humidity_1", Value::Float(127.5))]),
        (
            "01 64 FF FF FF FF",
            &[("generic_1", Value::Int(4_294_967_295))],
        ),
        ("01 79 80 00", &[("altitude_1", Value::Int(-32_768))]),
        ("01 75 FF FF", &[("current_1", Value::Float(65.535))]),
        (
            "01 88 80 00 00 7F FF FF 80 00 00",
            &[
                ("gps_1.latitude", Value::Float(-838.8608)),
                ("gps_1.longitude", Value::Float(838.8607)),
                ("gps_1.altitude", Value::Float(-83_886.08)),
            ],
        ),
    ];

    for (dump, expected) in cases {
        assert_eq!(decode_hex(dump), values(expected), "{dump}");
    }
}

#[test]
fn mixed_payload_keeps_order() {
    let decoded = decode_hex("01 67 00 EB 01 68 50 02 00 01 FF 8E 00");

    assert_eq!(
        decoded,
        values(&[
            ("temperature_1", Value::Float(23.5)),
            ("relative_humidity_1", Value::Float(40.0)),
            ("digital_in_2", Value::Int(1)),
            ("switch_255", Value::Int(0)),
        ])
    );
}

#[test]
fn empty_payload_has_no_values() {
    assert_eq!(decode(&[]), Ok(Vec::new()));
}

#[test]
fn unknown_type_names_offset_and_channel() {
    let error = decode_error("01 67 00 EB 03 99 00 00");

    assert_eq!(error.offset, 5);
    assert_eq!(error.channel, 3);
    assert_eq!(error.type_code, Some(0x99));
    assert_message_contains(&error, "unknown type 0x99 at byte 5 (channel 3); ");
}

#[test]
fn superseded_codes_unknown() {
    // An earlier revision of the ElectronicCats library used these codes
    // for concentration and colour.
    for dump in ["01 8F 01 90", "01 90 FF 00 00"] {
        let error = decode_error(dump);
        assert_message_contains(&error, "unknown type");
    }
}

#[test]
fn truncated_data_names_needed_bytes() {
    let error = decode_error("03 67 01 10 05 67 00");

    assert_eq!(error.offset, 5);
    assert_eq!(error.channel, 5);
    assert_eq!(error.type_code, Some(0x67));
    assert_message_contains(
        &error,
        "truncated: type temperature at byte 5 (channel 5) needs 2 data bytes, 1 left",
    );
}

#[test]
fn truncated_gps_without_data() {
    let error = decode_error("01 88");

    assert_message_contains(
        &error,
        "type gps at byte 1 (channel 1) needs 9 data bytes, 0 left",
    );
}

#[test]
fn missing_type_byte_rejected() {
    let error = decode_error("03 67 01 10 05");

    assert_eq!(error.offset, 4);
    assert_eq!(error.channel, 5);
    assert_eq!(error.type_code, None);
    assert_message_contains(
        &error,
        "truncated: the entry at byte 4 has a channel byte (5) but no type byte",
    );
}

#[test]
fn repeated_type_and_channel_rejected() {
    let error = decode_error("03 67 01 10 03 68 50 03 67 00 FF");

    assert_eq!(error.offset, 8);
    assert_eq!(error.channel, 3);
    assert_message_contains(&error, "duplicate key \"temperature_3\"");
}

#[test]
fn same_type_on_other_channels_accepted() {
    let decoded = decode_hex("00 67 00 01 FF 67 00 02");

    assert_eq!(
        decoded,
        values(&[
            ("temperature_0", Value::Float(0.1)),
            ("temperature_255", Value::Float(0.2)),
        ])
    );
}

#[test]
fn every_type_truncated_by_one_byte() {
    for data_type in &DATA_TYPES {
        let mut payload = vec![7, data_type.code];
        payload.extend(std::iter::repeat_n(0, data_type.data_len() - 1));

        let error = decode(&payload).expect_err("truncated entry");

        assert_eq!(error.offset, 1, "{}", data_type.name);
        assert_eq!(error.type_code, Some(data_type.code), "{}", data_type.name);
        let data_len = data_type.data_len();
        assert_message_contains(
            &error,
            &format!("needs {data_len} data bytes, {} left", data_len - 1),
        );
    }
}
