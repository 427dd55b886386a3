//! `summary`: Markdown tables from the result lines of a benchmark run.
//!
//! Reads JSON lines, one per run as the load subcommands print them, with any
//! fields the driver script added. For each known figure it prints one table
//! row per system. A row has the number of runs, the median, min and max of
//! the figure's metric, the reference system's median divided by this
//! system's median, and the medians of a few supporting values.
//!
//! Lines of the `queries` figure get two tables of their own: latency per
//! query and system, and the result sizes, which show whether the systems
//! returned equivalent results.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde_json::Value;

use crate::queries::Query;
use crate::stats::median;

#[derive(Args, Debug)]
pub struct SummaryArgs {
    /// File of JSON result lines; repeat to read several.
    #[arg(long = "results", required = true)]
    results: Vec<PathBuf>,
    /// System whose median is the numerator of every ratio.
    #[arg(long, default_value = "ferrite")]
    reference: String,
}

/// The title, metric and columns of one figure's table.
struct FigureSpec {
    figure: &'static str,
    title: &'static str,
    /// Dotted path of the metric in a result line.
    metric: &'static str,
    unit: &'static str,
    higher_is_better: bool,
    /// Whether the table has a column with the reference's median divided by each system's.
    ratio: bool,
    /// Dotted paths and column headers of supporting values.
    extras: &'static [(&'static str, &'static str)],
}

const FIGURES: [FigureSpec; 8] = [
    FigureSpec {
        figure: "lp",
        title: "HTTP line-protocol ingest",
        metric: "points_per_s",
        unit: "points/s",
        higher_is_better: true,
        ratio: true,
        extras: &[
            ("points_per_s_by_half.0", "first half points/s"),
            ("points_per_s_by_half.1", "second half points/s"),
            ("latency_ms.p50", "batch p50 ms"),
            ("latency_ms.p99", "batch p99 ms"),
            ("server_cpu_s", "server CPU s"),
            ("client_cpu_s", "generator CPU s"),
            ("other_cpu_s", "other processes CPU s"),
            ("server_syncs", "server fsync calls"),
        ],
    },
    FigureSpec {
        figure: "mqtt",
        title: "MQTT QoS 1 publishing",
        metric: "acks_per_s",
        unit: "PUBACKs/s",
        higher_is_better: true,
        ratio: true,
        extras: &[
            ("latency_ms.p50", "PUBACK p50 ms"),
            ("latency_ms.p99", "PUBACK p99 ms"),
            ("connected", "connections"),
            ("server_cpu_s", "server CPU s"),
            ("client_cpu_s", "generator CPU s"),
            ("other_cpu_s", "other processes CPU s"),
            ("server_syncs", "server fsync calls"),
        ],
    },
    FigureSpec {
        figure: "mqtt_split",
        title: "MQTT QoS 1 publishing, the same connections from two generator processes",
        metric: "acks_per_s",
        unit: "PUBACKs/s summed over both processes",
        higher_is_better: true,
        ratio: true,
        extras: &[("connected", "connections")],
    },
    FigureSpec {
        figure: "memory",
        title: "Resident memory of idle MQTT connections",
        metric: "kib_per_connection",
        unit: "KiB of VmRSS per connection",
        higher_is_better: false,
        ratio: true,
        extras: &[
            ("rss_before_mib", "VmRSS before MiB"),
            ("rss_after_mib", "VmRSS after MiB"),
            ("connected", "connections open"),
        ],
    },
    FigureSpec {
        figure: "lp_dataset",
        title: "Loading the IoT fleet dataset over HTTP line protocol, each system empty at the start",
        metric: "points_per_s",
        unit: "field values/s",
        higher_is_better: true,
        ratio: true,
        extras: &[
            ("lines_per_s", "lines/s"),
            ("elapsed_s", "load s"),
            ("latency_ms.p50", "batch p50 ms"),
            ("latency_ms.p99", "batch p99 ms"),
            ("server_cpu_s", "server CPU s"),
            ("generator_cpu_s", "generator CPU s while sending"),
            ("batches_failed", "failed batches"),
        ],
    },
    FigureSpec {
        figure: "storage",
        title: "Bytes on disk per field value after compaction",
        metric: "bytes_per_value",
        unit: "bytes of `du -B1` per field value",
        higher_is_better: false,
        ratio: true,
        extras: &[
            ("apparent_bytes_per_value", "apparent bytes per value"),
            ("disk_mib", "data MiB"),
            ("field_values", "field values"),
            ("compaction_s", "compaction wait s"),
        ],
    },
    FigureSpec {
        figure: "storage",
        title: "Resident memory of the server right after loading the dataset",
        metric: "rss_after_ingest_mib",
        unit: "MiB of VmRSS",
        higher_is_better: false,
        ratio: true,
        extras: &[
            ("rss_after_compaction_mib", "after compaction MiB"),
            ("rss_after_queries_mib", "after the queries MiB"),
        ],
    },
    FigureSpec {
        figure: "durability",
        title: "Acknowledged lines found after SIGKILL and restart",
        metric: "lines_after_sigkill",
        unit: "lines",
        higher_is_better: true,
        ratio: false,
        extras: &[("lines_acknowledged", "lines acknowledged")],
    },
];

