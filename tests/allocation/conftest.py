"""Tests that run INSIDE a Slurm allocation: ``scripts/run-allocation-tests`` starts
``salloc -n 8 --gres=gpu:2`` and runs ``pytest tests/allocation`` in it.

A plain ``pytest tests`` outside an allocation does not collect this folder (see
``collect_ignore`` in tests/conftest.py); run directly outside one, every test fails
with the reason instead of testing nothing.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_configure(config):
    # Workers import the functions of these test modules by name.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))


@pytest.fixture(autouse=True)
def inside_allocation():
    """Fail (not skip) outside an allocation: these tests exist to run inside one."""
    if not os.environ.get("SLURM_JOB_ID"):
        pytest.fail(
            "tests/allocation must run inside a Slurm allocation (SLURM_JOB_ID is not set): "
            "run scripts/run-allocation-tests (after scripts/slurm-test-cluster start --nodes 2)"
        )


def _executorlib_steps() -> list[str]:
    shown = subprocess.run(
        ["squeue", "-h", "-s", "-j", os.environ["SLURM_JOB_ID"], "-o", "%i %j"],
        capture_output=True, text=True, timeout=30,
    ).stdout
    return [line for line in shown.splitlines() if line.endswith(" executorlib")]


@pytest.fixture(autouse=True)
def no_steps_left(inside_allocation):
    """Fail a test after which a worker step of this allocation is still running."""
    yield
    deadline = time.monotonic() + 10
    while (left := _executorlib_steps()) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:
        pytest.fail("the test left Slurm steps running: " + ", ".join(left))
