use super::*;
use crate::profiles::process::Field;

const SECOND: i64 = 1_000_000_000;

fn rules(yaml: &str) -> Vec<CompiledRule> {
    let specs: Vec<RuleSpec> = serde_json::from_value(
        serde_yaml_ng::from_str::<serde_json::Value>(yaml).expect("valid YAML"),
    )
    .expect("valid rules");
    compile(&specs).expect("rules compile")
}

fn record(ts_s: i64, values: &[(&str, f64)]) -> Record {
    Record {
        ts: ts_s * SECOND,
        fields: values
            .iter()
            .map(|(key, value)| Field {
                key: (*key).to_owned(),
                value: Value::Float(*value),
                unit: None,
            })
            .collect(),
    }
}

/// Feeds records one message at a time and returns, per message, the
/// transitions as `+rule` (raise) and `-rule` (clear).
fn run(rules: &[CompiledRule], messages: &[Record]) -> Vec<Vec<String>> {
    let mut state = DeviceState::default();
    messages
        .iter()
        .map(|message| {
            state
                .evaluate(rules, "dev-1", std::slice::from_ref(message))
                .iter()
                .filter(|transition| !transition.repeated)
                .map(|transition| {
                    format!(
                        "{}{}",
                        if transition.raise { '+' } else { '-' },
                        transition.rule
                    )
                })
                .collect()
        })
        .collect()
}

fn expect(rules_yaml: &str, table: &[(Record, &[&str])]) {
    let rules = rules(rules_yaml);
    let messages: Vec<Record> = table.iter().map(|(record, _)| record.clone()).collect();
    let actual = run(&rules, &messages);
    for (index, ((_, expected), actual)) in table.iter().zip(actual).enumerate() {
        assert_eq!(&actual, expected, "message {index}");
    }
}

#[test]
fn threshold_raises_on_the_edge_and_reports_its_first_state() {
    expect(
        r#"[{name: hot, condition: {threshold: {key: t, op: ">", value: 30}}}]"#,
        &[
            // The first evaluation reports the state either way.
            (record(0, &[("t", 20.0)]), &["-hot"]),
            (record(1, &[("t", 25.0)]), &[]),
            (record(2, &[("t", 31.0)]), &["+hot"]),
            (record(3, &[("t", 35.0)]), &[]),
            // A message without the key changes nothing.
            (record(4, &[("h", 50.0)]), &[]),
            (record(5, &[("t", 30.0)]), &["-hot"]),
        ],
    );
}

#[test]
fn a_condition_that_keeps_holding_repeats_its_raise() {
    let rules = rules(r#"[{name: hot, condition: {threshold: {key: t, op: ">", value: 30}}}]"#);
    let mut state = DeviceState::default();
    let first = state.evaluate(&rules, "d", &[record(0, &[("t", 31.0)])]);
    let second = state.evaluate(&rules, "d", &[record(1, &[("t", 32.0)])]);
    assert!(first[0].raise && !first[0].repeated);
    assert!(second[0].raise && second[0].repeated);
}

#[test]
fn each_comparison_operator_holds_as_written() {
    for (op, holds_at_30, holds_at_31) in [
        (">", false, true),
        (">=", true, true),
        ("<", false, false),
        ("<=", true, false),
        ("==", true, false),
        ("!=", false, true),
    ] {
        let rules = rules(&format!(
            r#"[{{name: r, condition: {{threshold: {{key: t, op: "{op}", value: 30}}}}}}]"#
        ));
        let view = |value| {
            let record = record(0, &[("t", value)]);
            holds(
                &rules[0].condition,
                &View {
                    record: &record,
                    latest: &HashMap::new(),
                },
            )
        };
        assert_eq!(view(30.0), Some(holds_at_30), "{op} at 30");
        assert_eq!(view(31.0), Some(holds_at_31), "{op} at 31");
    }
}

#[test]
fn range_holds_outside_by_default_and_inside_when_asked() {
    expect(
        "[{name: band, condition: {range: {key: p, min: 10, max: 20}}}]",
        &[
            (record(0, &[("p", 15.0)]), &["-band"]),
            (record(1, &[("p", 20.0)]), &[]),
            (record(2, &[("p", 20.5)]), &["+band"]),
            (record(3, &[("p", 9.0)]), &[]),
            (record(4, &[("p", 10.0)]), &["-band"]),
        ],
    );
    expect(
        "[{name: band, condition: {range: {key: p, min: 10, inside: true}}}]",
        &[
            (record(0, &[("p", 5.0)]), &["-band"]),
            (record(1, &[("p", 1e9)]), &["+band"]),
        ],
    );
}

#[test]
fn rate_of_change_scales_to_the_period_and_honours_direction() {
    // 5 units per minute at most.
    let rule = "[{name: jump, condition: {rate_of_change: {key: t, max: 5, per: 1m}}}]";
    expect(
        rule,
        &[
            // No earlier value: unknown.
            (record(0, &[("t", 20.0)]), &[]),
            // +2 in 60 s = 2/min.
            (record(60, &[("t", 22.0)]), &["-jump"]),
            // +3 in 30 s = 6/min.
            (record(90, &[("t", 25.0)]), &["+jump"]),
            // -6 in 60 s = 6/min, still faster than 5.
            (record(150, &[("t", 19.0)]), &[]),
            (record(210, &[("t", 19.5)]), &["-jump"]),
            // An out-of-order point is not a rate.
            (record(100, &[("t", 99.0)]), &[]),
        ],
    );
    expect(
        "[{name: rise, condition: {rate_of_change: {key: t, max: 5, per: 1m, direction: rise}}}]",
        &[
            (record(0, &[("t", 20.0)]), &[]),
            (record(60, &[("t", 10.0)]), &["-rise"]),
            (record(120, &[("t", 20.0)]), &["+rise"]),
        ],
    );
}

#[test]
fn expression_combines_keys_from_separate_messages() {
    expect(
        r#"[{name: muggy, condition: {expression: "temperature > 25 && humidity > 80"}}]"#,
        &[
            // humidity has never arrived: unknown.
            (record(0, &[("temperature", 30.0)]), &[]),
            (record(1, &[("humidity", 85.0)]), &["+muggy"]),
            (record(2, &[("humidity", 60.0)]), &["-muggy"]),
        ],
    );
}

#[test]
fn all_and_any_combine_conditions() {
    let rule = r#"[{name: both, condition: {all: [
        {threshold: {key: a, op: ">", value: 1}},
        {threshold: {key: b, op: ">", value: 1}}]}},
      {name: either, condition: {any: [
        {threshold: {key: a, op: ">", value: 1}},
        {threshold: {key: b, op: ">", value: 1}}]}}]"#;
    expect(
        rule,
        &[
            (record(0, &[("a", 2.0), ("b", 0.0)]), &["-both", "+either"]),
            (record(1, &[("b", 2.0)]), &["+both"]),
            (record(2, &[("a", 0.0), ("b", 0.0)]), &["-both", "-either"]),
        ],
    );
}

