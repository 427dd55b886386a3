//! Compile errors, exceptions, resource limits, global state and the
//! globals a script can reach.

use std::time::{Duration, Instant};

use ferrite_script::{Decoder, Limits, ScriptError, UplinkInput};
use serde_json::json;

const INPUT: UplinkInput<'static> = UplinkInput {
    bytes: &[1, 2, 3],
    f_port: 1,
    recv_time_ms: 0,
};

/// Slack allowed on top of the time limit. The interrupt handler itself
/// reacts within microseconds (the overshoot measured in a release build was
/// below 1 ms). The rest covers a loaded test machine that runs the tests
/// in parallel on two cores.
const TIMEOUT_SLACK: Duration = Duration::from_millis(100);

fn compile(source: &str) -> Decoder {
    match Decoder::compile(source, Limits::default()) {
        Ok(decoder) => decoder,
        Err(error) => panic!("compile failed: {error}"),
    }
}

/// A formatter that counts its calls in a global, so tests can see whether
/// the global state was kept or discarded.
const COUNTER: &str = "
var calls = 0;
function decodeUplink(input) {
    calls++;
    if (input.fPort === 2) { while (true) {} }
    if (input.fPort === 3) { var list = []; while (true) { list.push({ n: list.length }); } }
    if (input.fPort === 4) { var r = function (n) { return r(n + 1) + 1; }; r(0); }
    return { data: { calls: calls } };
}";

fn port(f_port: u8) -> UplinkInput<'static> {
    UplinkInput {
        bytes: &[],
        f_port,
        recv_time_ms: 0,
    }
}

fn calls(decoder: &mut Decoder) -> serde_json::Value {
    decoder.decode_uplink(&port(1)).unwrap().data["calls"].clone()
}

#[test]
fn syntax_error_line_and_column() {
    let source = "function decodeUplink(input) {\n  var x = ;\n  return { data: {} };\n}";
    let error = Decoder::compile(source, Limits::default()).unwrap_err();
    let ScriptError::Syntax {
        line,
        column,
        message,
    } = &error
    else {
        panic!("expected Syntax, got {error:?}");
    };
    assert_eq!((*line, *column), (2, 11));
    assert_eq!(message, "unexpected token in expression: ';'");
    assert_eq!(
        error.to_string(),
        "syntax error at line 2, column 11: unexpected token in expression: ';'"
    );
}

#[test]
fn unterminated_source_is_syntax_error() {
    let error = Decoder::compile("function decodeUplink(input) {", Limits::default()).unwrap_err();
    assert!(
        matches!(error, ScriptError::Syntax { line: 1, .. }),
        "{error:?}"
    );
}

#[test]
fn nul_character_is_syntax_error() {
    let source = "function decodeUplink(input) {\n  return { data: {} }; \0\n}";
    let error = Decoder::compile(source, Limits::default()).unwrap_err();
    assert_eq!(
        error,
        ScriptError::Syntax {
            message: "the source contains a NUL character; remove it".to_owned(),
            line: 2,
            column: 24
        }
    );
}

#[test]
fn missing_decode_uplink() {
    for source in [
        "function decode(input) { return {}; }",
        "var decodeUplink = 5;",
        "",
    ] {
        let error = Decoder::compile(source, Limits::default()).unwrap_err();
        assert_eq!(
            error,
            ScriptError::MissingFunction {
                name: "decodeUplink"
            },
            "{source}"
        );
    }
}

#[test]
fn top_level_exception() {
    let source = "var table = null;\nvar first = table[0];\nfunction decodeUplink(input) {}";
    let error = Decoder::compile(source, Limits::default()).unwrap_err();
    assert_eq!(
        error,
        ScriptError::Exception {
            function: "top-level code",
            message: "TypeError: cannot read property '0' of null".to_owned(),
            line: Some(2),
            column: Some(13),
        }
    );
}

#[test]
fn runtime_exception_message_and_line() {
    let source = "function field(bytes) {\n  return bytes.header.type;\n}\n\
                  function decodeUplink(input) {\n  return { data: { t: field(input) } };\n}";
    let error = compile(source).decode_uplink(&INPUT).unwrap_err();
    assert_eq!(
        error,
        ScriptError::Exception {
            function: "decodeUplink",
            message: "TypeError: cannot read property 'type' of undefined".to_owned(),
            line: Some(2),
            column: Some(10),
        }
    );
    assert_eq!(
        error.to_string(),
        "decodeUplink threw TypeError: cannot read property 'type' of undefined at line 2, column 10"
    );
}

