"""Tests that run INSIDE a real Flux instance: ``scripts/run-tests`` starts

    flux start --test-size=2 --test-hosts=fake[0-1] --config-path=tests/flux_instance/config \
        python3 -m pytest tests/flux_instance

(two brokers, each declared with 4 cores and 2 GPUs). A plain ``pytest tests`` outside
an instance does not collect this folder (see tests/conftest.py); run directly outside
one, every test fails with the reason instead of testing nothing.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
START = "flux start --test-size=2 --test-hosts=fake[0-1] --config-path=tests/flux_instance/config"


def pytest_configure(config):
    # Workers import the functions of these test modules by name.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))


@pytest.fixture(autouse=True)
def inside_flux():
    """Fail (not skip) outside a Flux instance: these tests exist to run inside one."""
    if not os.environ.get("FLUX_URI"):
        pytest.fail(f"tests/flux_instance must run inside a Flux instance (FLUX_URI is not set): run "
                    f"scripts/run-tests, or `{START} python3 -m pytest tests/flux_instance`")
    try:
        import flux  # noqa: F401
    except ImportError as error:
        pytest.fail(f"`import flux` failed ({error}): put flux-core's Python bindings on PYTHONPATH")


def active_jobs() -> list[str]:
    """The jobs of this instance that have not ended: 'ID NAME' each."""
    shown = subprocess.run(["flux", "jobs", "--no-header", "--filter=active", "--format={id.f58} {name}"],
                           capture_output=True, text=True, timeout=60, check=True).stdout
    return shown.splitlines()


@pytest.fixture(autouse=True)
def no_jobs_left(inside_flux):
    """Fail a test after which a job of this instance is still there (and cancel it)."""
    yield
    deadline = time.monotonic() + 15
    while (left := active_jobs()) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:
        subprocess.run(["flux", "cancel", "--all"], capture_output=True, timeout=60)
        pytest.fail("the test left Flux jobs behind: " + ", ".join(left))
