//! Tests of the guarded Array methods. QuickJS runs them in C without
//! checking the time limit, so the sandbox's prelude guards them. These
//! tests check that huge sparse arrays cannot stall a call and that normal
//! use is unchanged.

use std::time::{Duration, Instant};

use ferrite_script::{Decoder, Limits, ScriptError, UplinkInput};
use serde_json::json;

const INPUT: UplinkInput<'static> = UplinkInput {
    bytes: &[1, 2, 3],
    f_port: 1,
    recv_time_ms: 0,
};

/// Slack allowed on top of the 100 ms time limit. Without the guards these
/// calls run for seconds to minutes. The slack covers a loaded test machine
/// that runs the tests in parallel on two cores.
const SLACK: Duration = Duration::from_millis(100);

fn run(body: &str) -> (Result<serde_json::Value, ScriptError>, Duration) {
    let source = format!(
        "function decodeUplink(input) {{
            var huge = [];
            huge.length = 4294967295;
            {body}
        }}"
    );
    let mut decoder = Decoder::compile(&source, Limits::default()).unwrap();
    let started = Instant::now();
    let result = decoder
        .decode_uplink(&INPUT)
        .map(|decoded| serde_json::Value::Object(decoded.data));
    (result, started.elapsed())
}

#[test]
fn huge_sparse_array_methods_rejected() {
    let statements = [
        "huge.join();",
        "huge.toString();",
        "String(huge);",
        "huge + '';",
        "huge.toLocaleString();",
        "huge.reverse();",
        "huge.shift();",
        "huge.unshift(1);",
        "huge.slice();",
        "huge.sort();",
        "huge.splice(0, 1);",
        "huge.copyWithin(0, 1);",
        "huge.concat([1]);",
        "[].concat(huge);",
        "Array.prototype.reverse.call({ length: 4294967295 });",
        "Array.prototype.join.call({ length: '4294967295' });",
    ];
    for statement in statements {
        let (result, elapsed) = run(statement);
        let Err(ScriptError::Exception { message, .. }) = &result else {
            panic!("{statement}: expected Exception, got {result:?}");
        };
        assert!(
            message.starts_with("RangeError: Array.prototype."),
            "{statement}: {message}"
        );
        assert!(message.contains("at most 65536"), "{statement}: {message}");
        assert!(elapsed < SLACK, "{statement}: {elapsed:?}");
    }
}

#[test]
fn computed_length_rejected() {
    let statements = [
        "var n = 0; Array.prototype.reverse.call({ get length() { return n++ ? 4294967295 : 1; } });",
        "var n = 0; Array.prototype.join.call({ length: { valueOf: function () { return n++ ? 4294967295 : 1; } } });",
        "var n = 0; [].concat({ get length() { return 4294967295; } });",
    ];
    for statement in statements {
        let (result, _) = run(statement);
        let Err(ScriptError::Exception { message, .. }) = &result else {
            panic!("{statement}: expected Exception, got {result:?}");
        };
        assert!(
            message.contains("length is a getter or an object"),
            "{statement}: {message}"
        );
    }
}

#[test]
fn flat_on_huge_array_times_out() {
    for statement in [
        "huge.flat();",
        "[huge].flat();",
        "[1].flatMap(function () { return huge; });",
        "huge.flatMap(function (x) { return x; });",
    ] {
        let (result, elapsed) = run(statement);
        assert!(
            matches!(result, Err(ScriptError::Timeout { .. })),
            "{statement}: {result:?}"
        );
        assert!(
            elapsed < Duration::from_millis(100) + SLACK,
            "{statement}: {elapsed:?}"
        );
    }
}