#[test]
fn thrown_values_described() {
    let cases = [
        ("throw 'bad length';", "bad length"),
        ("throw 42;", "42"),
        ("throw { code: 7 };", "{\"code\":7}"),
        (
            "throw new RangeError('port ' + input.fPort);",
            "RangeError: port 1",
        ),
        ("throw undefined;", "undefined"),
        ("throw new TypeError();", "TypeError"),
    ];
    for (statement, expected) in cases {
        let source = format!("function decodeUplink(input) {{ {statement} }}");
        let error = compile(&source).decode_uplink(&INPUT).unwrap_err();
        let ScriptError::Exception { message, .. } = &error else {
            panic!("{statement}: expected Exception, got {error:?}");
        };
        assert_eq!(message, expected, "{statement}");
    }
}

#[test]
fn exception_survives_queued_jobs() {
    let source = "function decodeUplink(input) {
        Promise.resolve().then(function () { throw new Error('from the job'); });
        queueMicrotask(function () { try { null.x; } catch (e) {} });
        throw new Error('from the call');
    }";
    let error = compile(source).decode_uplink(&INPUT).unwrap_err();
    let ScriptError::Exception { message, .. } = &error else {
        panic!("expected Exception, got {error:?}");
    };
    assert_eq!(message, "Error: from the call");
}

#[test]
fn script_catches_its_own_errors() {
    let source = "function decodeUplink(input) {
        try { null.x; } catch (e) { return { data: { caught: e.name } }; }
    }";
    let decoded = compile(source).decode_uplink(&INPUT).unwrap();
    assert_eq!(decoded.data["caught"], json!("TypeError"));
}

#[test]
fn endless_loop_times_out() {
    let mut decoder = compile(COUNTER);

    let started = Instant::now();
    let error = decoder.decode_uplink(&port(2)).unwrap_err();
    let elapsed = started.elapsed();
    assert_eq!(
        error,
        ScriptError::Timeout {
            function: "decodeUplink",
            limit: Duration::from_millis(100)
        }
    );
    assert!(elapsed >= Duration::from_millis(100), "{elapsed:?}");
    assert!(
        elapsed < Duration::from_millis(100) + TIMEOUT_SLACK,
        "{elapsed:?}"
    );
}

#[test]
fn timeout_resets_global_state() {
    let mut decoder = compile(COUNTER);
    assert_eq!(calls(&mut decoder), json!(1));
    assert_eq!(calls(&mut decoder), json!(2));

    decoder.decode_uplink(&port(2)).unwrap_err();

    // The source was evaluated again, so the counter starts over.
    assert_eq!(calls(&mut decoder), json!(1));
}

#[test]
fn timeout_limit_is_configurable() {
    let limits = Limits {
        max_run_time: Duration::from_millis(20),
        ..Limits::default()
    };
    let mut decoder = Decoder::compile(COUNTER, limits).unwrap();

    let started = Instant::now();
    let error = decoder.decode_uplink(&port(2)).unwrap_err();
    assert!(matches!(error, ScriptError::Timeout { .. }), "{error:?}");
    assert!(started.elapsed() < Duration::from_millis(20) + TIMEOUT_SLACK);
}

#[test]
fn script_cannot_catch_timeout() {
    let source = "function decodeUplink(input) {
        try { while (true) {} } catch (e) { return { data: { caught: true } }; }
        finally { return { data: { finally: true } }; }
    }";
    let error = compile(source).decode_uplink(&INPUT).unwrap_err();
    assert!(matches!(error, ScriptError::Timeout { .. }), "{error:?}");
}

#[test]
fn top_level_loop_times_out() {
    let error = Decoder::compile("while (true) {}", Limits::default()).unwrap_err();
    assert_eq!(
        error,
        ScriptError::Timeout {
            function: "top-level code",
            limit: Duration::from_millis(100)
        }
    );
}