#[test]
fn hold_duration_uses_data_time() {
    expect(
        r#"[{name: hot, for: 1m, condition: {threshold: {key: t, op: ">", value: 30}}}]"#,
        &[
            (record(0, &[("t", 31.0)]), &[]),
            (record(30, &[("t", 32.0)]), &[]),
            (record(60, &[("t", 33.0)]), &["+hot"]),
            (record(70, &[("t", 20.0)]), &["-hot"]),
            // A dip resets the clock.
            (record(80, &[("t", 31.0)]), &[]),
            (record(100, &[("t", 20.0)]), &[]),
            (record(110, &[("t", 31.0)]), &[]),
            (record(160, &[("t", 31.0)]), &[]),
            (record(170, &[("t", 31.0)]), &["+hot"]),
        ],
    );
}

#[test]
fn clear_condition_adds_hysteresis() {
    expect(
        r#"[{name: hot, condition: {threshold: {key: t, op: ">", value: 30}},
             clear: {threshold: {key: t, op: "<", value: 25}}}]"#,
        &[
            (record(0, &[("t", 31.0)]), &["+hot"]),
            // Below the raise threshold, above the clear one: stays active.
            (record(1, &[("t", 28.0)]), &[]),
            (record(2, &[("t", 24.0)]), &["-hot"]),
            (record(3, &[("t", 28.0)]), &[]),
        ],
    );
}

#[test]
fn no_data_rule_clears_when_any_message_arrives() {
    expect(
        "[{name: silent, condition: {no_data: {for: 10m}}}]",
        &[
            (record(0, &[("x", 1.0)]), &["-silent"]),
            (record(1, &[("y", 1.0)]), &[]),
        ],
    );
}

#[test]
fn messages_use_templates_and_name_the_values() {
    let rules = rules(
        r#"[{name: hot, message: "{device} at {t} degrees ({rule})",
             condition: {threshold: {key: t, op: ">", value: 30}}},
           {name: plain, condition: {threshold: {key: t, op: ">", value: 30}}}]"#,
    );
    let mut state = DeviceState::default();
    let transitions = state.evaluate(&rules, "boiler-2", &[record(0, &[("t", 31.5)])]);
    assert_eq!(transitions[0].message, "boiler-2 at 31.5 degrees (hot)");
    assert_eq!(transitions[1].message, "plain: t > 30 holds (t = 31.5)");
    assert_eq!(
        transitions[1].values,
        vec![("t".to_owned(), Value::Float(31.5))]
    );
}

#[test]
fn invalid_rules_report_every_problem() {
    let specs: Vec<RuleSpec> = serde_json::from_value(serde_json::json!([
        {"name": "a", "condition": {"range": {"key": "t"}}},
        {"name": "a", "condition": {"rate_of_change": {"key": "t", "max": -1, "per": "0s"}}},
        {"name": "b", "condition": {"expression": "1 + "}},
        {"name": "c", "condition": {"all": [{"no_data": {"for": "1m"}}]}},
        {"name": "d", "for": "1m", "condition": {"no_data": {"for": "1m"}}},
        {"name": "", "condition": {"expression": "2 > 1"}},
    ]))
    .unwrap();
    let problems = compile(&specs).unwrap_err();
    let text = problems.join("\n");
    for expected in [
        "a range needs min, max or both",
        "another rule has the same name",
        "max must be a finite number",
        "per must be longer than 0 s",
        "invalid expression",
        "no_data cannot be combined",
        "leave out clear and for",
        "name must be 1 to",
        "reads no key",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
}

#[test]
fn a_rule_document_rejects_unknown_fields() {
    let error = serde_json::from_value::<RuleSpec>(serde_json::json!(
        {"name": "x", "condition": {"threshold": {"key": "t", "op": ">", "value": 1, "hysteresis": 2}}}
    ))
    .unwrap_err();
    assert!(error.to_string().contains("hysteresis"), "{error}");
}
