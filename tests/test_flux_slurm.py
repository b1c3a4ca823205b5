""""Slurm with Flux" across nodes: an ``sbatch -p multi -N 2`` job of the test cluster
runs ``srun flux start python script.py``, and the script's flux_allocation executor
places calls on both nodes (tests/slurm_scripts/flux_multi_node.py).

Which PMI bootstraps the brokers: ``srun --mpi=pmi2`` works as is; ``srun --mpi=pmix``
needs ``flux start -Sbroker.boot-method=pmix`` (flux-pmix's boot plugin): without it
each broker finds no PMI it tries by default and starts an instance of its own, one
per node, each of size 1 (a silent trap, checked below).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slurm_scripts", "flux_multi_node.py")


@pytest.fixture(scope="module")
def cluster_with_flux():
    """The test cluster with partition 'multi', and flux on PATH (scripts/find-flux)."""
    if shutil.which("flux") is None:
        pytest.fail("'flux' is not on PATH: run scripts/run-tests, or eval \"$(scripts/find-flux)\" first")
    try:
        shown = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.fail(f"Slurm is not reachable ({error}); run scripts/slurm-test-cluster start --nodes 2")
    if "multi" not in shown:
        pytest.fail("the test cluster has no partition 'multi': scripts/slurm-test-cluster start --nodes 2")


def sbatch_flux(tmp_path, srun_mpi: str, start_options: str, *script_args: str) -> str:
    """``sbatch -p multi -N 2`` running ``srun --mpi=SRUN_MPI flux start ... python SCRIPT``."""
    output = tmp_path / "job.out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "FLUX_"))}
    wrap = (f"srun --mpi={srun_mpi} flux start {start_options} {sys.executable} {SCRIPT} "
            + " ".join(script_args))
    command = ["sbatch", "--wait", "--quiet", "--partition=multi", "--nodes=2", "--ntasks-per-node=1",
               "--time=5", f"--output={output}", "--job-name=executorlib-flux-test", f"--wrap={wrap}"]
    subprocess.run(command, env=env, cwd=tmp_path, timeout=280, check=False)
    return output.read_text() if output.exists() else ""


def reports(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("srun_mpi", "start_options", "pmi_mode"), [
    ("pmi2", "", None),
    ("pmix", "-Sbroker.boot-method=pmix", "pmix"),
])
def test_flux_instance_over_two_slurm_nodes_runs_calls_on_both(
    cluster_with_flux, tmp_path, srun_mpi, start_options, pmi_mode
):
    markers = tmp_path / "markers"
    markers.mkdir()
    output = sbatch_flux(tmp_path, srun_mpi, start_options, str(markers), *([pmi_mode] if pmi_mode else []))
    found = reports(output)
    assert len(found) == 1, f"one instance over both nodes should report once; the job printed:\n{output}"
    [report] = found
    assert report["instance"] == ["2", "4", "n[1-2]"]
    assert report["executor"] in ("n1", "n2")
    assert report["nodes"] == ["n1", "n2"]
    assert [rank for rank, _ in report["mpi"]] == [0, 1], report["mpi"]
    assert sorted(host for _, host in report["mpi"]) == ["n1", "n2"]


@pytest.mark.timeout(300)
def test_pmix_without_the_boot_method_starts_one_instance_per_node(cluster_with_flux, tmp_path):
    """The trap the README warns about, kept visible: two instances of one node each."""
    output = sbatch_flux(tmp_path, "pmix", "", "--instance-only")
    instances = sorted(tuple(report["instance"]) for report in reports(output))
    assert instances == [("1", "2", "n1"), ("1", "2", "n2")], output