#[test]
fn regex_backtracking_times_out() {
    let source = "function decodeUplink(input) {
        var text = new Array(40).join('a');
        return { data: { match: /^(a+)+b$/.test(text) } };
    }";
    let started = Instant::now();
    let error = compile(source).decode_uplink(&INPUT).unwrap_err();
    assert!(matches!(error, ScriptError::Timeout { .. }), "{error:?}");
    assert!(started.elapsed() < Duration::from_millis(100) + TIMEOUT_SLACK);
}

#[test]
fn huge_array_out_of_memory() {
    let source = "function decodeUplink(input) {
        return { data: { n: new Array(1e9).fill(1).length } };
    }";
    let error = compile(source).decode_uplink(&INPUT).unwrap_err();
    assert_eq!(
        error,
        ScriptError::OutOfMemory {
            function: "decodeUplink",
            limit: 16 * 1024 * 1024
        }
    );
}

#[test]
fn growing_strings_out_of_memory() {
    let source = "function decodeUplink(input) {
        var parts = [];
        var text = 'x';
        while (true) { text = text + text + parts.length; parts.push(text.slice(1)); }
    }";
    let error = compile(source).decode_uplink(&INPUT).unwrap_err();
    assert!(
        matches!(error, ScriptError::OutOfMemory { .. }),
        "{error:?}"
    );
}

#[test]
fn small_objects_out_of_memory_then_reset() {
    // Filling 16 MiB with small objects took about 80 ms in a release build,
    // because the garbage collector runs again and again. The time limit
    // leaves room for slower builds and machines.
    let limits = Limits {
        max_run_time: Duration::from_secs(5),
        ..Limits::default()
    };
    let mut decoder = Decoder::compile(COUNTER, limits).unwrap();
    assert_eq!(calls(&mut decoder), json!(1));

    let error = decoder.decode_uplink(&port(3)).unwrap_err();
    assert!(
        matches!(error, ScriptError::OutOfMemory { .. }),
        "{error:?}"
    );

    assert_eq!(calls(&mut decoder), json!(1));
}

#[test]
fn memory_kept_in_globals_is_released_by_reset() {
    // Each call keeps 2 MiB in a global, so about the fourth call runs out
    // of an 8 MiB limit. After the reset the calls succeed again.
    let source = "var kept = [];
        function decodeUplink(input) {
            kept.push(new Uint8Array(2 * 1024 * 1024));
            return { data: { kept: kept.length } };
        }";
    let limits = Limits {
        max_memory_bytes: 8 * 1024 * 1024,
        ..Limits::default()
    };
    let mut decoder = Decoder::compile(source, limits).unwrap();

    let mut outcomes = Vec::new();
    for _ in 0..5 {
        outcomes.push(
            decoder
                .decode_uplink(&INPUT)
                .map(|decoded| decoded.data["kept"].clone()),
        );
    }
    let failure = outcomes
        .iter()
        .position(|outcome| outcome.is_err())
        .expect("one call runs out of memory");
    assert!(
        matches!(outcomes[failure], Err(ScriptError::OutOfMemory { .. })),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[failure + 1], Ok(json!(1)), "{outcomes:?}");
}

#[test]
fn deep_recursion_stack_overflow_then_reset() {
    let mut decoder = compile(COUNTER);
    assert_eq!(calls(&mut decoder), json!(1));

    let error = decoder.decode_uplink(&port(4)).unwrap_err();
    assert_eq!(
        error,
        ScriptError::StackOverflow {
            function: "decodeUplink",
            limit: 512 * 1024
        }
    );

    assert_eq!(calls(&mut decoder), json!(1));
}

#[test]
fn moderate_recursion_allowed() {
    let source = "function depth(n) { return n === 0 ? 0 : 1 + depth(n - 1); }
        function decodeUplink(input) { return { data: { depth: depth(500) } }; }";
    let decoded = compile(source).decode_uplink(&INPUT).unwrap();
    assert_eq!(decoded.data["depth"], json!(500));
}

/// Uses about `frames` times 4 KiB of stack, then runs `f`.
fn with_deeper_stack<R>(frames: usize, f: &mut dyn FnMut() -> R) -> R {
    let padding = std::hint::black_box([0_u8; 4096]);
    let result = if frames == 0 {
        f()
    } else {
        with_deeper_stack(frames - 1, f)
    };
    std::hint::black_box(&padding);
    result
}

