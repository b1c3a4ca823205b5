"""What only a real Flux instance shows: PMI modes, placement on brokers, GPUs, nesting,
a user's FluxExecutor, log files, job faults, the cache, and where the secret travels."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest

from executorlib import Executor, FluxJobExecutor
from executorlib.errors import WorkerDiedError
from executorlib.interactive import private_env
from executorlib.interactive.auth import KEYS_ENV


def flux(*argv: str) -> str:
    return subprocess.run(["flux", *argv], capture_output=True, text=True, timeout=60, check=True).stdout


def instance_cores() -> int:
    """The instance's cores as Flux reports them (not from our own code)."""
    return int(flux("resource", "list", "--no-header", "--states=up", "--format={ncores}").split()[0])


def add(a, b=0):
    return a + b


def mpi_ranks(i):
    from mpi4py import MPI

    return i, MPI.COMM_WORLD.Get_size(), MPI.COMM_WORLD.Get_rank()


def my_job():
    """(broker rank, cores, gpus) of this task's job from its R, and the task's view."""
    r_lite = json.loads(flux("job", "info", os.environ["FLUX_JOB_ID"], "R"))["execution"]["R_lite"]
    return {
        "job": os.environ["FLUX_JOB_ID"], "broker": flux("getattr", "rank").strip(),
        "R": r_lite, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "omp": os.environ.get("OMP_NUM_THREADS"),
    }


def ids(text: str) -> list[int]:
    """'0-2,5' -> [0, 1, 2, 5]"""
    found = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        found += range(int(low), int(high or low) + 1)
    return found


def job_when_both_run(marker_dir, name):
    """Write a marker, wait for the other call's marker (both run at once), report R."""
    open(os.path.join(marker_dir, name), "w").close()
    deadline = time.monotonic() + 60
    while len(os.listdir(marker_dir)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    return my_job()


def jobspec_environment():
    shown = flux("job", "info", "--original", os.environ["FLUX_JOB_ID"], "jobspec")
    return json.loads(shown)["attributes"]["system"]["environment"]


def inner_instance(n):
    """Runs in a nested instance (flux_executor_nesting=True): fan out inside it."""
    listing = flux("resource", "list", "--no-header", "--states=up", "--format={ncores}")
    with FluxJobExecutor() as inner:
        values = [f.result(timeout=60) for f in [inner.submit(add, i, 1) for i in range(n)]]
    return os.environ["FLUX_URI"], flux("getattr", "instance-level").strip(), int(listing.split()[0]), values


def same_instance_fan_out(n):
    """Runs in a 1-core job and opens an executor in the same instance."""
    with FluxJobExecutor() as inner:
        jobs = [f.result(timeout=60) for f in [inner.submit(my_job) for _ in range(n)]]
    return my_job()["job"], [job["job"] for job in jobs]


def cancel_own_job():
    flux("cancel", os.environ["FLUX_JOB_ID"])
    time.sleep(600)


def kill_rank_one():
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(600)


def sleep_then(seconds, value=None):
    time.sleep(seconds)
    return value


def talk_and_die(text):
    import sys

    print("to stdout")
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
    os._exit(5)


# ------------------------------------------------------------------ resources
def test_max_cores_defaults_to_the_instance_and_more_is_refused():
    cores = instance_cores()
    with Executor(backend="flux_allocation") as exe:
        with pytest.raises(ValueError, match=f"asks for {cores + 1} cores .* max_cores is {cores}"):
            exe.submit(add, 1, resource_dict={"cores": cores + 1})
        with pytest.raises(ValueError, match="whole GPUs per task"):
            exe.submit(add, 1, resource_dict={"gpus_per_core": 0.5})
        assert exe.submit(add, 1, 2).result(timeout=60) == 3


def test_a_container_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"resource_dict\['container'\] is not supported with Flux"):
        FluxJobExecutor(resource_dict={"container": {"image": "/images/app.sif"}})


