"""Slurm allocation mode from outside an allocation.

Pure parts (the srun command builder, reading the allocation, reading srun's last
words) need no Slurm. The rest submits small scripts from tests/slurm_scripts with
``sbatch --wait`` to the test cluster (``scripts/slurm-test-cluster start --nodes 2``):
several nodes, 100 block-allocation calls, an allocation running out of time. The
tests that run inside one allocation are in tests/allocation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from executorlib import Executor
from executorlib.resources import Resources
from executorlib.slurm import (
    Allocation,
    SrunSettings,
    allocation_cpus,
    parse_cpus_per_node,
    srun_command,
    srun_environment,
    step_outcome,
)

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slurm_scripts")
SETTINGS = SrunSettings(job_id="42", pmi_mode="pmix")
BASE = ["srun", "--jobid=42", "--job-name=executorlib", "--exact", "--kill-on-bad-exit=1"]


# ---------------------------------------------------------- the srun command
def test_srun_command_for_the_defaults():
    assert srun_command(Resources(), SETTINGS) == [
        *BASE, "--ntasks=1", "--cpus-per-task=1", "--mem=0", "--gres=none",
    ]


def test_srun_command_maps_every_resource():
    resources = Resources.from_dict({
        "cores": 4, "threads_per_core": 2, "gpus_per_core": 1, "cwd": "/scratch/run",
        "num_nodes": 2, "exclusive": True, "run_time_max": 61, "memory_max": 1.5,
        "openmpi_oversubscribe": True, "slurm_cmd_args": ["--constraint=fast"],
    })
    assert srun_command(resources, SETTINGS) == [
        *BASE, "--ntasks=4", "--cpus-per-task=2", "--mem=1536M", "--gpus-per-task=1",
        "--nodes=2", "--exclusive", "--time=2", "--overcommit", "--chdir=/scratch/run",
        "--mpi=pmix", "--constraint=fast",
    ]


@pytest.mark.parametrize(("cores", "pmi_mode", "expected"), [
    (1, "pmix", []), (2, None, []), (2, "pmi2", ["--mpi=pmi2"]),
])
def test_srun_command_sets_pmi_only_for_mpi_calls(cores, pmi_mode, expected):
    argv = srun_command(Resources(cores=cores), SrunSettings("7", pmi_mode))
    assert [a for a in argv if a.startswith("--mpi")] == expected


def test_srun_command_refuses_fractions_of_gpus():
    with pytest.raises(ValueError, match="gpus_per_core=0.5 but Slurm gives each task whole GPUs"):
        srun_command(Resources(gpus_per_core=0.5), SETTINGS)


def test_srun_environment_drops_job_wide_step_options_but_keeps_the_callers():
    env = {"SLURM_JOB_ID": "42", "SLURM_NTASKS": "8", "SLURM_GPUS": "2", "SLURM_CPU_BIND": "x",
           "PATH": "/bin"}
    assert srun_environment(env, keep={"SLURM_CPU_BIND": "x"}) == {
        "SLURM_JOB_ID": "42", "SLURM_CPU_BIND": "x", "PATH": "/bin",
    }


# --------------------------------------------------------- the allocation
@pytest.mark.parametrize(("text", "cpus"), [("8", 8), ("4(x2)", 8), ("8(x2),4", 20), ("2,3", 5)])
def test_parse_cpus_per_node(text, cpus):
    assert parse_cpus_per_node(text) == cpus


def test_parse_cpus_per_node_names_what_it_cannot_read():
    with pytest.raises(ValueError, match=r"SLURM_JOB_CPUS_PER_NODE='8\(y2\)'"):
        parse_cpus_per_node("8(y2)")


@pytest.mark.parametrize(("environ", "cpus"), [
    ({"SLURM_JOB_CPUS_PER_NODE": "4(x2)", "SLURM_NTASKS": "1"}, 8),  # inside a step
    ({"SLURM_NTASKS": "3", "SLURM_CPUS_PER_TASK": "2"}, 6),
    ({"SLURM_NTASKS": "3"}, 3),
    ({"SLURM_CPUS_ON_NODE": "5"}, 5),
])
def test_allocation_cpus(environ, cpus):
    assert allocation_cpus(environ) == cpus


def test_outside_an_allocation_the_backend_says_so(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(RuntimeError, match=r"not in one \(SLURM_JOB_ID is not set\).*salloc.*sbatch"
                                           r".*backend='slurm_submission'"):
        Executor(backend="slurm_allocation")
    assert Allocation.from_environment({"SLURM_JOB_ID": "9", "SLURM_JOB_CPUS_PER_NODE": "2"}) == \
        Allocation("9", 2)


@pytest.mark.parametrize(("options", "match"), [
    ({"max_cores": 5}, r"max_cores=5 but the allocation \(Slurm job 7\) holds 4 CPUs"),
    ({"max_workers": 5, "block_allocation": True}, r"need 5 CPUs but the allocation .* holds 4"),
    ({"max_workers": 2, "block_allocation": True, "resource_dict": {"cores": 3}}, "need 6 CPUs"),
    ({"resource_dict": {"threads_per_core": 5}}, r"asks for 5 cores .* holds 4 CPUs"),
])
def test_asking_for_more_than_the_allocation_fails_at_once(monkeypatch, options, match):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_JOB_CPUS_PER_NODE", "2(x2)")
    with pytest.raises(ValueError, match=match):
        Executor(backend="slurm_allocation", **options)


# -------------------------------------------------- srun's last words (real)
@pytest.mark.parametrize(("stderr", "step", "account"), [
    ("srun: error: vm: task 1: Killed\n"
     "srun: launch/slurm: _step_signal: Terminating StepId=33.1\n"
     "slurmstepd-vm: error: *** STEP 33.1 ON vm CANCELLED AT 2026-11-21T17:01:17 ***\n"
     "srun: error: vm: task 0: Terminated\nsrun: Force Terminated StepId=33.1\n",
     "33.1", "task 1 on vm: Killed; step 33.1 on vm CANCELLED; task 0 on vm: Terminated"),
    ("slurmstepd-vm: error: *** STEP 30.0 ON vm CANCELLED AT 2026-11-21T16:58:02 DUE TO TIME LIMIT ***\n"
     "srun: error: vm: task 0: Terminated\n",
     "30.0", "step 30.0 on vm CANCELLED DUE TO TIME LIMIT; task 0 on vm: Terminated"),
    ("srun: error: vm: task 0: Exited with exit code 3\n", None, "task 0 on vm: Exited with exit code 3"),
    ("srun: error: Unable to create step for job 5: Invalid generic resource (gres) specification\n",
     None, "Unable to create step for job 5: Invalid generic resource (gres) specification"),
])
def test_step_outcome_reads_srun(stderr, step, account):
    assert step_outcome(stderr) == (step, account)


# ------------------------------------------------------ real sbatch jobs
@pytest.fixture(scope="module")
def cluster():
    """The test cluster with its two extra nodes, or a failure that says how to start it."""
    try:
        shown = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True,
                               timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.fail(f"Slurm is not reachable ({error}); run scripts/slurm-test-cluster start --nodes 2")
    if "multi" not in shown:
        pytest.fail("the test cluster has no partition 'multi': scripts/slurm-test-cluster start --nodes 2")


def sbatch(tmp_path, script: str, *options: str, timeout: int = 120) -> str:
    """Run ``script`` as a batch job and wait for it; its output."""
    output = tmp_path / f"{script}.out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    command = ["sbatch", "--wait", "--quiet", f"--output={output}", "--job-name=executorlib-test",
               *options, f"--wrap={sys.executable} {os.path.join(SCRIPTS, script)}"]
    subprocess.run(command, env=env, cwd=tmp_path, timeout=timeout, check=False)
    return output.read_text() if output.exists() else ""


def last_json(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith("{")]
    assert lines, f"the batch job printed no report; its output:\n{output}"
    return json.loads(lines[-1])


@pytest.mark.timeout(150)
def test_allocation_over_two_nodes(cluster, tmp_path):
    output = sbatch(tmp_path, "multi_node.py", "--partition=multi", "--nodes=2", "--ntasks=8")
    report = last_json(output)
    assert report["executor"] == "n1"
    assert report["pinned"] == {"n1": "n1", "n2": "n2"}
    assert report["spread"] == ["n1", "n2"]
    assert sorted(report["mpi"]) == ["n1", "n2"]
    # hostname_localhost=True: the step on n1 reaches 127.0.0.1, the one on n2 cannot
    assert report["localhost_n1"] == "n1"
    assert "WorkerDiedError" in report["localhost_n2"]
    assert "do not use hostname_localhost=True" in report["localhost_n2"]
    assert report["localhost_seconds"] < 30


@pytest.mark.timeout(150)
def test_block_allocation_batch_job_finishes_and_leaves_nothing(cluster, tmp_path):
    report = last_json(sbatch(tmp_path, "block_100.py", "--ntasks=4"))
    assert report["sum"] == sum(i * i for i in range(100))
    assert len(report["steps_while_running"]) == 2
    assert report["steps_after"] == [] and report["workers_after"] == []


@pytest.mark.timeout(150)
def test_running_out_of_allocation_time_is_reported_as_such(cluster, tmp_path):
    output = sbatch(tmp_path, "out_of_time.py", "--ntasks=2", "--time=5")
    errors = [line for line in output.splitlines() if line.startswith(("ERROR", "no error"))]
    assert errors, f"the batch job printed no outcome; its output:\n{output}"
    assert errors[0].startswith("ERROR WorkerDiedError"), errors[0]
    assert "outlive_allocation" in errors[0]
    assert "reached its time limit" in errors[0] and "the allocation (Slurm job" in errors[0]
