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

/// The alarm manager's open alarms, as the tests keep them.
#[derive(Default)]
struct Alarms(HashMap<String, Severity>);

impl Alarms {
    fn evaluate(
        &mut self,
        state: &mut DeviceState,
        rules: &[CompiledRule],
        records: &[Record],
    ) -> Vec<Transition> {
        let transitions =
            state.evaluate(rules, "dev-1", records, &|rule| self.0.get(rule).copied());
        for transition in &transitions {
            if transition.raise {
                self.0.insert(transition.rule.clone(), transition.severity);
            } else {
                self.0.remove(&transition.rule);
            }
        }
        transitions
    }
}

fn render(transitions: &[Transition]) -> Vec<String> {
    transitions
        .iter()
        .map(|transition| {
            format!(
                "{}{}",
                if transition.raise { '+' } else { '-' },
                transition.rule
            )
        })
        .collect()
}

/// Feeds records one message at a time and returns, per message, the
/// transitions as `+rule` (raise) and `-rule` (clear).
fn run(rules: &[CompiledRule], messages: &[Record]) -> Vec<Vec<String>> {
    let mut state = DeviceState::default();
    let mut alarms = Alarms::default();
    messages
        .iter()
        .map(|message| render(&alarms.evaluate(&mut state, rules, std::slice::from_ref(message))))
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
fn threshold_raises_and_clears_on_the_edges() {
    expect(
        r#"[{name: hot, condition: {threshold: {key: t, op: ">", value: 30}}}]"#,
        &[
            (record(0, &[("t", 20.0)]), &[]),
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
fn an_alarm_cleared_by_hand_or_with_a_new_severity_is_raised_again() {
    let minor = rules(
        r#"[{name: hot, severity: minor, condition: {threshold: {key: t, op: ">", value: 30}}}]"#,
    );
    let mut state = DeviceState::default();
    let mut alarms = Alarms::default();
    let first = alarms.evaluate(&mut state, &minor, &[record(0, &[("t", 31.0)])]);
    assert_eq!(render(&first), ["+hot"]);
    assert!(
        alarms
            .evaluate(&mut state, &minor, &[record(1, &[("t", 32.0)])])
            .is_empty()
    );
    // Someone clears it by hand while the condition holds.
    alarms.0.clear();
    let again = alarms.evaluate(&mut state, &minor, &[record(2, &[("t", 33.0)])]);
    assert_eq!(render(&again), ["+hot"]);
    // The profile now calls it critical.
    let critical = rules(
        r#"[{name: hot, severity: critical, condition: {threshold: {key: t, op: ">", value: 30}}}]"#,
    );
    let raised = alarms.evaluate(&mut state, &critical, &[record(3, &[("t", 34.0)])]);
    assert_eq!(raised[0].severity, Severity::Critical);
}

#[test]
fn a_message_of_many_records_changes_an_alarm_once() {
    let rules = rules(r#"[{name: hot, condition: {threshold: {key: t, op: ">", value: 30}}}]"#);
    let flapping: Vec<Record> = (0..4000)
        .map(|index| record(index, &[("t", if index % 2 == 0 { 40.0 } else { 20.0 })]))
        .collect();
    let mut state = DeviceState::default();
    let mut alarms = Alarms::default();
    // The last record is below the threshold: nothing to raise.
    assert!(alarms.evaluate(&mut state, &rules, &flapping).is_empty());
    let raised = alarms.evaluate(&mut state, &rules, &[record(5000, &[("t", 41.0)])]);
    assert_eq!(render(&raised), ["+hot"]);
}

#[test]
fn late_points_do_not_raise_or_clear_alarms() {
    expect(
        r#"[{name: hot, condition: {threshold: {key: t, op: ">", value: 30}}}]"#,
        &[
            (record(100, &[("t", 35.0)]), &["+hot"]),
            // An older point below the threshold arrives late.
            (record(50, &[("t", 20.0)]), &[]),
            (record(110, &[("t", 20.0)]), &["-hot"]),
            (record(60, &[("t", 99.0)]), &[]),
        ],
    );
}

#[test]
fn any_holds_while_another_branch_is_still_unknown() {
    expect(
        r#"[{name: either, condition: {any: [
              {threshold: {key: t, op: ">", value: 30}},
              {threshold: {key: h, op: ">", value: 90}}]}},
            {name: both, condition: {all: [
              {threshold: {key: t, op: ">", value: 30}},
              {threshold: {key: h, op: ">", value: 90}}]}}]"#,
        &[
            // h has never arrived: `any` is decided, `all` is not.
            (record(0, &[("t", 31.0)]), &["+either"]),
            // Now neither known branch holds, but h might: still unknown.
            (record(1, &[("t", 20.0)]), &[]),
            (record(2, &[("h", 95.0), ("t", 35.0)]), &["+both"]),
            (
                record(3, &[("h", 50.0), ("t", 20.0)]),
                &["-either", "-both"],
            ),
        ],
    );
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
            (record(0, &[("p", 15.0)]), &[]),
            (record(1, &[("p", 20.0)]), &[]),
            (record(2, &[("p", 20.5)]), &["+band"]),
            (record(3, &[("p", 9.0)]), &[]),
            (record(4, &[("p", 10.0)]), &["-band"]),
        ],
    );
    expect(
        "[{name: band, condition: {range: {key: p, min: 10, inside: true}}}]",
        &[
            (record(0, &[("p", 5.0)]), &[]),
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
            (record(60, &[("t", 22.0)]), &[]),
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
            (record(60, &[("t", 10.0)]), &[]),
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
            (record(0, &[("a", 2.0), ("b", 0.0)]), &["+either"]),
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
fn no_data_rule_clears_an_open_alarm_whenever_a_message_arrives() {
    let rules = rules("[{name: silent, condition: {no_data: {for: 10m}}}]");
    let mut state = DeviceState::default();
    let mut alarms = Alarms::default();
    assert!(
        alarms
            .evaluate(&mut state, &rules, &[record(0, &[("x", 1.0)])])
            .is_empty()
    );
    // The silence check raises it, twice over.
    for ts in [900, 2000] {
        alarms.0.insert("silent".into(), Severity::Major);
        let cleared = alarms.evaluate(&mut state, &rules, &[record(ts, &[("y", 1.0)])]);
        assert_eq!(render(&cleared), ["-silent"]);
    }
}

#[test]
fn messages_use_templates_and_name_the_values() {
    let rules = rules(
        r#"[{name: hot, message: "{device} at {t} degrees ({rule})",
             condition: {threshold: {key: t, op: ">", value: 30}}},
           {name: plain, condition: {threshold: {key: t, op: ">", value: 30}}}]"#,
    );
    let mut state = DeviceState::default();
    let transitions = state.evaluate(&rules, "boiler-2", &[record(0, &[("t", 31.5)])], &|_| None);
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
