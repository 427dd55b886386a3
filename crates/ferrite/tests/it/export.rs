//! `ferrite export` and `GET /api/v1/export`: every written point comes
//! back once, with its type, in both formats, and bad input gets a message
//! that names it.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::support::{ADMIN_EMAIL, ADMIN_PASSWORD, BINARY, Server, run_cli, wait_until};

const T0_MS: i64 = 1_714_953_600_000;
const MS: i64 = 1_000_000;
const CSV_HEADER: &str = "device_id,device,key,time,value_float,value_int,value_bool,value_string";

/// One exported row with exactly one value.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    device_id: String,
    device: String,
    key: String,
    time_ns: i64,
    value: Cell,
}

#[derive(Debug, Clone, PartialEq)]
enum Cell {
    Float(f64),
    Int(i64),
    Bool(bool),
    Str(String),
}

/// The devices of the test data set and the rows they must export as.
struct DataSet {
    boiler: String,
    hall: String,
    spare: String,
    rows: Vec<Row>,
}

impl DataSet {
    fn select(&self, keep: impl Fn(&Row) -> bool) -> Vec<Row> {
        self.rows.iter().filter(|row| keep(row)).cloned().collect()
    }
}

/// Creates three devices, writes points of every type over JSON (millisecond
/// times) and line protocol (nanosecond times), and returns the rows in
/// export order: device name, key, time.
async fn write_data_set(server: &Server) -> DataSet {
    let boiler = server.create_device("boiler-1").await;
    let hall_name = "hall, \"north\"";
    let hall = server.create_device(hall_name).await;
    let spare = server.create_device("spare").await;

    let json = serde_json::json!([
        {"ts": 946_684_800_000i64, "values": {"temperature": 0.5}},
        {"ts": T0_MS, "values": {"temperature": 21.5, "on": true, "mode": "eco", "count": 7}},
        {"ts": T0_MS + 1000, "values": {
            "temperature": 1.0,
            "on": false,
            "mode": "say \"hi\", then\r\nbye",
            "count": i64::MIN,
        }},
        {"ts": T0_MS + 2000, "values": {"mode": "", "count": 12}},
    ]);
    let response = reqwest::Client::new()
        .post(format!(
            "{}/api/v1/{}/telemetry",
            server.http_url, boiler.token
        ))
        .json(&json)
        .send()
        .await
        .expect("JSON write");
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());

    let t0_ns = T0_MS * MS;
    let lines = format!(
        "env humidity=40.5,door=\"open, wide\",ok=t,n=3i {}\n\
         env humidity=41,door=\"\",ok=f,n=-4i {}\n\
         env humidity=0.1 {}\n",
        t0_ns + 123,
        t0_ns + 456,
        t0_ns + 1_999_999_999
    );
    let response = reqwest::Client::new()
        .post(format!("{}/write?precision=ns", server.http_url))
        .header("Authorization", format!("Token {}", hall.token))
        .body(lines)
        .send()
        .await
        .expect("line protocol write");
    assert_eq!(response.status(), 204, "{}", response.text().await.unwrap());

    let row = |device: &crate::support::TestDevice, name: &str, key: &str, time_ns, value| Row {
        device_id: device.id.clone(),
        device: name.to_owned(),
        key: key.to_owned(),
        time_ns,
        value,
    };
    let b = |key, time_ns, value| row(&boiler, "boiler-1", key, time_ns, value);
    let h = |key, time_ns, value| row(&hall, hall_name, key, time_ns, value);
    let rows = vec![
        b("count", t0_ns, Cell::Int(7)),
        b("count", t0_ns + 1000 * MS, Cell::Int(i64::MIN)),
        b("count", t0_ns + 2000 * MS, Cell::Int(12)),
        b("mode", t0_ns, Cell::Str("eco".into())),
        b(
            "mode",
            t0_ns + 1000 * MS,
            Cell::Str("say \"hi\", then\r\nbye".into()),
        ),
        b("mode", t0_ns + 2000 * MS, Cell::Str(String::new())),
        b("on", t0_ns, Cell::Bool(true)),
        b("on", t0_ns + 1000 * MS, Cell::Bool(false)),
        b("temperature", 946_684_800_000 * MS, Cell::Float(0.5)),
        b("temperature", t0_ns, Cell::Float(21.5)),
        b("temperature", t0_ns + 1000 * MS, Cell::Float(1.0)),
        h("env.door", t0_ns + 123, Cell::Str("open, wide".into())),
        h("env.door", t0_ns + 456, Cell::Str(String::new())),
        h("env.humidity", t0_ns + 123, Cell::Float(40.5)),
        h("env.humidity", t0_ns + 456, Cell::Float(41.0)),
        h("env.humidity", t0_ns + 1_999_999_999, Cell::Float(0.1)),
        h("env.n", t0_ns + 123, Cell::Int(3)),
        h("env.n", t0_ns + 456, Cell::Int(-4)),
        h("env.ok", t0_ns + 123, Cell::Bool(true)),
        h("env.ok", t0_ns + 456, Cell::Bool(false)),
    ];
    DataSet {
        boiler: boiler.id,
        hall: hall.id,
        spare: spare.id,
        rows,
    }
}