@pytest.mark.parametrize("pmi_mode", [None, "simple", "pmi2", "pmix"])
def test_mpi_call_under_each_pmi_mode_flux_serves(pmi_mode):
    with Executor(backend="flux_allocation", pmi_mode=pmi_mode) as exe:
        assert exe.submit(mpi_ranks, 3, resource_dict={"cores": 2}).result(timeout=90) == [
            (3, 2, 0), (3, 2, 1)
        ]


def test_a_pmi_mode_the_instance_cannot_serve_is_named_in_one_line():
    with pytest.raises(RuntimeError) as info:
        Executor(backend="flux_allocation", pmi_mode="pmi3")
    assert str(info.value).startswith("pmi_mode='pmi3': this Flux instance serves no PMI")
    assert "\n" not in str(info.value) and "flux-pmix" in str(info.value)
    probes = flux("jobs", "-a", "--no-header", "--name=executorlib-pmi-probe", "--format={id}").split()
    assert len(probes) >= 1


def test_mpi_ranks_on_both_brokers():
    with Executor(backend="flux_allocation", pmi_mode="pmix") as exe:
        ranks = exe.submit(my_job, resource_dict={"cores": 2, "num_nodes": 2}).result(timeout=90)
    assert sorted(rank["broker"] for rank in ranks) == ["0", "1"]


def test_threads_per_core_become_cores_of_the_task():
    with Executor(backend="flux_allocation") as exe:
        job = exe.submit(my_job, resource_dict={"threads_per_core": 2}).result(timeout=60)
    [entry] = job["R"]
    assert len(ids(entry["children"]["core"])) == 2 and job["omp"] == "2"


def test_concurrent_gpu_calls_get_different_gpus(tmp_path):
    with Executor(backend="flux_allocation") as exe:
        futures = [exe.submit(job_when_both_run, str(tmp_path), f"m{i}", resource_dict={"gpus_per_core": 1})
                   for i in range(2)]
        no_gpu = exe.submit(my_job).result(timeout=60)
        jobs = [future.result(timeout=90) for future in futures]
    held = set()
    for job in jobs:
        [entry] = job["R"]
        assert len(ids(entry["children"]["gpu"])) == 1
        held.add((entry["rank"], entry["children"]["gpu"]))
        assert job["cuda"] == entry["children"]["gpu"]
    assert len(held) == 2, f"both GPU calls ran at once on the same GPU: {jobs}"
    assert no_gpu["cuda"] == "-1" and "gpu" not in no_gpu["R"][0]["children"]


# ---------------------------------------------------------- executor options
def test_a_users_flux_executor_is_used_and_left_open():
    import flux.job

    with flux.job.FluxExecutor() as mine:
        with FluxJobExecutor(flux_executor=mine) as exe:
            job = exe.submit(my_job).result(timeout=60)
        assert job["job"]  # ran as a Flux job
        again = mine.submit(flux.job.JobspecV1.from_command(["true"]))
        assert again.result(timeout=60) == 0  # shutting ours down left the user's open


def test_nesting_gives_each_worker_its_own_instance():
    with FluxJobExecutor(flux_executor_nesting=True) as exe:
        uri, level, cores, values = exe.submit(
            inner_instance, 3, resource_dict={"cores": 2}).result(timeout=120)
    assert uri != os.environ["FLUX_URI"] and level == "1"
    assert cores == 2 and values == [1, 2, 3]


def test_nested_executor_in_the_same_instance():
    with Executor(backend="flux_allocation") as exe:
        outer, inner = exe.submit(same_instance_fan_out, 3).result(timeout=120)
    known = set(flux("jobs", "-a", "--no-header", "--format={id.f58}").split())
    assert {outer, *inner} <= known and len({outer, *inner}) == 4


def test_log_files_hold_stdout_and_stderr(in_tmp):
    died = r"exit code 5; last lines of (\S+\.err):\n    last words"
    with Executor(backend="flux_allocation", flux_log_files=True, max_workers=1) as exe, pytest.raises(
        WorkerDiedError, match=died
    ):
        exe.submit(talk_and_die, "last words").result(timeout=60)
    [err] = in_tmp.glob(f"executorlib-{os.getpid()}-worker*.err")
    assert "last words" in err.read_text()
    assert "to stdout" in err.with_suffix(".out").read_text()


