//! Cayenne Low Power Payload (Cayenne LPP), the compact binary format of
//! many LoRaWAN devices.
//!
//! A payload is a sequence of entries. Each entry is a channel byte, a type
//! byte and the data of that type, in big-endian byte order:
//!
//! ```text
//! 03 67 01 10  05 67 00 FF
//! ch type data ch type data   =>  temperature_3 = 27.2, temperature_5 = 25.5
//! ```
//!
//! # Types
//!
//! | Code | Key              | Data bytes | Encoding                             | Value   |
//! |-----:|------------------|-----------:|--------------------------------------|---------|
//! |    0 | `digital_in`     | 1 | unsigned                                      | `Int`   |
//! |    1 | `digital_out`    | 1 | unsigned                                      | `Int`   |
//! |    2 | `analog_in`      | 2 | signed, 0.01                                  | `Float` |
//! |    3 | `analog_out`     | 2 | signed, 0.01                                  | `Float` |
//! |  100 | `generic`        | 4 | unsigned                                      | `Int`   |
//! |  101 | `luminosity`     | 2 | unsigned, 1 lux                               | `Int`   |
//! |  102 | `presence`       | 1 | unsigned                                      | `Int`   |
//! |  103 | `temperature`    | 2 | signed, 0.1 °C                                | `Float` |
//! |  104 | `relative_humidity` | 1 | unsigned, 0.5 %                            | `Float` |
//! |  113 | `accelerometer`  | 6 | `.x` `.y` `.z`, each signed, 0.001 G          | `Float` |
//! |  115 | `barometric_pressure` | 2 | unsigned, 0.1 hPa                       | `Float` |
//! |  116 | `voltage`        | 2 | unsigned, 0.01 V                              | `Float` |
//! |  117 | `current`        | 2 | unsigned, 0.001 A                             | `Float` |
//! |  118 | `frequency`      | 4 | unsigned, 1 Hz                                | `Int`   |
//! |  120 | `percentage`     | 1 | unsigned, 1 %                                 | `Int`   |
//! |  121 | `altitude`       | 2 | signed, 1 m                                   | `Int`   |
//! |  125 | `concentration`  | 2 | unsigned, 1 ppm                               | `Int`   |
//! |  128 | `power`          | 2 | unsigned, 1 W                                 | `Int`   |
//! |  130 | `distance`       | 4 | unsigned, 0.001 m                             | `Float` |
//! |  131 | `energy`         | 4 | unsigned, 0.001 kWh                           | `Float` |
//! |  132 | `direction`      | 2 | unsigned, 1°                                  | `Int`   |
//! |  133 | `unix_time`      | 4 | unsigned, seconds since the epoch             | `Int`   |
//! |  134 | `gyrometer`      | 6 | `.x` `.y` `.z`, each signed, 0.01 °/s         | `Float` |
//! |  135 | `colour`         | 3 | `.r` `.g` `.b`, each unsigned                 | `Int`   |
//! |  136 | `gps`            | 9 | `.latitude` `.longitude` signed 3 bytes, 0.0001°; `.altitude` signed 3 bytes, 0.01 m | `Float` |
//! |  142 | `switch`         | 1 | unsigned, 0 or 1                              | `Int`   |
//!
//! A key is the type's name, an underscore and the channel number:
//! `temperature_3`, `analog_in_3`, `digital_out_2`. The parts of a type with
//! several values follow after a dot: `gps_1.latitude`,
//! `accelerometer_5.x`, `colour_2.r`. Types whose resolution is a whole unit
//! become `Int` values, and the others `Float` values computed as the raw
//! integer divided by 10, 100 or 1000, so `01 10` with 0.1 °C is exactly
//! the float `27.2`. Values are not range-checked: `percentage` may exceed
//! 100 and `switch` may be 2, as sent.
//!
//! # Sources
//!
//! - Types 0 to 3, 101 to 104, 113, 115, 134 and 136 and the examples in the
//!   tests: the myDevices "Cayenne Low Power Payload" documentation
//!   (docs.mydevices.com/docs/lorawan/cayenne-lpp).
//! - The other types, the sizes, signedness and multipliers of all types:
//!   the ElectronicCats CayenneLPP Arduino library, `src/CayenneLPP.h` and
//!   `src/CayenneLPP.cpp`. An earlier revision of that library numbered
//!   concentration 143 (`LPP_PPM`) and colour 144 (`LPP_RGB`). Those codes
//!   are rejected here as unknown.
//! - Keys: the `cayennelpp` payload formatter of The Things Stack
//!   (`pkg/messageprocessors/cayennelpp`) for the types it decodes, which
//!   names types 101, 104 and 115 `luminosity`, `relative_humidity` and
//!   `barometric_pressure`. For the other types, the names of the
//!   ElectronicCats library (`getTypeName`), except type 133, which that
//!   library calls `time`. Ferrite calls it `unix_time` so that the key is
//!   not mistaken for the point's timestamp.
//!
//! # Errors
//!
//! An unknown type, an entry cut short and a repeated type on the same
//! channel are rejected, and nothing of the payload is returned. The error
//! names the byte offset, counting from 0, the channel and the type. A
//! repeated entry is rejected because keeping either value would lose the
//! other silently. An empty payload returns no values, and the caller
//! decides whether that is an error.

