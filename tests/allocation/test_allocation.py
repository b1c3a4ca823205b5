"""What only a real allocation shows: its size, GPUs, step faults, nested executors."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from executorlib import Executor
from executorlib.errors import WorkerDiedError


def job_cpus() -> int:
    """The allocation's CPUs as slurmctld reports them (not from our own parsing)."""
    shown = subprocess.run(["scontrol", "show", "job", "-o", os.environ["SLURM_JOB_ID"]],
                           capture_output=True, text=True, check=True).stdout
    return int(re.search(r"\bNumCPUs=(\d+)", shown)[1])


def gpus_for(seconds):
    start = time.time()
    time.sleep(seconds)
    return os.environ.get("CUDA_VISIBLE_DEVICES"), start, time.time()


def step_id():
    return f"{os.environ['SLURM_JOB_ID']}.{os.environ['SLURM_STEP_ID']}"


def kill_rank_one():
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(600)


def cancel_own_step():
    subprocess.run(["scancel", step_id()], check=True)
    time.sleep(600)


def sleep_then(seconds, value=None):
    time.sleep(seconds)
    return value


def nested(n):
    """Runs in a one-core step and fans out into the rest of the allocation."""
    with Executor(backend="slurm_allocation") as inner:
        inner_steps = [f.result(timeout=60) for f in [inner.submit(step_id) for _ in range(n)]]
    return step_id(), inner_steps


def test_max_cores_defaults_to_the_allocation_and_more_is_refused():
    cpus = job_cpus()
    with pytest.raises(ValueError, match=f"max_cores={cpus + 1} but the allocation .* holds {cpus} CPUs"):
        Executor(backend="slurm_allocation", max_cores=cpus + 1)
    with Executor(backend="slurm_allocation") as exe:
        with pytest.raises(ValueError, match=f"asks for {cpus + 1} cores .* holds {cpus} CPUs"):
            exe.submit(step_id, resource_dict={"cores": cpus + 1})
        with pytest.raises(ValueError, match="whole GPUs"):
            exe.submit(step_id, resource_dict={"gpus_per_core": 0.5})
        assert exe.submit(sleep_then, 0, "fits", resource_dict={"threads_per_core": cpus}).result(
            timeout=60) == "fits"


def test_concurrent_gpu_calls_get_different_gpus():
    with Executor(backend="slurm_allocation") as exe:
        futures = [exe.submit(gpus_for, 2, resource_dict={"gpus_per_core": 1}) for _ in range(2)]
        no_gpu = exe.submit(gpus_for, 0)
        (first, start1, end1), (second, start2, end2) = (f.result(timeout=60) for f in futures)
        assert no_gpu.result(timeout=60)[0] in (None, "")
    assert max(start1, start2) < min(end1, end2), "the two GPU calls did not run at the same time"
    assert {first, second} == {"0", "1"}


@pytest.mark.timeout(200)
def test_dead_steps_fail_their_futures_with_step_and_state_and_executor_serves_on():
    """A killed rank, a cancelled step and a step over its time limit (run_time_max=1
    s -> srun --time=1: Slurm's limits have a resolution of one minute and are checked
    every 30 s, so this one takes 60-90 s)."""
    with Executor(backend="slurm_allocation", pmi_mode="pmix") as exe:
        timed = exe.submit(sleep_then, 600, resource_dict={"run_time_max": 1})
        killed = exe.submit(kill_rank_one, resource_dict={"cores": 2})
        cancelled = exe.submit(cancel_own_step)
        with pytest.raises(WorkerDiedError, match=r"Slurm step \d+\.\d+: task 1 on \S+: Killed"):
            killed.result(timeout=30)
        with pytest.raises(WorkerDiedError, match=r"Slurm step (\d+\.\d+): step \1 on \S+ CANCELLED;"):
            cancelled.result(timeout=30)
        assert exe.submit(sleep_then, 0, "still serving").result(timeout=30) == "still serving"
        started = time.monotonic()
        with pytest.raises(WorkerDiedError, match=r"step \S+ on \S+ CANCELLED DUE TO TIME LIMIT;"
                                                  r".*\(its own limit: run_time_max=1 s"):
            timed.result(timeout=150)
        assert time.monotonic() - started < 120
        assert exe.submit(sleep_then, 0, "still serving").result(timeout=30) == "still serving"


def test_nested_executor_uses_the_rest_of_the_allocation():
    with Executor(backend="slurm_allocation") as exe:
        outer, inner = exe.submit(nested, 3, resource_dict={"cores": 1}).result(timeout=90)
    job = os.environ["SLURM_JOB_ID"]
    assert all(step.startswith(f"{job}.") for step in [outer, *inner])
    assert len({outer, *inner}) == 4