#[test]
fn guarded_methods_behave_normally() {
    let (result, _) = run("
        var list = [3, 1, 2];
        var args = (function () { return Array.prototype.slice.call(arguments, 1); })(1, 2, 3);
        var shifted = [1, 2, 3];
        var first = shifted.shift();
        var grown = [2, 3];
        var newLength = grown.unshift(0, 1);
        var spliced = [1, 2, 3, 4];
        var removed = spliced.splice(1, 2, 'x');
        return { data: {
            sorted: list.slice().sort(),
            sortedDescending: list.slice().sort(function (a, b) { return b - a; }),
            joined: list.join('-'),
            text: String([1, [2, 3]]),
            reversed: [1, 2, 3].reverse(),
            fromTyped: Array.prototype.slice.call(new Uint8Array([7, 8, 9])),
            typedJoined: Array.prototype.join.call(new Uint8Array([7, 8]), '+'),
            fromString: Array.prototype.join.call('abc', '.'),
            args: args,
            first: first,
            shifted: shifted,
            newLength: newLength,
            grown: grown,
            removed: removed,
            spliced: spliced,
            copied: [1, 2, 3, 4, 5].copyWithin(0, 3),
            concatenated: [1].concat(2, [3], [[4]]),
            local: [1234.5].toLocaleString()
        } };
    ");
    assert_eq!(
        result.unwrap(),
        json!({
            "sorted": [1, 2, 3],
            "sortedDescending": [3, 2, 1],
            "joined": "3-1-2",
            "text": "1,2,3",
            "reversed": [3, 2, 1],
            "fromTyped": [7, 8, 9],
            "typedJoined": "7+8",
            "fromString": "a.b.c",
            "args": [2, 3],
            "first": 1,
            "shifted": [2, 3],
            "newLength": 4,
            "grown": [0, 1, 2, 3],
            "removed": [2, 3],
            "spliced": [1, "x", 4],
            "copied": [4, 5, 3, 4, 5],
            "concatenated": [1, 2, 3, [4]],
            "local": "1234.5"
        })
    );
}

#[test]
fn flat_replacements_follow_standard() {
    let (result, _) = run("
        return { data: {
            one: [1, [2, [3, [4]]]].flat(),
            all: [1, [2, [3, [4]]]].flat(Infinity),
            none: [1, [2]].flat(0),
            holes: [1, , [2, , 3]].flat(),
            arrayLike: Array.prototype.flat.call({ length: 2, 0: [1], 1: 2 }),
            mapped: [1, 2].flatMap(function (x) { return [x, x * 10]; }),
            mappedScalar: [1, 2].flatMap(function (x, i) { return x + i; }),
            mappedThis: [1].flatMap(function () { return this.value; }, { value: 'v' }),
            nestedKept: [1].flatMap(function () { return [[2]]; }),
            flatLength: Array.prototype.flat.length,
            flatMapLength: Array.prototype.flatMap.length,
            names: Array.prototype.flat.name + ',' + Array.prototype.flatMap.name + ',' + Array.prototype.join.name,
            joinLength: Array.prototype.join.length
        } };
    ");
    assert_eq!(
        result.unwrap(),
        json!({
            "one": [1, 2, [3, [4]]],
            "all": [1, 2, 3, 4],
            "none": [1, [2]],
            "holes": [1, 2, 3],
            "arrayLike": [1, 2],
            "mapped": [1, 10, 2, 20],
            "mappedScalar": [1, 3],
            "mappedThis": ["v"],
            "nestedKept": [[2]],
            "flatLength": 0,
            "flatMapLength": 1,
            "names": "flat,flatMap,join",
            "joinLength": 1
        })
    );
}

#[test]
fn stringify_huge_array_stops_in_time() {
    let (result, elapsed) = run("return { data: { text: JSON.stringify(huge) } };");
    assert!(
        matches!(result, Err(ScriptError::Timeout { .. })),
        "{result:?}"
    );
    assert!(elapsed < Duration::from_millis(100) + SLACK, "{elapsed:?}");
}

#[test]
fn stringify_behaves_normally() {
    let (result, _) = run("
        var value = { b: [1, { c: 2 }], a: undefined, d: new Date(0), f: function () {} };
        return { data: {
            plain: JSON.stringify(value),
            allowList: JSON.stringify({ x: 1, y: 2, z: [3] }, ['x', 'z']),
            replacer: JSON.stringify({ x: 1, y: 2 }, function (k, v) { return k === 'y' ? undefined : v; }),
            spaced: JSON.stringify([1], null, 2),
            topUndefined: typeof JSON.stringify(undefined),
            name: JSON.stringify.name,
            length: JSON.stringify.length
        } };
    ");
    assert_eq!(
        result.unwrap(),
        json!({
            "plain": "{\"b\":[1,{\"c\":2}],\"d\":\"1970-01-01T00:00:00.000Z\"}",
            "allowList": "{\"x\":1,\"z\":[3]}",
            "replacer": "{\"x\":1}",
            "spaced": "[\n  1\n]",
            "topUndefined": "undefined",
            "name": "stringify",
            "length": 3
        })
    );
}

#[test]
fn flat_map_requires_function() {
    let (result, _) = run("return { data: { x: [1].flatMap(5) } };");
    let Err(ScriptError::Exception { message, .. }) = &result else {
        panic!("expected Exception, got {result:?}");
    };
    assert!(message.starts_with("TypeError:"), "{message}");
}

#[test]
fn prelude_leaves_no_enumerable_names() {
    let (result, _) = run("
        var names = [];
        for (var key in [1]) { names.push(key); }
        var globals = [];
        for (var name in globalThis) { globals.push(name); }
        return { data: { keys: names, prototypeKeys: Object.keys(Array.prototype), globals: globals } };
    ");
    assert_eq!(
        result.unwrap(),
        json!({ "keys": ["0"], "prototypeKeys": [], "globals": ["console", "decodeUplink"] })
    );
}