#[cfg(test)]
mod tests;

use std::collections::HashSet;

use ferrite_core::Value;

/// A payload that could not be decoded. Its `Display` output is the
/// message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct LppError {
    /// Offset of the entry's type byte, counting from 0, or of its channel
    /// byte when the payload ends before the type byte.
    pub offset: usize,
    pub channel: u8,
    /// The type byte, when the payload has one.
    pub type_code: Option<u8>,
    /// Description of the problem and the fix.
    pub message: String,
}

/// One value inside a type's data.
struct Part {
    /// Appended to the key after a dot, for types with several values.
    suffix: Option<&'static str>,
    bytes: usize,
    signed: bool,
    /// The raw integer is divided by this to give a `Float`, or kept as an
    /// `Int` when `None`.
    divisor: Option<u32>,
}

struct DataType {
    code: u8,
    /// Prefix of the key, and the type's name in messages.
    name: &'static str,
    parts: &'static [Part],
}

impl DataType {
    fn data_len(&self) -> usize {
        self.parts.iter().map(|part| part.bytes).sum()
    }
}

const fn entry(code: u8, name: &'static str, parts: &'static [Part]) -> DataType {
    DataType { code, name, parts }
}

const fn unsigned_int(bytes: usize) -> [Part; 1] {
    [Part {
        suffix: None,
        bytes,
        signed: false,
        divisor: None,
    }]
}

const fn scaled(bytes: usize, signed: bool, divisor: u32) -> [Part; 1] {
    [Part {
        suffix: None,
        bytes,
        signed,
        divisor: Some(divisor),
    }]
}

const fn axis(suffix: &'static str, divisor: u32) -> Part {
    Part {
        suffix: Some(suffix),
        bytes: 2,
        signed: true,
        divisor: Some(divisor),
    }
}

const fn axes(divisor: u32) -> [Part; 3] {
    [axis("x", divisor), axis("y", divisor), axis("z", divisor)]
}

const fn colour_channel(suffix: &'static str) -> Part {
    Part {
        suffix: Some(suffix),
        bytes: 1,
        signed: false,
        divisor: None,
    }
}

const COLOUR_PARTS: [Part; 3] = [
    colour_channel("r"),
    colour_channel("g"),
    colour_channel("b"),
];

const GPS_PARTS: [Part; 3] = [
    Part {
        suffix: Some("latitude"),
        bytes: 3,
        signed: true,
        divisor: Some(10_000),
    },
    Part {
        suffix: Some("longitude"),
        bytes: 3,
        signed: true,
        divisor: Some(10_000),
    },
    Part {
        suffix: Some("altitude"),
        bytes: 3,
        signed: true,
        divisor: Some(100),
    },
];

const ONE_BYTE_INT: [Part; 1] = unsigned_int(1);
const TWO_BYTE_INT: [Part; 1] = unsigned_int(2);
const FOUR_BYTE_INT: [Part; 1] = unsigned_int(4);
const ANALOG: [Part; 1] = scaled(2, true, 100);
const SIGNED_TWO_BYTE_INT: [Part; 1] = [Part {
    suffix: None,
    bytes: 2,
    signed: true,
    divisor: None,
}];