pub fn run(args: &SummaryArgs) -> anyhow::Result<String> {
    let mut records = Vec::new();
    for path in &args.results {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the results file {}", path.display()))?;
        records.extend(parse_lines(&text).with_context(|| format!("in {}", path.display()))?);
    }
    Ok(render(&records, &args.reference))
}

fn parse_lines(text: &str) -> anyhow::Result<Vec<Value>> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(index, line)| {
            serde_json::from_str(line)
                .with_context(|| format!("line {} is not valid JSON", index + 1))
        })
        .collect()
}

/// Renders one table per figure that has records; figures without records are left out.
pub fn render(records: &[Value], reference: &str) -> String {
    let mut output = String::new();
    let of_figure = |figure: &str| -> Vec<&Value> {
        records
            .iter()
            .filter(|record| record.get("figure").and_then(Value::as_str) == Some(figure))
            .collect()
    };
    for spec in &FIGURES {
        let runs = of_figure(spec.figure);
        if !runs.is_empty() {
            render_figure(&mut output, spec, &runs, reference);
        }
    }
    let query_runs = of_figure("queries");
    if !query_runs.is_empty() {
        render_queries(&mut output, &query_runs, reference);
    }
    output
}

/// The system whose `queries` lines hold result sizes computed from the
/// generator, without latencies.
const EXPECTED: &str = "expected";

/// Relative difference below which two value sums count as equal.
const SUM_TOLERANCE: f64 = 1e-6;