# ------------------------------------------------------------------- faults
@pytest.mark.timeout(200)
def test_dead_jobs_fail_their_futures_with_job_and_cause_and_executor_serves_on():
    with Executor(backend="flux_allocation") as exe:
        timed = exe.submit(sleep_then, 600, resource_dict={"run_time_max": 2})
        killed = exe.submit(kill_rank_one, resource_dict={"cores": 2})
        cancelled = exe.submit(cancel_own_job)
        died = exe.submit(talk_and_die, "no log files needed")
        with pytest.raises(WorkerDiedError, match=r"Flux job ƒ\w+: .*signal SIGKILL|Flux job ƒ\w+: .*Killed"):
            killed.result(timeout=60)
        with pytest.raises(WorkerDiedError, match=r"Flux job ƒ\w+: JobException: .*type=cancel"):
            cancelled.result(timeout=60)
        with pytest.raises(WorkerDiedError, match=r"exit code 5; last lines of its stderr .*\n.*no log file"):
            died.result(timeout=60)
        with pytest.raises(WorkerDiedError, match=r"Flux job ƒ\w+: JobException: .*type=timeout"):
            timed.result(timeout=60)
        assert exe.submit(add, 1, 1).result(timeout=60) == 2


def test_cache_hit_runs_no_job(in_tmp):
    with Executor(backend="flux_allocation", cache_directory="cache") as exe:
        assert [f.result(timeout=60) for f in [exe.submit(add, i, i) for i in range(3)]] == [0, 2, 4]
    before = len(flux("jobs", "-a", "--no-header", "--format={id}").split())
    with Executor(backend="flux_allocation", cache_directory="cache") as exe:
        assert [f.result(timeout=60) for f in [exe.submit(add, i, i) for i in range(3)]] == [0, 2, 4]
    assert len(flux("jobs", "-a", "--no-header", "--format={id}").split()) == before


# ------------------------------------------------------------------- secret
def test_the_secret_is_not_in_the_jobspec_the_instance_owner_reads(tmp_path, monkeypatch):
    monkeypatch.setenv(private_env.DIR_ENV, str(tmp_path / "private"))
    with Executor(backend="flux_allocation") as exe:
        environment = exe.submit(jobspec_environment).result(timeout=60)
        [directory] = (tmp_path / "private").iterdir()
        assert oct(directory.stat().st_mode & 0o777) == "0o700"
        assert list(directory.iterdir()) == []  # the worker read its file and removed it
    assert KEYS_ENV not in environment
    path = environment[private_env.PATH_ENV]
    assert os.path.dirname(path) == str(directory) and not os.path.exists(path)
    secretish = [name for name, value in environment.items() if re.fullmatch(r"\S{80}", value)]
    assert secretish == []
    assert not directory.exists()  # removed at shutdown


# ----------------------------------------------------------- same-node socket
def test_jobs_on_this_node_talk_over_the_private_socket_without_zeromq():
    """A Flux job on the executor's node connects to the executor's Unix socket
    (executorlib/interactive/host_socket.py; who may connect: tests/allocation/
    test_host_socket.py), not to the CurveZMQ ROUTER: a serial worker and MPI rank 0.
    (The probes live in a module that imports no ZeroMQ, unlike this one.)"""
    from channel_probe import channel_facts, ranks_facts

    here = {"zmq": False, "node": os.uname().nodename, "keys": False}
    with Executor(backend="flux_allocation", block_allocation=True, max_workers=1) as exe:
        assert [exe.submit(channel_facts).result(timeout=90) for _ in range(3)] == [here] * 3
    with Executor(backend="flux_allocation", pmi_mode="pmix") as exe:
        size, facts = exe.submit(ranks_facts, resource_dict={"cores": 2}).result(timeout=90)[0]
    assert (size, facts) == (2, here)