// --- reading the formats --------------------------------------------------

/// Splits RFC 4180 text into records. A field is `None` when it is empty
/// and unquoted (null) and `Some` otherwise, so `""` is an empty string.
fn parse_csv_records(text: &str) -> Vec<Vec<Option<String>>> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        // One field.
        let field = if chars.peek() == Some(&'"') {
            chars.next();
            let mut value = String::new();
            loop {
                match chars.next().expect("unterminated quoted field") {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        value.push('"');
                    }
                    '"' => break,
                    other => value.push(other),
                }
            }
            Some(value)
        } else {
            let mut value = String::new();
            while let Some(&next) = chars.peek() {
                if matches!(next, ',' | '\r' | '\n') {
                    break;
                }
                assert_ne!(next, '"', "quote inside an unquoted field");
                value.push(next);
                chars.next();
            }
            (!value.is_empty()).then_some(value)
        };
        record.push(field);

        match chars.next() {
            Some(',') => continue,
            Some('\r') => {
                assert_eq!(chars.next(), Some('\n'), "CR without LF ends a record");
                records.push(std::mem::take(&mut record));
                if chars.peek().is_none() {
                    return records;
                }
            }
            None => panic!("the last record has no CRLF"),
            Some(other) => panic!("unexpected {other:?} after a field"),
        }
    }
}

fn parse_csv(text: &str) -> Vec<Row> {
    let records = parse_csv_records(text);
    let header: Vec<&str> = CSV_HEADER.split(',').collect();
    let first: Vec<&str> = records[0].iter().map(|f| f.as_deref().unwrap()).collect();
    assert_eq!(first, header);

    records[1..]
        .iter()
        .map(|fields| {
            assert_eq!(fields.len(), 8, "{fields:?}");
            let text = |index: usize| fields[index].clone().expect("non-null column");
            let time = chrono::DateTime::parse_from_rfc3339(&text(3)).expect("RFC 3339 time");
            assert!(text(3).ends_with('Z'), "time in UTC: {}", text(3));
            assert_eq!(text(3).len(), 30, "nine fraction digits: {}", text(3));
            let values: Vec<Cell> = [
                fields[4].as_ref().map(|v| Cell::Float(v.parse().unwrap())),
                fields[5].as_ref().map(|v| Cell::Int(v.parse().unwrap())),
                fields[6].as_ref().map(|v| match v.as_str() {
                    "true" => Cell::Bool(true),
                    "false" => Cell::Bool(false),
                    other => panic!("invalid boolean {other:?}"),
                }),
                fields[7].as_ref().map(|v| Cell::Str(v.clone())),
            ]
            .into_iter()
            .flatten()
            .collect();
            assert_eq!(
                values.len(),
                1,
                "exactly one value column is set: {fields:?}"
            );
            if let (Some(float), Cell::Float(_)) = (&fields[4], &values[0]) {
                assert!(
                    float.contains(['.', 'e']),
                    "float {float} looks like an integer"
                );
            }
            Row {
                device_id: text(0),
                device: text(1),
                key: text(2),
                time_ns: time.timestamp_nanos_opt().unwrap(),
                value: values.into_iter().next().unwrap(),
            }
        })
        .collect()
}

