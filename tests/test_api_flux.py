"""The seed's HPC-allocation examples inside a real ``flux start``, unchanged but for
``backend="flux_allocation"`` (the form they were written in)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _flux() -> tuple[str, str] | None:
    """(the flux command, the folder of its Python bindings), or None without Flux."""
    flux = shutil.which("flux") or ("/opt/flux/bin/flux" if os.path.exists("/opt/flux/bin/flux") else None)
    if flux is None:
        return None
    prefix = os.path.dirname(os.path.dirname(os.path.realpath(flux)))
    found = glob.glob(os.path.join(prefix, "lib", "python3*", "site-packages", "flux"))
    return (flux, os.path.dirname(found[0])) if found else None


@pytest.mark.timeout(600)
def test_seed_hpc_allocation_examples_run_unchanged_on_flux(tmp_path):
    found = _flux()
    if found is None:
        pytest.skip("no flux-core build here (flux on PATH or /opt/flux; ../shared/flux/build.sh)")
    flux, bindings = found
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [bindings, env.get("PYTHONPATH")]))
    script = os.path.join(HERE, "seed_scripts", "hpc_allocation.py")
    done = subprocess.run(
        [flux, "start", "--test-size=2", sys.executable, script, "flux_allocation", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=540, cwd=tmp_path, env=env,
    )
    assert done.returncode == 0, done.stderr
    assert [json.loads(line) for line in done.stdout.splitlines()] == [
        {"mpi": [[3, 2, 0], [3, 2, 1]]}, {"preload": 10}, {"threads": [1, "2"]},
        {"dependencies": 6}, {"map": [5, 7, 9]}, {"cache": [2, 4, 6]}, {"cache": [2, 4, 6]},
    ]
    assert "is ignored" not in done.stderr