#[test]
fn stack_limit_measured_from_each_call() {
    // The decoder is compiled at the top of a 4 MiB thread and called about
    // 1.5 MiB deeper. The stack limit must be measured from the call, or
    // QuickJS would think the 512 KiB are used up before the call starts.
    let thread = std::thread::Builder::new()
        .stack_size(4 * 1024 * 1024)
        .spawn(|| {
            let mut decoder = compile(COUNTER);
            let normal = with_deeper_stack(384, &mut || decoder.decode_uplink(&port(1)));
            let recursion = with_deeper_stack(384, &mut || decoder.decode_uplink(&port(4)));
            (normal, recursion)
        })
        .unwrap();
    let (normal, recursion) = thread.join().unwrap();

    assert_eq!(normal.unwrap().data["calls"], json!(1));
    assert!(
        matches!(recursion, Err(ScriptError::StackOverflow { .. })),
        "{recursion:?}"
    );
}

#[test]
fn global_state_kept_between_calls() {
    let mut decoder = compile(COUNTER);
    assert_eq!(calls(&mut decoder), json!(1));
    assert_eq!(calls(&mut decoder), json!(2));
    assert_eq!(calls(&mut decoder), json!(3));

    decoder.reset();
    assert_eq!(calls(&mut decoder), json!(1));
}

#[test]
fn exception_keeps_global_state() {
    let source = "var calls = 0;
        function decodeUplink(input) {
            calls++;
            if (input.fPort === 2) { throw new Error('bad'); }
            return { data: { calls: calls } };
        }";
    let mut decoder = compile(source);
    assert_eq!(calls(&mut decoder), json!(1));
    decoder.decode_uplink(&port(2)).unwrap_err();
    assert_eq!(calls(&mut decoder), json!(3));
}

#[test]
fn limits_validated() {
    let cases = [
        (
            Limits {
                max_run_time: Duration::ZERO,
                ..Limits::default()
            },
            "max_run_time",
        ),
        (
            Limits {
                max_memory_bytes: 0,
                ..Limits::default()
            },
            "max_memory_bytes",
        ),
        (
            Limits {
                max_stack_bytes: 0,
                ..Limits::default()
            },
            "max_stack_bytes",
        ),
        (
            Limits {
                max_source_bytes: 0,
                ..Limits::default()
            },
            "max_source_bytes",
        ),
        (
            Limits {
                max_output_bytes: 0,
                ..Limits::default()
            },
            "max_output_bytes",
        ),
    ];
    for (limits, expected) in cases {
        let error = Decoder::compile(COUNTER, limits).unwrap_err();
        let ScriptError::InvalidLimit { name, .. } = error else {
            panic!("expected InvalidLimit, got {error:?}");
        };
        assert_eq!(name, expected);
    }
}

#[test]
fn memory_limit_too_small_for_runtime() {
    let limits = Limits {
        max_memory_bytes: 1024,
        ..Limits::default()
    };
    let error = Decoder::compile(COUNTER, limits).unwrap_err();
    assert!(
        matches!(error, ScriptError::OutOfMemory { limit: 1024, .. }),
        "{error:?}"
    );
}

#[test]
fn source_too_large() {
    let limits = Limits {
        max_source_bytes: 100,
        ..Limits::default()
    };
    let source = format!("{COUNTER}\n// {}", "x".repeat(100));
    let error = Decoder::compile(&source, limits).unwrap_err();
    assert_eq!(
        error,
        ScriptError::SourceTooLarge {
            size: source.len(),
            limit: 100
        }
    );
}

#[test]
fn recv_time_out_of_range() {
    let mut decoder = compile(COUNTER);
    let error = decoder
        .decode_uplink(&UplinkInput {
            bytes: &[],
            f_port: 1,
            recv_time_ms: i64::MAX,
        })
        .unwrap_err();
    assert!(matches!(error, ScriptError::InvalidInput(_)), "{error:?}");
}

#[test]
fn input_shape() {
    let source = "function decodeUplink(input) {
        return { data: {
            isArray: Array.isArray(input.bytes),
            bytes: input.bytes,
            fPort: input.fPort,
            isDate: input.recvTime instanceof Date,
            recvTime: input.recvTime.getTime()
        } };
    }";
    let decoded = compile(source)
        .decode_uplink(&UplinkInput {
            bytes: &[0, 128, 255],
            f_port: 42,
            recv_time_ms: -86_400_000,
        })
        .unwrap();
    assert_eq!(
        serde_json::Value::Object(decoded.data),
        json!({ "isArray": true, "bytes": [0, 128, 255], "fPort": 42, "isDate": true, "recvTime": -86_400_000 })
    );
}

