"""Exports read back with DuckDB, pandas and pyarrow: `GET /api/v1/export`
while the server runs, then `ferrite export` on the stopped server's data
directory. Every point written must come back once, with its type and its
nanosecond time, in both Parquet and CSV."""

from __future__ import annotations

import csv
import math
import subprocess
import time
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import requests

from harness import CLI_TIMEOUT_S, POLL_INTERVAL_S, Device, FerriteServer

T0_MS = 1_714_953_600_000
T0_NS = T0_MS * 1_000_000
# More points than one page of the exporter (16384), so paging is exercised.
COUNTER_POINTS = 40_000
# Each request stays below the server's 256 KiB body limit.
LINES_PER_REQUEST = 5_000
EXPORT_TIMEOUT_S = 60

VALUE_COLUMNS = ("value_float", "value_int", "value_bool", "value_string")
ARROW_SCHEMA = pa.schema(
    [
        pa.field("device_id", pa.string(), nullable=False),
        pa.field("device", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("time", pa.timestamp("ns", tz="UTC"), nullable=False),
        pa.field("value_float", pa.float64()),
        pa.field("value_int", pa.int64()),
        pa.field("value_bool", pa.bool_()),
        pa.field("value_string", pa.string()),
    ]
)
DUCKDB_TYPES = ["VARCHAR", "VARCHAR", "VARCHAR", "TIMESTAMPTZ_NS", "DOUBLE", "BIGINT", "BOOLEAN", "VARCHAR"]
CSV_TYPES = {
    "time": "TIMESTAMP_NS",
    "value_float": "DOUBLE",
    "value_int": "BIGINT",
    "value_bool": "BOOLEAN",
    "value_string": "VARCHAR",
}

# One expected row: (device_id, device, key, time in ns, value column, value).
Row = tuple[str, str, str, int, str, Any]


def create_named_device(server: FerriteServer, name: str) -> Device:
    created = server.run_cli("device", "create", name)
    return Device(id=created["id"], name=created["name"], token=created["token"])


def write_data(server: FerriteServer) -> list[Row]:
    """Write points of every type to three devices and return the rows the
    export must contain, in its order: device name, key, time."""
    boiler = create_named_device(server, "boiler-1")
    hall = create_named_device(server, 'hall, "north"')
    meter = create_named_device(server, "meter-ü")
    server.run_cli("device", "create", "spare")

    json_points = [
        {"ts": T0_MS, "values": {"temperature": 21.5, "on": True, "mode": "eco", "count": 7}},
        {"ts": T0_MS + 1000, "values": {"temperature": 1.0, "on": False, "mode": 'say "hi", then\r\nbye', "count": -(2**63)}},
        {"ts": T0_MS + 2000, "values": {"mode": "", "count": 2**63 - 1, "temperature": 1e300}},
    ]
    response = requests.post(f"{server.http_url}/api/v1/{boiler.token}/telemetry", json=json_points, timeout=10)
    assert response.status_code == 200, response.text

    lines = (
        f'env humidity=40.5,door="open, wide",ok=t,n=3i {T0_NS + 123}\n'
        f'env humidity=41,door="",ok=f,n=-4i {T0_NS + 456}\n'
        f"env humidity=0.1 {T0_NS + 1_999_999_999}\n"
    )
    write_lines(server, hall, lines)
    for first in range(0, COUNTER_POINTS, LINES_PER_REQUEST):
        batch = "".join(f"power kwh={i}i {T0_NS + i * 1000}\n" for i in range(first, first + LINES_PER_REQUEST))
        write_lines(server, meter, batch)

    ms = 1_000_000
    b = (boiler.id, boiler.name)
    h = (hall.id, hall.name)
    rows: list[Row] = [
        (*b, "count", T0_NS, "value_int", 7),
        (*b, "count", T0_NS + 1000 * ms, "value_int", -(2**63)),
        (*b, "count", T0_NS + 2000 * ms, "value_int", 2**63 - 1),
        (*b, "mode", T0_NS, "value_string", "eco"),
        (*b, "mode", T0_NS + 1000 * ms, "value_string", 'say "hi", then\r\nbye'),
        (*b, "mode", T0_NS + 2000 * ms, "value_string", ""),
        (*b, "on", T0_NS, "value_bool", True),
        (*b, "on", T0_NS + 1000 * ms, "value_bool", False),
        (*b, "temperature", T0_NS, "value_float", 21.5),
        (*b, "temperature", T0_NS + 1000 * ms, "value_float", 1.0),
        (*b, "temperature", T0_NS + 2000 * ms, "value_float", 1e300),
        (*h, "env.door", T0_NS + 123, "value_string", "open, wide"),
        (*h, "env.door", T0_NS + 456, "value_string", ""),
        (*h, "env.humidity", T0_NS + 123, "value_float", 40.5),
        (*h, "env.humidity", T0_NS + 456, "value_float", 41.0),
        (*h, "env.humidity", T0_NS + 1_999_999_999, "value_float", 0.1),
        (*h, "env.n", T0_NS + 123, "value_int", 3),
        (*h, "env.n", T0_NS + 456, "value_int", -4),
        (*h, "env.ok", T0_NS + 123, "value_bool", True),
        (*h, "env.ok", T0_NS + 456, "value_bool", False),
    ]
    rows += [(meter.id, meter.name, "power.kwh", T0_NS + i * 1000, "value_int", i) for i in range(COUNTER_POINTS)]
    assert rows == sorted(rows, key=lambda row: (row[1], row[2], row[3]))
    return rows


def write_lines(server: FerriteServer, device: Device, body: str) -> None:
    response = requests.post(
        f"{server.http_url}/write",
        params={"precision": "ns"},
        data=body.encode(),
        headers={"Authorization": f"Token {device.token}"},
        timeout=10,
    )
    assert response.status_code == 204, response.text


def download(server: FerriteServer, path: Path, **params: str) -> requests.Response:
    """Save `GET /api/v1/export` with the operator key to `path`."""
    response = requests.get(
        f"{server.http_url}/api/v1/export",
        params=params,
        headers={"Authorization": f"Bearer {server.operator_key}"},
        timeout=EXPORT_TIMEOUT_S,
    )
    assert response.status_code == 200, response.text
    path.write_bytes(response.content)
    return response


def run_export(server: FerriteServer, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(server.binary), "export", *args, "--data-dir", str(server.data_dir)],
        capture_output=True,
        env=server.environment(),
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


def as_rows(records: list[tuple], empty_string_is_null: bool = False) -> list[Row]:
    """Turn (device_id, device, key, time_ns, float, int, bool, string)
    records into expected-row form, checking that exactly one value is set.
    With `empty_string_is_null`, a record without a value stands for an
    empty string, for readers that read `""` as null."""
    rows = []
    for record in records:
        values = [(column, value) for column, value in zip(VALUE_COLUMNS, record[4:]) if not is_null(value)]
        if not values and empty_string_is_null:
            values = [("value_string", "")]
        assert len(values) == 1, f"exactly one value column must be set: {record}"
        rows.append((record[0], record[1], record[2], int(record[3]), *values[0]))
    return rows


def is_null(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def check_parquet(path: Path, expected: list[Row]) -> pa.Table:
    table = pq.read_table(path)
    assert table.schema.remove_metadata() == ARROW_SCHEMA
    assert table.num_rows == len(expected)
    columns = [table.column(name).to_pylist() for name in ("device_id", "device", "key")]
    columns.append(table.column("time").cast(pa.int64()).to_pylist())
    columns += [table.column(name).to_pylist() for name in VALUE_COLUMNS]
    assert as_rows(list(zip(*columns))) == expected

    metadata = pq.ParquetFile(path).metadata
    row_group = metadata.row_group(0)
    compressions = [row_group.column(index).compression for index in range(row_group.num_columns)]
    assert compressions == ["ZSTD"] * 8
    for index in (0, 1, 2):
        assert row_group.column(index).has_dictionary_page, f"column {index} is not dictionary encoded"
    sort_order = [(column.column_index, column.descending) for column in row_group.sorting_columns]
    assert sort_order == [(1, False), (2, False), (3, False)]
    return table


def check_duckdb_parquet(path: Path, expected: list[Row]) -> None:
    relation = duckdb.sql(f"SELECT * FROM read_parquet('{path}')")
    assert [str(column_type) for column_type in relation.types] == DUCKDB_TYPES
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{path}')").fetchall() == [(len(expected),)]
    records = duckdb.sql(
        f"SELECT device_id, device, key, epoch_ns(time), {', '.join(VALUE_COLUMNS)} FROM read_parquet('{path}')"
    ).fetchall()
    assert as_rows(records) == expected


def check_duckdb_csv(path: Path, expected: list[Row]) -> None:
    query = f"SELECT device_id, device, key, epoch_ns(time), {', '.join(VALUE_COLUMNS)} FROM read_csv('{path}', types = {CSV_TYPES}, allow_quoted_nulls = false)"
    records = duckdb.sql(query).fetchall()
    assert as_rows(records) == expected


def frame_records(frame: pd.DataFrame) -> list[tuple]:
    return list(
        zip(
            frame["device_id"],
            frame["device"],
            frame["key"],
            frame["time"].map(lambda timestamp: timestamp.value),
            *(frame[name] for name in VALUE_COLUMNS),
        )
    )


def check_pandas(parquet_path: Path, csv_path: Path, expected: list[Row]) -> None:
    frame = pd.read_parquet(parquet_path, dtype_backend="pyarrow")
    assert str(frame["time"].dtype) == "timestamp[ns, tz=UTC][pyarrow]"
    assert str(frame["value_int"].dtype) == "int64[pyarrow]"
    assert as_rows(frame_records(frame)) == expected

    frame = pd.read_csv(
        csv_path,
        dtype={"value_int": "Int64", "value_bool": "boolean", "value_string": "string"},
        parse_dates=["time"],
    )
    assert str(frame["time"].dtype) == "datetime64[ns, UTC]"
    assert str(frame["value_float"].dtype) == "float64"
    assert as_rows(frame_records(frame), empty_string_is_null=True) == expected


def wait_for_rows(server: FerriteServer, path: Path, count: int) -> None:
    """Poll the CSV export until it has `count` rows."""
    deadline = time.monotonic() + 10
    rows = 0
    while time.monotonic() < deadline:
        download(server, path, format="csv")
        with path.open(newline="", encoding="utf-8") as file:
            rows = sum(1 for _ in csv.reader(file)) - 1
        if rows == count:
            return
        time.sleep(POLL_INTERVAL_S)
    raise AssertionError(f"expected {count} exported rows within 10 s, got {rows}")


def test_export_reads_back_in_duckdb_pandas_and_pyarrow(own_server: FerriteServer, tmp_path: Path) -> None:
    expected = write_data(own_server)
    wait_for_rows(own_server, tmp_path / "poll.csv", len(expected))

    # The endpoint.
    http_parquet = tmp_path / "http.parquet"
    response = download(own_server, http_parquet)
    assert response.headers["Content-Type"] == "application/vnd.apache.parquet"
    assert response.headers["Content-Disposition"].startswith('attachment; filename="ferrite-export-')
    http_csv = tmp_path / "http.csv"
    response = download(own_server, http_csv, format="csv")
    assert response.headers["Content-Type"] == "text/csv; charset=utf-8"

    http_table = check_parquet(http_parquet, expected)
    check_duckdb_parquet(http_parquet, expected)
    check_duckdb_csv(http_csv, expected)
    check_pandas(http_parquet, http_csv, expected)

    # The endpoint with a filter.
    subset = tmp_path / "subset.parquet"
    download(own_server, subset, device="boiler-1", keys="count,on", start=str(T0_MS + 1), end=str(T0_MS + 2000))
    selected = [
        row for row in expected if row[1] == "boiler-1" and row[2] in ("count", "on") and row[3] == T0_NS + 1000 * 1_000_000
    ]
    assert len(selected) == 2
    check_parquet(subset, selected)

    # The command, on the stopped server's data directory.
    assert own_server.stop() == 0, own_server.log_tail()
    cli_parquet = tmp_path / "cli.parquet"
    cli_csv = tmp_path / "cli.csv"
    for path in (cli_parquet, cli_csv):
        result = run_export(own_server, "--output", str(path))
        stderr = result.stderr.decode()
        assert result.returncode == 0, stderr
        assert f"exported {len(expected)} rows (3 devices, 9 series)" in stderr, stderr

    assert check_parquet(cli_parquet, expected).equals(http_table)
    check_duckdb_parquet(cli_parquet, expected)
    assert cli_csv.read_bytes() == http_csv.read_bytes()


def test_export_command_refuses_running_server(own_server: FerriteServer, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    result = run_export(own_server, "--output", str(out_dir / "export.parquet"))

    stderr = result.stderr.decode()
    assert result.returncode != 0
    assert "locked" in stderr, stderr
    assert "GET /api/v1/export" in stderr, stderr
    assert list(out_dir.iterdir()) == []