#[cfg(feature = "export")]
fn parse_parquet(bytes: Vec<u8>) -> Vec<Row> {
    use arrow_array::Array;
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float64Type, Int64Type, TimestampNanosecondType};
    use arrow_schema::{DataType, TimeUnit};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    let builder =
        ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes)).expect("Parquet file");
    let schema = builder.schema().clone();
    let columns: Vec<(&str, &DataType, bool)> = schema
        .fields()
        .iter()
        .map(|field| {
            (
                field.name().as_str(),
                field.data_type(),
                field.is_nullable(),
            )
        })
        .collect();
    let time_type = DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()));
    assert_eq!(
        columns,
        vec![
            ("device_id", &DataType::Utf8, false),
            ("device", &DataType::Utf8, false),
            ("key", &DataType::Utf8, false),
            ("time", &time_type, false),
            ("value_float", &DataType::Float64, true),
            ("value_int", &DataType::Int64, true),
            ("value_bool", &DataType::Boolean, true),
            ("value_string", &DataType::Utf8, true),
        ]
    );

    let mut rows = Vec::new();
    for batch in builder.build().expect("Parquet reader") {
        let batch = batch.expect("record batch");
        let device_id = batch.column(0).as_string::<i32>();
        let device = batch.column(1).as_string::<i32>();
        let key = batch.column(2).as_string::<i32>();
        let time = batch.column(3).as_primitive::<TimestampNanosecondType>();
        let float = batch.column(4).as_primitive::<Float64Type>();
        let int = batch.column(5).as_primitive::<Int64Type>();
        let boolean = batch.column(6).as_boolean();
        let string = batch.column(7).as_string::<i32>();
        for i in 0..batch.num_rows() {
            let values: Vec<Cell> = [
                float.is_valid(i).then(|| Cell::Float(float.value(i))),
                int.is_valid(i).then(|| Cell::Int(int.value(i))),
                boolean.is_valid(i).then(|| Cell::Bool(boolean.value(i))),
                string
                    .is_valid(i)
                    .then(|| Cell::Str(string.value(i).to_owned())),
            ]
            .into_iter()
            .flatten()
            .collect();
            assert_eq!(values.len(), 1, "row {i} must have exactly one value");
            rows.push(Row {
                device_id: device_id.value(i).to_owned(),
                device: device.value(i).to_owned(),
                key: key.value(i).to_owned(),
                time_ns: time.value(i),
                value: values.into_iter().next().unwrap(),
            });
        }
    }
    rows
}

// --- running the export ---------------------------------------------------

/// Runs `ferrite export ARGS --data-dir DIR` and returns its output.
fn export_cli(args: &[&str], data_dir: &Path) -> Output {
    Command::new(BINARY)
        .arg("export")
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .stdin(Stdio::null())
        .output()
        .expect("run ferrite export")
}

fn assert_cli_success(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "ferrite export failed: {stderr}");
    stderr
}

/// Runs `ferrite export` with the given arguments, expects failure, and
/// returns standard error.
fn assert_cli_failure(args: &[&str], data_dir: &Path) -> String {
    let output = export_cli(args, data_dir);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !output.status.success(),
        "ferrite export {args:?} succeeded; stderr: {stderr}"
    );
    stderr
}

async fn get_export(server: &Server, query: &str, bearer: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!("{}/api/v1/export?{query}", server.http_url))
        .bearer_auth(bearer)
        .send()
        .await
        .expect("export request")
}

async fn http_csv(server: &Server, query: &str) -> Vec<Row> {
    let token = server.admin_token().await;
    let response = get_export(server, query, &token).await;
    assert_eq!(response.status(), 200);
    parse_csv(&response.text().await.expect("CSV body"))
}

// --- tests ------------------------------------------------------------------

