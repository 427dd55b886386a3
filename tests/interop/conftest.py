"""Fixtures: `server`, one `ferrite serve` process per test module, and
`own_server`, one per test for tests that stop or restart it.

Each server has its own temporary data directory and free loopback ports.
Tests create their own devices, so they do not see each other's data. At
teardown the server gets SIGTERM and must exit with code 0 without a panic
in its log.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import FerriteServer, ferrite_binary


def run_server(base: Path) -> Iterator[FerriteServer]:
    try:
        binary = ferrite_binary()
    except FileNotFoundError as error:
        pytest.fail(str(error), pytrace=False)
    instance = FerriteServer(binary, data_dir=base / "data", log_path=base / "ferrite.log")
    try:
        instance.start()
    except BaseException:
        instance.stop()
        raise

    yield instance

    exit_code = instance.stop()
    assert "panicked" not in instance.log_text(), f"the server panicked:\n{instance.log_tail()}"
    assert exit_code == 0, (
        f"ferrite serve exited with {exit_code} after SIGTERM (None: killed after a timeout):\n"
        f"{instance.log_tail()}"
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FerriteServer]:
    yield from run_server(tmp_path_factory.mktemp("ferrite"))


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[FerriteServer]:
    yield from run_server(tmp_path)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """Attach the end of the server log to the report of a failed test."""
    outcome = yield
    report = outcome.get_result()
    funcargs = getattr(item, "funcargs", {})
    for name in ("server", "own_server"):
        instance = funcargs.get(name)
        if report.failed and isinstance(instance, FerriteServer):
            report.sections.append((f"ferrite serve log (last 40 lines, {name})", instance.log_tail()))
