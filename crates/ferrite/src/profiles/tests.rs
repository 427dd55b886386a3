use ferrite_core::Value;

use super::process::{Field, Record, Stage};
use super::*;

const PROFILE: &str = r#"
name: th-sensor
description: Temperature and humidity
keys:
  temperature: { type: number, unit: Cel, min: -40, max: 85, required: true }
  humidity: { type: number, min: 0, max: 100 }
  count: { type: integer }
  ok: { type: boolean }
transform:
  - rename: { from: temp, to: temperature }
  - scale: { key: raw_humidity, factor: 0.5 }
  - rename: { from: raw_humidity, to: humidity }
  - convert: { key: temperature_f, from: degF, to: Cel }
  - rename: { from: temperature_f, to: temperature }
  - derive: { key: dew_point, expression: "a = 17.27; b = 237.7; g = a * temperature / (b + temperature) + math::ln(humidity / 100); b * g / (a - g)" }
  - drop: { keys: [debug] }
rules:
  - name: hot
    condition: { threshold: { key: temperature, op: ">", value: 30 } }
retention: 30d
"#;

fn compile(yaml: &str) -> CompiledProfile {
    let spec = parse_documents(yaml, DocumentFormat::Yaml)
        .expect("parses")
        .remove(0);
    CompiledProfile::compile(ProfileId::new_random(), TenantId::new_random(), 1, spec)
        .expect("compiles")
}

fn record(values: &[(&str, Value)]) -> Record {
    Record {
        ts: 0,
        fields: values
            .iter()
            .map(|(key, value)| Field {
                key: (*key).to_owned(),
                value: value.clone(),
                unit: None,
            })
            .collect(),
    }
}

fn value(record: &Record, key: &str) -> Option<Value> {
    record
        .fields
        .iter()
        .find(|field| field.key == key)
        .map(|field| field.value.clone())
}

#[test]
fn transforms_run_in_order_and_derive_from_their_results() {
    let profile = compile(PROFILE);
    let mut records = vec![record(&[
        ("temperature_f", Value::Float(68.0)),
        ("raw_humidity", Value::Int(100)),
        ("debug", Value::Str("x".into())),
    ])];
    profile.processor.run(&mut records).expect("valid");
    let record = &records[0];
    assert_eq!(value(record, "temperature"), Some(Value::Float(20.0)));
    assert_eq!(value(record, "humidity"), Some(Value::Float(50.0)));
    assert_eq!(value(record, "debug"), None);
    // Magnus formula: dew point of 20 °C at 50 % is about 9.26 °C.
    let Some(Value::Float(dew_point)) = value(record, "dew_point") else {
        panic!("dew point missing");
    };
    assert!((dew_point - 9.2543).abs() < 0.001, "{dew_point}");
}

#[test]
fn schema_violations_name_the_key_and_the_limit() {
    let profile = compile(PROFILE);
    let cases: [(&[(&str, Value)], &str); 5] = [
        (
            &[("humidity", Value::Int(10))],
            "required key \"temperature\"",
        ),
        (&[("temp", Value::Float(120.0))], "above the maximum 85"),
        (&[("temp", Value::Float(-41.0))], "below the minimum -40"),
        (
            &[("temp", Value::Float(20.0)), ("count", Value::Float(1.0))],
            "key \"count\" = 1 is a float, but profile \"th-sensor\" expects integer",
        ),
        (
            &[("temp", Value::Str("warm".into()))],
            "key \"temperature\" = \"warm\" is a string, but profile \"th-sensor\" expects number",
        ),
    ];
    for (values, expected) in cases {
        let mut records = vec![record(values)];
        let rejection = profile.processor.run(&mut records).unwrap_err();
        assert_eq!(rejection.stage, Stage::Validate);
        assert!(
            rejection.reason.contains(expected),
            "{} lacks {expected:?}",
            rejection.reason
        );
    }
}

#[test]
fn transforms_that_cannot_apply_reject_the_message() {
    let profile = compile(PROFILE);
    let mut records = vec![record(&[("temperature_f", Value::Str("hot".into()))])];
    let rejection = profile.processor.run(&mut records).unwrap_err();
    assert_eq!(rejection.stage, Stage::Transform);
    assert!(
        rejection.reason.contains("convert needs a number"),
        "{}",
        rejection.reason
    );
}

#[test]
fn unknown_keys_are_accepted_dropped_or_rejected() {
    let base = "name: p\nkeys: { t: { type: number } }\n";
    let run = |policy: &str| {
        let profile = compile(&format!("{base}unknown_keys: {policy}\n"));
        let mut records = vec![record(&[("t", Value::Int(1)), ("extra", Value::Int(2))])];
        profile
            .processor
            .run(&mut records)
            .map(|()| records[0].fields.len())
    };
    assert_eq!(run("accept"), Ok(2));
    assert_eq!(run("drop"), Ok(1));
    let rejected = run("reject").unwrap_err();
    assert!(
        rejected.reason.contains("\"extra\" is not in the schema"),
        "{}",
        rejected.reason
    );
}

