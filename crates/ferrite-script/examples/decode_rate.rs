//! Measures how fast payload formatters compile and decode.
//!
//! It compares two ways of handling the script's global state: keeping it
//! between calls (what `Decoder` does) and starting every call from a
//! freshly evaluated script (`Decoder::reset` before each call). Run it with
//!
//! ```text
//! cargo run --release -p ferrite-script --example decode_rate
//! ```
//!
//! Every loop is bounded by a call count and by a time budget, and the
//! program prints one line per figure.

use std::time::{Duration, Instant};

use ferrite_script::{Decoder, Limits, UplinkInput};

const TEMPERATURE_HUMIDITY: &str = include_str!("../tests/codecs/temperature_humidity.js");
const WEATHER_STATION: &str = include_str!("../tests/codecs/weather_station.js");

/// Time budget of each measurement.
const BUDGET: Duration = Duration::from_secs(3);

fn main() {
    let temperature = [0x09, 0x29, 0x02, 0x00, 87];
    let mut weather = b"WS01".to_vec();
    weather.extend_from_slice(&1013.25_f32.to_be_bytes());
    weather.extend_from_slice(&523_u16.to_be_bytes());
    weather.extend_from_slice(&[6, 30, 80]);

    // The smallest valid formatter: what remains is the cost of the runtime,
    // the context and the sandbox's prelude.
    measure_compile(
        "an empty formatter",
        "function decodeUplink(input) { return { data: {} }; }",
    );
    measure_compile("temperature_humidity.js", TEMPERATURE_HUMIDITY);
    measure_compile("weather_station.js", WEATHER_STATION);

    let uplink = |bytes| UplinkInput {
        bytes,
        f_port: 1,
        recv_time_ms: 1_714_564_800_000,
    };
    measure_calls(
        "temperature_humidity.js",
        TEMPERATURE_HUMIDITY,
        &uplink(&temperature),
        false,
    );
    measure_calls(
        "temperature_humidity.js",
        TEMPERATURE_HUMIDITY,
        &uplink(&temperature),
        true,
    );
    let weather_input = UplinkInput {
        f_port: 5,
        ..uplink(&weather)
    };
    measure_calls("weather_station.js", WEATHER_STATION, &weather_input, false);
    measure_calls("weather_station.js", WEATHER_STATION, &weather_input, true);
}

fn measure_compile(name: &str, source: &str) {
    const MAX_COMPILES: usize = 2_000;

    let mut durations = Vec::new();
    let started = Instant::now();
    while durations.len() < MAX_COMPILES && started.elapsed() < BUDGET {
        let before = Instant::now();
        let decoder = Decoder::compile(source, Limits::default()).expect("script compiles");
        durations.push(before.elapsed());
        drop(decoder);
    }
    durations.sort();
    let median = durations[durations.len() / 2];
    let mean = durations.iter().sum::<Duration>() / durations.len() as u32;
    println!(
        "compile {name}: median {:.1} µs, mean {:.1} µs over {} compiles",
        median.as_secs_f64() * 1e6,
        mean.as_secs_f64() * 1e6,
        durations.len()
    );
}

fn measure_calls(name: &str, source: &str, input: &UplinkInput<'_>, fresh_state: bool) {
    const MAX_CALLS: u64 = 1_000_000;

    let mut decoder = Decoder::compile(source, Limits::default()).expect("script compiles");
    // Warm-up, and a check that the input decodes.
    decoder.decode_uplink(input).expect("input decodes");

    let mut calls = 0;
    let started = Instant::now();
    while calls < MAX_CALLS && started.elapsed() < BUDGET {
        if fresh_state {
            decoder.reset();
        }
        decoder.decode_uplink(input).expect("input decodes");
        calls += 1;
    }
    let elapsed = started.elapsed();
    let state = if fresh_state {
        "fresh state per call"
    } else {
        "state kept"
    };
    println!(
        "decode {name}, {state}: {:.0} calls/s ({:.2} µs per call, {calls} calls)",
        calls as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e6 / calls as f64
    );
}