/// Renders the latency table and the result-size table of the query set.
fn render_queries(output: &mut String, runs: &[&Value], reference: &str) {
    let systems = group_by_system(runs, reference);
    let timed: Vec<&(String, Vec<&Value>)> = systems
        .iter()
        .filter(|(system, _)| system != EXPECTED)
        .collect();
    let median_of = |system_runs: &[&Value], path: &str| median(&values(system_runs, path));

    let _ = writeln!(
        output,
        "### IoT fleet queries (ms per request, median over the runs of each run's p50 and p99; lower is better)\n"
    );
    let mut header = String::from("| Query |");
    let mut rule = String::from("| --- |");
    for (system, _) in &timed {
        let _ = write!(header, " {system} p50 | {system} p99 |");
        rule.push_str(" ---: | ---: |");
    }
    let peers: Vec<&&(String, Vec<&Value>)> = timed
        .iter()
        .filter(|(system, _)| system != reference)
        .collect();
    let reference_runs = timed
        .iter()
        .find(|(system, _)| system == reference)
        .map(|(_, runs)| runs.as_slice());
    if reference_runs.is_some() {
        for (peer, _) in &peers {
            let _ = write!(header, " {reference} / {peer} |");
            rule.push_str(" ---: |");
        }
    }
    let _ = writeln!(output, "{header}\n{rule}");
    for query in Query::ALL {
        let p50 = format!("queries.{}.latency_ms.p50", query.name());
        let p99 = format!("queries.{}.latency_ms.p99", query.name());
        let mut row = format!("| {} |", query.name());
        for (_, system_runs) in &timed {
            let _ = write!(
                row,
                " {} | {} |",
                format_optional(median_of(system_runs, &p50)),
                format_optional(median_of(system_runs, &p99))
            );
        }
        if let Some(reference_runs) = reference_runs {
            let ours = median_of(reference_runs, &p50);
            for (_, peer_runs) in &peers {
                let ratio = match (ours, median_of(peer_runs, &p50)) {
                    (Some(ours), Some(theirs)) if theirs != 0.0 => format!("{:.2}", ours / theirs),
                    _ => "n/a".to_owned(),
                };
                let _ = write!(row, " {ratio} |");
            }
        }
        let _ = writeln!(output, "{row}");
    }
    output.push('\n');

    let _ = writeln!(
        output,
        "### Result sizes of the queries (rows; the same count and value sum in every system means equivalent results)\n"
    );
    let mut header = String::from("| Query |");
    let mut rule = String::from("| --- |");
    for (system, _) in &systems {
        let _ = write!(header, " {system} |");
        rule.push_str(" ---: |");
    }
    header.push_str(" value sums |");
    rule.push_str(" --- |");
    let _ = writeln!(output, "{header}\n{rule}");
    let mut errors = Vec::new();
    for query in Query::ALL {
        let rows_path = format!("queries.{}.rows", query.name());
        let sum_path = format!("queries.{}.value_sum", query.name());
        let mut row = format!("| {} |", query.name());
        let mut sums: Vec<(&str, f64)> = Vec::new();
        for (system, system_runs) in &systems {
            let mut counts: Vec<String> = values(system_runs, &rows_path)
                .iter()
                .map(|rows| format_number(*rows))
                .collect();
            counts.dedup();
            let text = if counts.is_empty() {
                "n/a".to_owned()
            } else {
                counts.join(" / ")
            };
            let _ = write!(row, " {text} |");
            sums.extend(
                values(system_runs, &sum_path)
                    .into_iter()
                    .map(|sum| (system.as_str(), sum)),
            );
            for run in system_runs {
                let error = path_value(run, &format!("queries.{}.error", query.name()));
                if let Some(error) = error.and_then(Value::as_str) {
                    errors.push(format!("{system}, {}: {error}", query.name()));
                }
            }
        }
        let _ = writeln!(row, " {} |", compare_sums(&sums));
        output.push_str(&row);
    }
    output.push('\n');
    if !errors.is_empty() {
        errors.dedup();
        let _ = writeln!(output, "Errors reported by the query runs:\n");
        for error in errors {
            let _ = writeln!(output, "- {error}");
        }
        output.push('\n');
    }
}

/// Returns "equal" when every sum is within [`SUM_TOLERANCE`] of the first,
/// else names the systems whose sums differ from it.
fn compare_sums(sums: &[(&str, f64)]) -> String {
    let Some((first_system, first)) = sums.first() else {
        return "n/a".to_owned();
    };
    let mut differing: Vec<&str> = sums
        .iter()
        .filter(|(_, sum)| (sum - first).abs() > SUM_TOLERANCE * first.abs().max(1.0))
        .map(|(system, _)| *system)
        .collect();
    differing.dedup();
    if differing.is_empty() {
        "equal".to_owned()
    } else {
        format!("unlike {first_system}: {}", differing.join(", "))
    }
}

fn render_figure(output: &mut String, spec: &FigureSpec, runs: &[&Value], reference: &str) {
    let systems = group_by_system(runs, reference);
    let reference_median = systems
        .iter()
        .find(|(system, _)| system == reference)
        .and_then(|(_, runs)| median(&values(runs, spec.metric)));

    let better = if spec.higher_is_better {
        "higher"
    } else {
        "lower"
    };
    let _ = writeln!(
        output,
        "### {} ({}; {} is better)\n",
        spec.title, spec.unit, better
    );

    let mut header = String::from("| System | Runs | Median | Min | Max |");
    let mut rule = String::from("| --- | ---: | ---: | ---: | ---: |");
    if spec.ratio {
        let _ = write!(header, " {reference} / system |");
        rule.push_str(" ---: |");
    }
    for (_, label) in spec.extras {
        let _ = write!(header, " {label} |");
        rule.push_str(" ---: |");
    }
    let _ = writeln!(output, "{header}\n{rule}");

    let mut errors = Vec::new();
    for (system, system_runs) in &systems {
        let metric = values(system_runs, spec.metric);
        let ratio = match (reference_median, median(&metric)) {
            _ if system == reference => "1.00".to_owned(),
            (Some(ours), Some(theirs)) if theirs != 0.0 => format!("{:.2}", ours / theirs),
            _ => "n/a".to_owned(),
        };
        let min = metric.iter().copied().reduce(f64::min);
        let max = metric.iter().copied().reduce(f64::max);
        let mut row = format!(
            "| {system} | {} | {} | {} | {} |",
            metric.len(),
            format_optional(median(&metric)),
            format_optional(min),
            format_optional(max),
        );
        if spec.ratio {
            let _ = write!(row, " {ratio} |");
        }
        for (path, _) in spec.extras {
            let _ = write!(
                row,
                " {} |",
                format_optional(median(&values(system_runs, path)))
            );
        }
        let _ = writeln!(output, "{row}");

        for run in system_runs {
            if let Some(error) = run.get("first_error").and_then(Value::as_str) {
                errors.push(format!("{system}: {error}"));
            }
        }
    }
    output.push('\n');
    if !errors.is_empty() {
        let _ = writeln!(output, "Errors reported by the generator in these runs:\n");
        for error in errors {
            let _ = writeln!(output, "- {error}");
        }
        output.push('\n');
    }
}