#[test]
fn replaced_date_does_not_reach_input() {
    let source = "Date = function () { return 'fake'; };
        function decodeUplink(input) {
            return { data: { year: input.recvTime.getUTCFullYear() } };
        }";
    let decoded = compile(source)
        .decode_uplink(&UplinkInput {
            bytes: &[],
            f_port: 1,
            recv_time_ms: 1_714_564_800_000,
        })
        .unwrap();
    assert_eq!(decoded.data["year"], json!(2024));
}

#[test]
fn host_globals_absent() {
    let names = [
        "require",
        "process",
        "std",
        "os",
        "fetch",
        "XMLHttpRequest",
        "WebSocket",
        "setTimeout",
        "setInterval",
        "performance",
        "print",
        "module",
        "exports",
        "Deno",
        "Bun",
        "WeakRef",
        "FinalizationRegistry",
        "Proxy",
    ];
    let checks: Vec<String> = names
        .iter()
        .map(|name| format!("{name}: typeof {name}"))
        .collect();
    let source = format!(
        "function decodeUplink(input) {{ return {{ data: {{ {} }} }}; }}",
        checks.join(", ")
    );
    let decoded = compile(&source).decode_uplink(&INPUT).unwrap();
    for name in names {
        assert_eq!(decoded.data[name], json!("undefined"), "{name}");
    }
}

#[test]
fn standard_globals_present() {
    let source = "function decodeUplink(input) {
        var view = new DataView(new ArrayBuffer(4));
        view.setFloat32(0, 1.5);
        return { data: {
            fromCharCode: String.fromCharCode(72, 105),
            math: Math.max(1, 2) + Math.pow(2, 3),
            json: JSON.parse(JSON.stringify({ a: [1] })).a[0],
            typed: new Uint16Array([65535])[0],
            view: view.getFloat32(0),
            map: new Map([[1, 'one']]).get(1),
            regex: /(\\d+)/.exec('abc 123')[1],
            parsed: parseInt('ff', 16),
            evaluated: eval('1 + 2'),
            constructed: new Function('a', 'return a * 2')(21),
            promise: typeof Promise,
            arrow: [1, 2, 3].map((x) => x * 2).join(','),
            template: `${input.fPort}-port`
        } };
    }";
    let decoded = compile(source).decode_uplink(&INPUT).unwrap();
    assert_eq!(
        serde_json::Value::Object(decoded.data),
        json!({
            "fromCharCode": "Hi",
            "math": 10,
            "json": 1,
            "typed": 65535,
            "view": 1.5,
            "map": "one",
            "regex": "123",
            "parsed": 255,
            "evaluated": 3,
            "constructed": 42,
            "promise": "function",
            "arrow": "2,4,6",
            "template": "1-port"
        })
    );
}

#[test]
fn console_discards_output() {
    let source = "function decodeUplink(input) {
        console.log('decoding', input.bytes);
        console.warn('w'); console.error('e'); console.info('i'); console.debug('d');
        return { data: { ok: true } };
    }";
    let decoded = compile(source).decode_uplink(&INPUT).unwrap();
    assert_eq!(decoded.data["ok"], json!(true));
    assert!(decoded.warnings.is_empty());
}

