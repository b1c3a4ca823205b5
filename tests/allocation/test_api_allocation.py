"""Inside a real salloc: existing scripts run with only backend= changed, MPI without
pmi_mode on a cluster whose MpiDefault is none, local GPUs from the allocation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from executorlib import Executor
from executorlib.slurm import cluster_mpi

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_WAIT_S = 120


def ranks(i):
    from mpi4py import MPI

    return i, MPI.COMM_WORLD.Get_size(), MPI.COMM_WORLD.Get_rank()


def test_mpi_without_pmi_mode_chooses_one_the_cluster_offers():
    default, offered = cluster_mpi()
    assert default == "none" and "pmix" in offered  # the test cluster: MpiDefault=none
    with Executor(backend="slurm_allocation", resource_dict={"cores": 2}) as exe:
        assert exe.submit(ranks, 1).result(timeout=_WAIT_S) == [(1, 2, 0), (1, 2, 1)]
        assert exe.info["pmi_mode"] == "pmix"


def test_flux_pmi_keyword_means_srun_mpi_here():
    with Executor(backend="slurm_allocation", flux_executor_pmi_mode="pmi2") as exe:
        assert exe.info["pmi_mode"] == "pmi2"  # what srun --mpi= gets (Debian's OpenMPI lacks it)
    with Executor(backend="slurm_allocation", flux_executor_pmi_mode="pmix",
                  resource_dict={"cores": 2}) as exe:
        assert exe.info["pmi_mode"] == "pmix"
        assert exe.submit(ranks, 2).result(timeout=_WAIT_S) == [(2, 2, 0), (2, 2, 1)]


def test_seed_hpc_allocation_examples_run_unchanged_on_slurm(tmp_path):
    script = os.path.join(ROOT, "tests", "seed_scripts", "hpc_allocation.py")
    done = subprocess.run(
        [sys.executable, script, "slurm_allocation", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert [json.loads(line) for line in done.stdout.splitlines()] == [
        {"mpi": [[3, 2, 0], [3, 2, 1]]}, {"preload": 10}, {"threads": [1, "2"]},
        {"dependencies": 6}, {"map": [5, 7, 9]}, {"cache": [2, 4, 6]}, {"cache": [2, 4, 6]},
    ]
    assert "is ignored" not in done.stderr  # every option of the script means something here


def test_local_backend_places_a_steps_gpus_one_per_call(tmp_path):
    """In an srun step with two GPUs (Slurm sets CUDA_VISIBLE_DEVICES), two concurrent
    local calls get one GPU each."""
    script = os.path.join(ROOT, "tests", "seed_scripts", "local_gpus.py")
    done = subprocess.run(
        ["srun", "--exact", "-n1", "-c2", "--gres=gpu:2", sys.executable, script, str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert len(shown["mine"].split(",")) == 2
    assert sorted(shown["workers"]) == sorted(shown["mine"].split(","))