#[tokio::test]
async fn export_round_trips_every_row() {
    let mut server = Server::start().await;
    let data = write_data_set(&server).await;
    let stored = wait_until(
        || async { http_csv(&server, "format=csv").await.len() == data.rows.len() },
        Duration::from_secs(10),
    )
    .await;
    assert!(stored, "the written points were not all stored in time");
    let token = server.admin_token().await;

    // The endpoint, CSV.
    let response = get_export(&server, "format=csv", &token).await;
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "text/csv; charset=utf-8");
    let disposition = headers["content-disposition"].to_str().unwrap();
    assert!(
        disposition.starts_with("attachment; filename=\"ferrite-export-")
            && disposition.ends_with(".csv\""),
        "{disposition}"
    );
    let csv_text = response.text().await.unwrap();
    assert_eq!(parse_csv(&csv_text), data.rows);
    assert!(csv_text.contains(",\"hall, \"\"north\"\"\","), "{csv_text}");
    assert!(csv_text.contains(",\"say \"\"hi\"\", then\r\nbye\"\r\n"));

    // The endpoint, Parquet (the default format).
    #[cfg(feature = "export")]
    {
        let response = get_export(&server, "", &token).await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"],
            "application/vnd.apache.parquet"
        );
        let disposition = response.headers()["content-disposition"].to_str().unwrap();
        assert!(disposition.ends_with(".parquet\""), "{disposition}");
        let bytes = response.bytes().await.unwrap().to_vec();
        assert_eq!(parse_parquet(bytes), data.rows);
    }

    // The endpoint with a device by name, another by id, keys and a range.
    let query = format!(
        "format=csv&device={}&device=boiler-1&keys=temperature,env.n,missing\
         &start=2024-05-06T00:00:00Z&end={}",
        data.hall,
        T0_MS + 1000
    );
    let response = get_export(&server, &query, &token).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["ferrite-warning"],
        "none of the selected devices has the key(s) missing"
    );
    let expected = data.select(|row| {
        ["temperature", "env.n"].contains(&row.key.as_str())
            && (T0_MS * MS..(T0_MS + 1000) * MS).contains(&row.time_ns)
    });
    assert_eq!(expected.len(), 3);
    assert_eq!(parse_csv(&response.text().await.unwrap()), expected);

    // The command refuses to run beside the server.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("locked.csv");
    let stderr = assert_cli_failure(&["-o", file.to_str().unwrap()], &server.data_dir);
    assert!(stderr.contains("locked"), "{stderr}");
    assert!(stderr.contains("GET /api/v1/export"), "{stderr}");
    assert!(!file.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    server.terminate();

    // The command, CSV to a file.
    let csv_file = dir.path().join("all.csv");
    let stderr = assert_cli_success(&export_cli(
        &["-o", csv_file.to_str().unwrap()],
        &server.data_dir,
    ));
    assert!(
        stderr.contains(&format!(
            "exported {} rows (2 devices, 8 series)",
            data.rows.len()
        )),
        "{stderr}"
    );
    let file_text = std::fs::read_to_string(&csv_file).unwrap();
    assert_eq!(parse_csv(&file_text), data.rows);
    assert_eq!(
        file_text, csv_text,
        "the command and the endpoint write the same CSV"
    );

    // The command, CSV to standard output.
    let output = export_cli(&["--output", "-"], &server.data_dir);
    assert_cli_success(&output);
    assert_eq!(String::from_utf8(output.stdout).unwrap(), csv_text);

    // The command, Parquet.
    #[cfg(feature = "export")]
    {
        let parquet_file = dir.path().join("all.parquet");
        assert_cli_success(&export_cli(
            &["-o", parquet_file.to_str().unwrap()],
            &server.data_dir,
        ));
        assert_eq!(
            parse_parquet(std::fs::read(&parquet_file).unwrap()),
            data.rows
        );

        let no_extension = dir.path().join("export.data");
        assert_cli_success(&export_cli(
            &["--format", "parquet", "-o", no_extension.to_str().unwrap()],
            &server.data_dir,
        ));
        assert_eq!(
            parse_parquet(std::fs::read(&no_extension).unwrap()),
            data.rows
        );
    }

    // The command with devices, keys and a range; the device without data
    // counts for nothing.
    let subset = dir.path().join("subset.csv");
    let start = (T0_MS + 1).to_string();
    let stderr = assert_cli_success(&export_cli(
        &[
            "--device",
            &data.boiler,
            "--device",
            &data.spare,
            "--keys",
            "mode,on",
            "--start",
            &start,
            "--end",
            "2262-01-01T00:00:00Z",
            "-o",
            subset.to_str().unwrap(),
        ],
        &server.data_dir,
    ));
    let expected = data.select(|row| {
        row.device_id == data.boiler
            && ["mode", "on"].contains(&row.key.as_str())
            && row.time_ns >= (T0_MS + 1) * MS
    });
    assert_eq!(expected.len(), 3);
    assert!(
        stderr.contains("exported 3 rows (1 device, 2 series)"),
        "{stderr}"
    );
    assert_eq!(
        parse_csv(&std::fs::read_to_string(&subset).unwrap()),
        expected
    );
}

