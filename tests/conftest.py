"""Shared test set-up: every test is time-bounded (pytest-timeout, see pyproject.toml)
and must leave no process behind: after each test, the test's child processes and any
new executorlib worker of this test session (wherever it runs: srun steps and orphans
included, recognised by a session marker in their environment) must be gone within a
grace period. Workers of other sessions on the same machine are left alone."""

from __future__ import annotations

import contextlib
import os
import time
import uuid

import psutil
import pytest

_GRACE_S = 15.0
# tests/allocation runs inside a real salloc (scripts/run-allocation-tests), not here.
collect_ignore = [] if os.environ.get("SLURM_JOB_ID") else ["allocation"]


_SESSION = os.environ.setdefault("EXECUTORLIB_TEST_SESSION", uuid.uuid4().hex)


def _workers() -> set[int]:
    """PIDs of this session's executorlib worker processes on this machine (any parent)."""
    found = set()
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if any("executorlib.backend" in part for part in cmdline):
            with contextlib.suppress(psutil.Error):
                if process.environ().get("EXECUTORLIB_TEST_SESSION") == _SESSION:
                    found.add(process.info["pid"])
    return found


def _leftovers(before: set[int]) -> list[psutil.Process]:
    me = psutil.Process()
    pids = {child.pid for child in me.children(recursive=True)} | (_workers() - before)
    alive = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.fixture(autouse=True)
def no_leftover_processes():
    """Fail a test that leaves child processes or executorlib workers running."""
    before = _workers()
    yield
    deadline = time.monotonic() + _GRACE_S
    while (left := _leftovers(before)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        description = [f"{p.pid}: {' '.join(p.cmdline())[:200]}" for p in left]
        for process in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        pytest.fail("the test left processes running:\n" + "\n".join(description))


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run the test in its own temporary working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def pytest_configure(config):
    # Workers started by tests must find the test modules (functions travel by reference).
    here = os.path.dirname(__file__)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