/// The type table, in the order of the module docs.
const DATA_TYPES: [DataType; 26] = [
    entry(0, "digital_in", &ONE_BYTE_INT),
    entry(1, "digital_out", &ONE_BYTE_INT),
    entry(2, "analog_in", &ANALOG),
    entry(3, "analog_out", &ANALOG),
    entry(100, "generic", &FOUR_BYTE_INT),
    entry(101, "luminosity", &TWO_BYTE_INT),
    entry(102, "presence", &ONE_BYTE_INT),
    entry(103, "temperature", &scaled(2, true, 10)),
    entry(104, "relative_humidity", &scaled(1, false, 2)),
    entry(113, "accelerometer", &axes(1000)),
    entry(115, "barometric_pressure", &scaled(2, false, 10)),
    entry(116, "voltage", &scaled(2, false, 100)),
    entry(117, "current", &scaled(2, false, 1000)),
    entry(118, "frequency", &FOUR_BYTE_INT),
    entry(120, "percentage", &ONE_BYTE_INT),
    entry(121, "altitude", &SIGNED_TWO_BYTE_INT),
    entry(125, "concentration", &TWO_BYTE_INT),
    entry(128, "power", &TWO_BYTE_INT),
    entry(130, "distance", &scaled(4, false, 1000)),
    entry(131, "energy", &scaled(4, false, 1000)),
    entry(132, "direction", &TWO_BYTE_INT),
    entry(133, "unix_time", &FOUR_BYTE_INT),
    entry(134, "gyrometer", &axes(100)),
    entry(135, "colour", &COLOUR_PARTS),
    entry(136, "gps", &GPS_PARTS),
    entry(142, "switch", &ONE_BYTE_INT),
];

fn find_data_type(code: u8) -> Option<&'static DataType> {
    DATA_TYPES.iter().find(|data_type| data_type.code == code)
}

/// Decodes a Cayenne LPP payload into keys and values, in payload order.
/// See the module docs for the types, keys and errors.
pub fn decode(payload: &[u8]) -> Result<Vec<(String, Value)>, LppError> {
    let mut values = Vec::new();
    let mut seen = HashSet::new();
    let mut offset = 0;

    while let Some(&channel) = payload.get(offset) {
        let type_offset = offset + 1;
        let Some(&type_code) = payload.get(type_offset) else {
            return Err(LppError {
                offset,
                channel,
                type_code: None,
                message: format!(
                    "truncated: the entry at byte {offset} has a channel byte ({channel}) but \
                     no type byte; the payload was cut short"
                ),
            });
        };
        let error = |message: String| LppError {
            offset: type_offset,
            channel,
            type_code: Some(type_code),
            message,
        };

        let Some(data_type) = find_data_type(type_code) else {
            return Err(error(format!(
                "unknown type 0x{type_code:02X} at byte {type_offset} (channel {channel}); it \
                 is not one of the Cayenne LPP types that Ferrite decodes, so the payload is \
                 not Cayenne LPP or uses a vendor extension"
            )));
        };
        let data_start = type_offset + 1;
        let data_len = data_type.data_len();
        let Some(data) = payload.get(data_start..data_start + data_len) else {
            return Err(error(format!(
                "truncated: type {} at byte {type_offset} (channel {channel}) needs {data_len} \
                 data bytes, {} left; the payload was cut short, or an earlier entry has a \
                 wrong type",
                data_type.name,
                payload.len() - data_start
            )));
        };

        let key = format!("{}_{channel}", data_type.name);
        if !seen.insert((type_code, channel)) {
            return Err(error(format!(
                "duplicate key \"{key}\": type {} at byte {type_offset} (channel {channel}) \
                 repeats an earlier entry with the same type and channel; give each sensor its \
                 own channel",
                data_type.name
            )));
        }
        push_parts(&key, data_type, data, &mut values);
        offset = data_start + data_len;
    }
    Ok(values)
}

/// Appends the values of one entry. `data` contains exactly the type's
/// bytes.
fn push_parts(key: &str, data_type: &DataType, data: &[u8], values: &mut Vec<(String, Value)>) {
    let mut start = 0;
    for part in data_type.parts {
        let raw = read_integer(&data[start..start + part.bytes], part.signed);
        start += part.bytes;

        let value = match part.divisor {
            // Division of two integers that f64 represents exactly is
            // correctly rounded, so 272 / 10 is the float nearest to 27.2.
            Some(divisor) => Value::Float(raw as f64 / f64::from(divisor)),
            None => Value::Int(raw),
        };
        let part_key = match part.suffix {
            Some(suffix) => format!("{key}.{suffix}"),
            None => key.to_owned(),
        };
        values.push((part_key, value));
    }
}

/// Reads a big-endian integer of 1 to 4 bytes, sign-extending when `signed`.
fn read_integer(bytes: &[u8], signed: bool) -> i64 {
    let unsigned = bytes
        .iter()
        .fold(0_i64, |value, &byte| (value << 8) | i64::from(byte));
    if !signed {
        return unsigned;
    }
    let unused_bits = 64 - 8 * bytes.len() as u32;
    (unsigned << unused_bits) >> unused_bits
}