#[tokio::test]
async fn export_endpoint_checks_role_and_parameters() {
    let server = Server::start().await;
    let device = server.create_device("meter").await;
    let operator = server.create_api_key("exporter", "operator");
    let viewer = server.create_api_key("dashboard", "viewer");

    let response = get_export(&server, "format=csv", &operator).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), format!("{CSV_HEADER}\r\n"));

    let response = get_export(&server, "format=csv", &viewer).await;
    assert_eq!(response.status(), 403, "a viewer cannot export");
    let response = get_export(&server, "format=csv", &device.token).await;
    assert_eq!(response.status(), 403, "a device token cannot export");
    let response = reqwest::get(format!("{}/api/v1/export", server.http_url))
        .await
        .unwrap();
    assert_eq!(response.status(), 401);

    let cases = [
        ("start=yesterday", "start", "\"yesterday\""),
        ("end=2024-13-01T00:00:00Z", "end", "RFC 3339"),
        (
            "start=1714953600000&end=1714953600000",
            "start",
            "not before end",
        ),
        (
            "start=1714953600001&end=1714953600000",
            "start",
            "not before end",
        ),
        ("format=xlsx", "format", "\"xlsx\""),
        ("device=", "device", "device is empty"),
        ("keys=,", "keys", "keys is empty"),
        ("limit=10", "query", "\"limit\""),
        ("format=csv&format=parquet", "format", "more than once"),
    ];
    let token = server.admin_token().await;
    for (query, param, detail) in cases {
        let response = get_export(&server, query, &token).await;
        assert_eq!(response.status(), 400, "{query}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json",
            "{query}"
        );
        let problem: serde_json::Value = response.json().await.unwrap();
        assert_eq!(problem["param"], param, "{query}: {problem}");
        let text = problem["detail"].as_str().unwrap();
        assert!(text.contains(detail), "{query}: {text}");
    }

    // A device that is not in the tenant is a 404, as on every other route.
    for (query, detail) in [
        ("device=no-such-device", "\"no-such-device\""),
        ("device=00000000-0000-0000-0000-000000000000", "not found"),
    ] {
        let response = get_export(&server, query, &token).await;
        assert_eq!(response.status(), 404, "{query}");
        let problem: serde_json::Value = response.json().await.unwrap();
        assert_eq!(problem["param"], "device", "{query}: {problem}");
        let text = problem["detail"].as_str().unwrap();
        assert!(text.contains(detail), "{query}: {text}");
    }
}

#[tokio::test]
async fn export_command_reports_bad_input() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    run_cli(
        &["user", "create", ADMIN_EMAIL, "--role", "admin"],
        &data_dir,
        Some(&format!("{ADMIN_PASSWORD}\n")),
    );
    let out_dir = temp.path().join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let csv = out_dir.join("x.csv");
    let csv = csv.to_str().unwrap();
    let missing_dir = temp.path().join("missing").join("x.csv");
    let txt = out_dir.join("x.txt");

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--start", "yesterday", "-o", csv],
            "invalid --start \"yesterday\"",
        ),
        (
            vec!["--end", "2024-02-30T00:00:00Z", "-o", csv],
            "invalid --end",
        ),
        (
            vec![
                "--start",
                "1714953600000",
                "--end",
                "2024-05-06T00:00:00Z",
                "-o",
                csv,
            ],
            "is not before end",
        ),
        (
            vec!["--device", "ghost", "-o", csv],
            "device \"ghost\" not found",
        ),
        (vec!["--keys", ",", "-o", csv], "--keys is empty"),
        (
            vec!["-o", txt.to_str().unwrap()],
            "--format parquet or --format csv",
        ),
        (
            vec!["-o", out_dir.to_str().unwrap(), "--format", "csv"],
            "is a directory",
        ),
        (
            vec!["-o", missing_dir.to_str().unwrap()],
            "cannot write the output file",
        ),
    ];
    for (args, expected) in &cases {
        let stderr = assert_cli_failure(args, &data_dir);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    assert_eq!(
        std::fs::read_dir(&out_dir).unwrap().count(),
        0,
        "failed exports leave no file"
    );

    let stderr = assert_cli_failure(&["-o", csv], &temp.path().join("nowhere"));
    assert!(stderr.contains("not a Ferrite data directory"), "{stderr}");
    assert!(
        !temp.path().join("nowhere").exists(),
        "no directory is created"
    );

    // An empty store exports a header and says that nothing matched.
    let stderr = assert_cli_success(&export_cli(&["-o", csv], &data_dir));
    assert!(stderr.contains("exported 0 rows"), "{stderr}");
    assert!(stderr.contains("no points matched"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(csv).unwrap(),
        format!("{CSV_HEADER}\r\n")
    );
}
