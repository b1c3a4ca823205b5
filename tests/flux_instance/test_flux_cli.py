"""The ``executorlib`` command inside a real Flux instance."""

from __future__ import annotations

import subprocess
import sys

import pytest


def executorlib(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "import sys; from executorlib.cli import main; sys.exit(main())", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=200)


@pytest.mark.timeout(220)
@pytest.mark.parametrize("pmi_mode", [None, "pmix"])
def test_hello_on_flux_allocation(in_tmp, pmi_mode):
    pmi = ["--pmi-mode", pmi_mode] if pmi_mode else []
    done = executorlib("hello", "--backend", "flux_allocation", *pmi)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "python call          ok   host" in done.stdout
    assert "ranks 0, 1 of 2 on" in done.stdout


@pytest.mark.timeout(220)
def test_hello_with_a_pmi_mode_flux_cannot_serve_says_so(in_tmp):
    done = executorlib("hello", "--backend", "flux_allocation", "--pmi-mode", "pmi3")
    assert done.returncode == 1
    assert "pmi_mode='pmi3': this Flux instance serves no PMI of that name" in done.stdout + done.stderr