/// Groups runs by their `system` field: the reference first, the others in
/// order of first appearance.
fn group_by_system<'a>(runs: &[&'a Value], reference: &str) -> Vec<(String, Vec<&'a Value>)> {
    let mut order: Vec<String> = Vec::new();
    let mut groups: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for run in runs {
        let system = run
            .get("system")
            .and_then(Value::as_str)
            .unwrap_or("unnamed")
            .to_owned();
        if !groups.contains_key(&system) {
            order.push(system.clone());
        }
        groups.entry(system).or_default().push(run);
    }
    order.sort_by_key(|system| system != reference);
    order
        .into_iter()
        .map(|system| {
            let runs = groups.remove(&system).unwrap_or_default();
            (system, runs)
        })
        .collect()
}

/// Collects the number at dotted `path` of each run, skipping runs without
/// it. A numeric part of the path indexes an array.
fn values(runs: &[&Value], path: &str) -> Vec<f64> {
    runs.iter()
        .filter_map(|run| path_value(run, path))
        .filter_map(Value::as_f64)
        .collect()
}

fn path_value<'a>(run: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(run, step)
}

fn step<'a>(value: &'a Value, key: &str) -> Option<&'a Value> {
    match key.parse::<usize>() {
        Ok(index) if value.is_array() => value.get(index),
        _ => value.get(key),
    }
}

fn format_optional(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".to_owned(), format_number)
}

