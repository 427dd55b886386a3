"""The audit log read by third-party clients. Actions made with curl and
httpx show up with their actor and user agent. The hash chain of the
JSON-lines export is recomputed here with hashlib, independently of the
server's code, and the CSV export is read with Python's csv module."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import subprocess

import httpx

from harness import ADMIN_EMAIL, ADMIN_PASSWORD, FerriteServer, unique_name

GENESIS_HASH = "0" * 64

# The fields of a record that its hash covers, in the order the server
# serializes them (docs/security.md, "Audit log").
CANONICAL_FIELDS = (
    "chain",
    "seq",
    "at_ms",
    "tenant_id",
    "actor_type",
    "actor_id",
    "actor_name",
    "action",
    "target_type",
    "target_id",
    "detail",
    "source",
    "user_agent",
    "outcome",
    "status",
)


def compact_json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def record_hash(record: dict) -> str:
    canonical = {name: record[name] for name in CANONICAL_FIELDS}
    canonical["detail"] = compact_json(record["detail"])
    digest = hashlib.sha256()
    digest.update(record["prev_hash"].encode())
    digest.update(compact_json(canonical).encode())
    return digest.hexdigest()


def login(client: httpx.Client) -> str:
    response = client.post(
        "/api/v1/auth/login", json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}
    )
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


def test_audit_chain_verifies_outside_server(server: FerriteServer) -> None:
    with httpx.Client(base_url=server.http_url, timeout=10) as client:
        token = login(client)
        headers = {"Authorization": f"Bearer {token}"}
        name = unique_name("audited")
        created = subprocess.run(
            [
                "curl", "-sS", "-A", "curl-audit-test",
                "-H", f"Authorization: Bearer {token}",
                "-H", "Content-Type: application/json",
                "-d", json.dumps({"name": name}),
                f"{server.http_url}/api/v1/devices",
            ],
            capture_output=True,
            check=True,
            timeout=10,
        )
        device_id = json.loads(created.stdout)["id"]
        response = client.delete(f"/api/v1/devices/{device_id}", headers=headers)
        assert response.status_code == 204, response.text

        export = client.get("/api/v1/audit/export", headers=headers)
        assert export.status_code == 200, export.text
        assert export.headers["content-type"].startswith("application/x-ndjson")
        records = [json.loads(line) for line in export.text.splitlines()]

        previous = GENESIS_HASH
        for expected_seq, record in enumerate(records, start=1):
            assert record["seq"] == expected_seq
            assert record["prev_hash"] == previous
            assert record["hash"] == record_hash(record), record
            previous = record["hash"]

        by_curl = [r for r in records if r["action"] == "device.create" and r["target_id"] == device_id]
        assert len(by_curl) == 1
        assert by_curl[0]["user_agent"] == "curl-audit-test"
        assert by_curl[0]["actor_name"] == ADMIN_EMAIL
        deleted = [r for r in records if r["action"] == "device.delete"]
        assert deleted[-1]["target_id"] == device_id
        assert deleted[-1]["user_agent"].startswith("python-httpx/")

        verify = client.get("/api/v1/audit/verify", headers=headers).json()
        assert verify["intact"] is True
        assert verify["head_hash"] == previous
        assert verify["records"] == len(records)


def test_audit_csv_export_reads_back(server: FerriteServer) -> None:
    with httpx.Client(base_url=server.http_url, timeout=10) as client:
        token = login(client)
        headers = {"Authorization": f"Bearer {token}"}
        name = unique_name('quoted "device", with comma')
        response = client.post("/api/v1/devices", json={"name": name}, headers=headers)
        assert response.status_code == 201, response.text

        export = client.get("/api/v1/audit/export", params={"format": "csv"}, headers=headers)
        assert export.status_code == 200, export.text
        rows = list(csv.DictReader(io.StringIO(export.text)))
        created = [row for row in rows if row["action"] == "device.create"]
        assert json.loads(created[-1]["detail"]) == {"name": name}

        viewer = server.create_api_key("viewer")
        denied = client.get("/api/v1/audit", headers={"Authorization": f"Bearer {viewer}"})
        assert denied.status_code == 403