#[test]
fn values_in_another_unit_convert_to_the_schema_unit() {
    let profile = compile("name: p\nkeys: { t: { unit: Cel }, p: { unit: hPa } }\n");
    let mut records = vec![Record {
        ts: 0,
        fields: vec![
            Field {
                key: "t".into(),
                value: Value::Float(300.0),
                unit: Some("K".into()),
            },
            Field {
                key: "p".into(),
                value: Value::Float(101_325.0),
                unit: Some("Pa".into()),
            },
        ],
    }];
    profile.processor.run(&mut records).expect("converts");
    let Some(Value::Float(t)) = value(&records[0], "t") else {
        panic!()
    };
    assert!((t - 26.85).abs() < 1e-9, "{t}");
    assert_eq!(value(&records[0], "p"), Some(Value::Float(1013.25)));

    let mut wrong = vec![Record {
        ts: 0,
        fields: vec![Field {
            key: "t".into(),
            value: Value::Float(1.0),
            unit: Some("m".into()),
        }],
    }];
    let rejection = profile.processor.run(&mut wrong).unwrap_err();
    assert!(
        rejection
            .reason
            .contains("cannot convert \"m\" (length) to \"Cel\" (temperature)"),
        "{}",
        rejection.reason
    );
}

#[test]
fn invalid_profiles_report_every_problem_at_once() {
    let spec = parse_documents(
        r#"
name: " spaced"
keys:
  t: { min: 10, max: 1 }
  flag: { type: boolean, max: 1 }
transform:
  - convert: { key: t, from: furlong, to: m }
  - derive: { key: d, expression: "1 + 2" }
  - derive: { key: e, expression: "t +" }
  - drop: { keys: [] }
codec: { type: script, script: "function decodeUplink(input) { return {data: {}}; }", max_run_time: 10s }
retention: 10m
"#,
        DocumentFormat::Yaml,
    )
    .unwrap()
    .remove(0);
    let problems =
        CompiledProfile::compile(ProfileId::new_random(), TenantId::new_random(), 1, spec)
            .unwrap_err()
            .join("\n");
    for expected in [
        "surrounding spaces",
        "keys.t: min 10 is above max 1",
        "keys.flag: min and max apply to numbers",
        "unknown unit \"furlong\"",
        "reads no key",
        "invalid expression \"t +\"",
        "drop lists no keys",
        "codec.max_run_time must be between 1 ms and 5 s",
        "retention must be at least 1h",
    ] {
        assert!(
            problems.contains(expected),
            "missing {expected:?} in:\n{problems}"
        );
    }
}

#[test]
fn yaml_and_json_documents_round_trip() {
    let specs = parse_documents(PROFILE, DocumentFormat::Yaml).unwrap();
    let yaml = to_yaml(&specs.iter().collect::<Vec<_>>());
    assert_eq!(parse_documents(&yaml, DocumentFormat::Yaml).unwrap(), specs);
    let json = serde_json::to_string(&specs).unwrap();
    assert_eq!(parse_documents(&json, DocumentFormat::Json).unwrap(), specs);

    let many = format!("{PROFILE}\n---\nname: second\n---\n- name: third\n- name: fourth\n");
    let names: Vec<String> = parse_documents(&many, DocumentFormat::Yaml)
        .unwrap()
        .into_iter()
        .map(|spec| spec.name)
        .collect();
    assert_eq!(names, ["th-sensor", "second", "third", "fourth"]);
}

#[test]
fn unknown_fields_and_wrong_types_are_rejected_with_their_name() {
    let error = parse_documents("name: p\nkyes: {}\n", DocumentFormat::Yaml).unwrap_err();
    assert!(error.contains("unknown field `kyes`"), "{error}");
    let error =
        parse_documents("name: p\ncodec: { type: protobuf }\n", DocumentFormat::Yaml).unwrap_err();
    assert!(error.contains("protobuf"), "{error}");
    let error = parse_documents("{\"name\": 5}", DocumentFormat::Json).unwrap_err();
    assert!(error.contains("invalid type"), "{error}");
}

#[tokio::test]
async fn adapters_pick_the_content_type_from_the_codec_and_the_declared_type() {
    let directory = Directory::new_for_tests();
    let lpp = compile("name: lpp\ncodec: { type: cayenne_lpp }\n");
    let senml = compile("name: senml\ncodec: { type: senml }\n");
    let (lpp_id, senml_id) = (lpp.id, senml.id);
    directory.store_profile(Arc::new(lpp));
    directory.store_profile(Arc::new(senml));

    let pick =
        |profile, declared, payload: &[u8]| directory.content_type_for(profile, declared, payload);
    assert_eq!(pick(None, None, b"{}"), Ok(ContentType::Json));
    assert_eq!(
        pick(Some(lpp_id), None, &[1, 103, 0, 10]),
        Ok(ContentType::Raw)
    );
    assert_eq!(
        pick(Some(senml_id), None, b" [{\"n\":\"t\",\"v\":1}]"),
        Ok(ContentType::SenmlJson)
    );
    assert_eq!(
        pick(Some(senml_id), None, &[0x81, 0xa1]),
        Ok(ContentType::SenmlCbor)
    );
    assert_eq!(
        pick(None, Some("application/senml+cbor"), &[0x81]),
        Ok(ContentType::SenmlCbor)
    );
    // A profile not loaded yet: the pipeline decides.
    assert_eq!(
        pick(Some(ProfileId::new_random()), None, b"{}"),
        Ok(ContentType::Raw)
    );
    let error = pick(None, Some("application/octet-stream"), &[1]).unwrap_err();
    assert!(error.contains("cayenne_lpp or script codec"), "{error}");
}