/// Formats whole numbers and numbers from 1,000 up without decimals and with
/// thousands separators, others with one decimal from 100 and two below.
fn format_number(value: f64) -> String {
    let whole = value.fract() == 0.0;
    if value.abs() < 100.0 && !whole {
        return format!("{value:.2}");
    }
    if value.abs() < 1000.0 && !whole {
        return format!("{value:.1}");
    }
    let digits = format!("{:.0}", value.abs());
    let mut grouped = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    if value < 0.0 {
        format!("-{grouped}")
    } else {
        grouped
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn number_formatting() {
        assert_eq!(format_number(1_234_567.4), "1,234,567");
        assert_eq!(format_number(1000.0), "1,000");
        assert_eq!(format_number(303.0), "303");
        assert_eq!(format_number(0.0), "0");
        assert_eq!(format_number(999.94), "999.9");
        assert_eq!(format_number(12.345), "12.35");
        assert_eq!(format_number(-12_345.0), "-12,345");
    }

    #[test]
    fn table_has_median_and_ratio() {
        let records = vec![
            json!({"figure": "lp", "system": "influxdb", "points_per_s": 100.0}),
            json!({"figure": "lp", "system": "ferrite", "points_per_s": 300.0, "latency_ms": {"p50": 2.0},
                   "points_per_s_by_half": [310.0, 290.0]}),
            json!({"figure": "lp", "system": "ferrite", "points_per_s": 200.0, "latency_ms": {"p50": 4.0}}),
            json!({"figure": "lp", "system": "ferrite", "points_per_s": 250.0, "latency_ms": {"p50": 3.0}}),
            json!({"figure": "lp", "system": "influxdb", "points_per_s": 125.0}),
        ];
        let text = render(&records, "ferrite");
        let rows: Vec<&str> = text.lines().filter(|line| line.starts_with("| ")).collect();

        assert!(rows[0].starts_with("| System |"), "{text}");
        assert!(rows[1].starts_with("| --- |"), "{text}");
        assert_eq!(
            rows[2],
            "| ferrite | 3 | 250 | 200 | 300 | 1.00 | 310 | 290 | 3 | n/a | n/a | n/a | n/a | n/a |"
        );
        assert_eq!(
            rows[3],
            "| influxdb | 2 | 112.5 | 100 | 125 | 2.22 | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a |"
        );
    }

    #[test]
    fn figures_without_runs_are_left_out() {
        let records = vec![json!({"figure": "mqtt", "system": "ferrite", "acks_per_s": 10.0})];
        let text = render(&records, "ferrite");
        assert!(text.contains("MQTT QoS 1 publishing"));
        assert!(!text.contains("line-protocol"));
    }

    #[test]
    fn durability_table_has_no_ratio() {
        let records = vec![
            json!({"figure": "durability", "system": "ferrite", "lines_after_sigkill": 5000, "lines_acknowledged": 5000}),
            json!({"figure": "durability", "system": "victoriametrics", "lines_after_sigkill": 0, "lines_acknowledged": 5000}),
        ];
        let text = render(&records, "ferrite");
        assert!(
            text.contains("| System | Runs | Median | Min | Max | lines acknowledged |"),
            "{text}"
        );
        assert!(
            text.contains("| victoriametrics | 1 | 0 | 0 | 0 | 5,000 |"),
            "{text}"
        );
    }

    #[test]
    fn errors_are_listed() {
        let records = vec![json!({
            "figure": "mqtt", "system": "mosquitto", "acks_per_s": 10.0, "first_error": "connect failed"
        })];
        let text = render(&records, "ferrite");
        assert!(text.contains("- mosquitto: connect failed"), "{text}");
        assert!(
            text.contains("| mosquitto | 1 | 10 | 10 | 10 | n/a |"),
            "{text}"
        );
    }

    #[test]
    fn query_tables_compare_systems() {
        let queries = |p50: f64, rows: u64, sum: f64| {
            json!({
                "last-loc": {"latency_ms": {"p50": p50, "p99": p50 * 2.0}, "rows": rows, "value_sum": sum},
                "low-fuel": {"latency_ms": null, "rows": null, "value_sum": null, "error": "HTTP 404"}
            })
        };
        let records = vec![
            json!({"figure": "queries", "system": "expected", "queries": {
                "last-loc": {"latency_ms": null, "rows": 250, "value_sum": 10.5}}}),
            json!({"figure": "queries", "system": "influxdb", "queries": queries(4.0, 250, 10.5)}),
            json!({"figure": "queries", "system": "ferrite", "queries": queries(1.0, 250, 10.5)}),
            json!({"figure": "queries", "system": "ferrite", "queries": queries(3.0, 250, 10.5)}),
            json!({"figure": "queries", "system": "victoriametrics", "queries": queries(0.5, 249, 9.0)}),
        ];
        let text = render(&records, "ferrite");

        assert!(
            text.contains("| Query | ferrite p50 | ferrite p99 | influxdb p50 | influxdb p99 | victoriametrics p50 | victoriametrics p99 | ferrite / influxdb | ferrite / victoriametrics |"),
            "{text}"
        );
        assert!(
            text.contains("| last-loc | 2 | 4 | 4 | 8 | 0.50 | 1 | 0.50 | 4.00 |"),
            "{text}"
        );
        assert!(
            text.contains(
                "| Query | ferrite | expected | influxdb | victoriametrics | value sums |"
            ),
            "{text}"
        );
        assert!(
            text.contains("| last-loc | 250 | 250 | 250 | 249 | unlike ferrite: victoriametrics |"),
            "{text}"
        );
        assert!(
            text.contains("| low-fuel | n/a | n/a | n/a | n/a | n/a |"),
            "{text}"
        );
        assert!(text.contains("- ferrite, low-fuel: HTTP 404"), "{text}");
    }

    #[test]
    fn value_sums_within_tolerance_are_equal() {
        assert_eq!(
            compare_sums(&[("a", 1000.0), ("b", 1_000.000_000_1)]),
            "equal"
        );
        assert_eq!(
            compare_sums(&[("a", 1.0), ("b", 1.1), ("c", 1.1)]),
            "unlike a: b, c"
        );
        assert_eq!(compare_sums(&[]), "n/a");
    }

    #[test]
    fn invalid_line_is_reported() {
        let error = parse_lines("{\"figure\": \"lp\"}\nnot json\n").unwrap_err();
        assert!(error.to_string().contains("line 2"), "{error}");
    }
}