#[test]
fn atomics_wait_cannot_block() {
    let source = "function decodeUplink(input) {
        var cell = new Int32Array(new SharedArrayBuffer(4));
        Atomics.wait(cell, 0, 0, 10000);
        return { data: {} };
    }";
    let started = Instant::now();
    let error = compile(source).decode_uplink(&INPUT).unwrap_err();
    assert!(matches!(error, ScriptError::Exception { .. }), "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[test]
fn dynamic_import_rejected_without_loader() {
    let source = "var outcome = 'pending';
        function decodeUplink(input) {
            if (input.fPort === 1) {
                import('fs').then(function () { outcome = 'loaded'; }, function (e) { outcome = e.name; });
            }
            return { data: { outcome: outcome } };
        }";
    let mut decoder = compile(source);
    assert_eq!(
        decoder.decode_uplink(&port(1)).unwrap().data["outcome"],
        json!("pending")
    );
    // The rejection ran as a job after the first call.
    let outcome = decoder.decode_uplink(&port(2)).unwrap().data["outcome"].clone();
    assert_ne!(outcome, json!("loaded"));
    assert_ne!(outcome, json!("pending"));
}

#[test]
fn promise_jobs_run_after_call() {
    let source = "var log = [];
        function decodeUplink(input) {
            Promise.resolve(input.fPort).then(function (port) { log.push(port); });
            queueMicrotask(function () { log.push('task'); });
            return { data: { log: log.slice() } };
        }";
    let mut decoder = compile(source);
    assert_eq!(
        decoder.decode_uplink(&port(7)).unwrap().data["log"],
        json!([])
    );
    assert_eq!(
        decoder.decode_uplink(&port(8)).unwrap().data["log"],
        json!([7, "task"])
    );
}

#[test]
fn endless_promise_chain_times_out_and_drops() {
    // Each job queues the next one and then loops, so jobs are still queued
    // when the deadline passes. Dropping the decoder must not abort.
    let source = "function spin() {
            Promise.resolve().then(spin);
            for (var i = 0; i < 1000; i++) {}
        }
        function decodeUplink(input) { spin(); return { data: {} }; }";
    let mut decoder = compile(source);

    let started = Instant::now();
    let error = decoder.decode_uplink(&INPUT).unwrap_err();
    assert!(matches!(error, ScriptError::Timeout { .. }), "{error:?}");
    assert!(started.elapsed() < Duration::from_millis(100) + TIMEOUT_SLACK);

    let error = decoder.decode_uplink(&INPUT).unwrap_err();
    assert!(matches!(error, ScriptError::Timeout { .. }), "{error:?}");
    drop(decoder);
}

#[test]
fn queued_job_at_compile_then_drop() {
    let source = "queueMicrotask(function () { while (true) {} });
        function decodeUplink(input) { return { data: {} }; }";
    let error = Decoder::compile(source, Limits::default()).unwrap_err();
    assert!(matches!(error, ScriptError::Timeout { .. }), "{error:?}");
}

#[test]
fn small_thread_stack_recursion_is_clean() {
    // The documentation promises that max_stack_bytes plus 64 KiB of free
    // stack are enough; a stack overflow of the thread would abort the test.
    let limits = Limits {
        max_stack_bytes: 256 * 1024,
        ..Limits::default()
    };
    let thread = std::thread::Builder::new()
        .stack_size(256 * 1024 + 64 * 1024)
        .spawn(move || {
            let mut decoder = Decoder::compile(COUNTER, limits).unwrap();
            decoder.decode_uplink(&port(4))
        })
        .unwrap();
    let result = thread.join().unwrap();
    assert!(
        matches!(result, Err(ScriptError::StackOverflow { .. })),
        "{result:?}"
    );
}

#[test]
fn many_calls_do_not_accumulate_memory() {
    // 20,000 calls allocate far more than 2 MiB in total, so any memory that
    // a call leaves behind (input objects, saved references, queued jobs)
    // would make a later call fail.
    let source = "function decodeUplink(input) {
        Promise.resolve(input.bytes).then(function (bytes) { return bytes.slice(); });
        return { data: { sum: input.bytes.reduce(function (a, b) { return a + b; }, 0) },
                 warnings: ['w'] };
    }";
    let limits = Limits {
        max_memory_bytes: 2 * 1024 * 1024,
        ..Limits::default()
    };
    let mut decoder = Decoder::compile(source, limits).unwrap();
    let bytes = [7_u8; 64];
    for call in 0..20_000 {
        let result = decoder.decode_uplink(&UplinkInput {
            bytes: &bytes,
            f_port: 1,
            recv_time_ms: call,
        });
        assert_eq!(
            result.map(|decoded| decoded.data["sum"].clone()),
            Ok(json!(448)),
            "call {call}"
        );
    }
}

#[test]
fn thrown_null_reported_as_out_of_memory() {
    // QuickJS throws null when it cannot allocate an error object, so a
    // script's own `throw null` is indistinguishable from memory exhaustion.
    let error = compile("function decodeUplink(input) { throw null; }")
        .decode_uplink(&INPUT)
        .unwrap_err();
    assert!(
        matches!(error, ScriptError::OutOfMemory { .. }),
        "{error:?}"
    );
}
