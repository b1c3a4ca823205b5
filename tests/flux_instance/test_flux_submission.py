"""flux_submission / FluxClusterExecutor against a real Flux instance: one ``flux batch``
job per call, ``afterok`` dependencies, MPI jobs, re-attach from a second process in the
same instance and in a new one, and ``executorlib status`` there."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from executorlib import Executor, FluxClusterExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "scripts", "reattach.py")


def add(a, b=0):
    return a + b


def fail(message):
    raise KeyError(message)


def mpi_size():
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_size()


def flux(*argv: str) -> str:
    return subprocess.run(["flux", *argv], capture_output=True, text=True, timeout=60, check=True).stdout


def run_script(cache, go, prefix=()):
    done = subprocess.run([*prefix, sys.executable, SCRIPT, str(cache), str(go)],
                          capture_output=True, text=True, timeout=280)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and lines, f"{done.stdout}\n{done.stderr[-4000:]}"
    return json.loads(lines[-1])


def wait_inactive(job_ids):
    for job_id in job_ids:
        subprocess.run(["flux", "job", "wait-event", "-t", "120", job_id, "clean"],
                       capture_output=True, timeout=150, check=False)


@pytest.mark.timeout(240)
def test_afterok_chain_mpi_job_and_failed_upstream(in_tmp):
    with Executor(backend="flux_submission", cache_directory="cache") as exe:
        assert isinstance(exe, FluxClusterExecutor)
        first = exe.submit(add, 1, 2)
        second = exe.submit(add, first, 3)
        ranks = exe.submit(mpi_size, resource_dict={"cores": 2})
        broken = exe.submit(fail, "upstream")
        dependent = exe.submit(add, broken, 1)
        assert second.result(timeout=200) == 6 and ranks.result(timeout=200) == [2, 2]
        with pytest.raises(KeyError, match="upstream"):
            dependent.result(timeout=200)
    jobs = flux("jobs", "-a", "--no-header", "--format={id.f58}|{name}|{result}").splitlines()
    names = {line.split("|")[1] for line in jobs}
    assert any(name.startswith("add_") for name in names) and any(n.startswith("mpi_size_") for n in names)
    wait_inactive([line.split("|")[0] for line in jobs])


@pytest.mark.timeout(280)
def test_reattach_in_the_same_instance_follows_the_queued_jobs(tmp_path):
    cache, go = tmp_path / "cache", tmp_path / "go"
    first = run_script(cache, go)
    assert first["result"] is None and len(first["jobs"]) == 2
    go.touch()
    second = run_script(cache, go)
    assert second == {"result": 42, "jobs": first["jobs"]}  # no job submitted again
    wait_inactive(first["jobs"].values())


@pytest.mark.timeout(280)
def test_reattach_in_a_new_instance_runs_the_calls_again(tmp_path):
    """Job ids of an ended instance are unknown to a new one: the calls are 'lost' for
    `executorlib status` (exit 0), and a re-run submits them again instead of waiting."""
    cache, go = tmp_path / "cache", tmp_path / "go"
    new_instance = ("flux", "start", "--test-size=1")
    first = run_script(cache, go, new_instance)  # that instance ends with the script
    assert first["result"] is None
    status = subprocess.run([*new_instance, "executorlib", "status", str(cache), "--json"],
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    states = {call["job_id"]: call["state"] for call in json.loads(status.stdout)}
    assert states == dict.fromkeys(first["jobs"].values(), "lost")
    go.touch()
    second = run_script(cache, go, new_instance)
    assert second["result"] == 42 and second["jobs"].keys() == first["jobs"].keys()


@pytest.mark.timeout(280)
def test_an_id_that_names_another_job_is_not_followed(tmp_path):
    """Ids restart in a new instance: a recorded id may name someone else's job there."""
    cache, go = tmp_path / "cache", tmp_path / "go"
    first = run_script(cache, go)
    flux("cancel", *first["jobs"].values())
    wait_inactive(first["jobs"].values())
    others = {key: flux("submit", "--job-name=not-ours", "sleep", "600").strip() for key in first["jobs"]}
    for key, other in others.items():
        (cache / "jobs" / f"{key}.job").write_text(other)
    go.touch()
    try:
        second = run_script(cache, go)
        assert second["result"] == 42 and not set(others.values()) & set(second["jobs"].values())
        assert flux("jobs", "--no-header", "--format={state}", *others.values()).split() == ["RUN", "RUN"]
        wait_inactive(second["jobs"].values())
    finally:
        flux("cancel", *others.values())
        wait_inactive(others.values())
