"""The ``executorlib`` command, run as a real subprocess against real cache directories
(written by real executors), real ``salloc`` allocations and real ``sbatch`` jobs of the
test Slurm cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from executorlib import Executor, SlurmClusterExecutor
from executorlib.errors import WorkerDiedError
from executorlib.submission import LocalClusterExecutor

REPO = Path(__file__).resolve().parent.parent
# This checkout's code (through PYTHONPATH), never an installed console script's.
COMMAND = [sys.executable, "-m", "executorlib.cli"]


def executorlib(*args: str, stdin: str = "", env: dict | None = None, timeout: float = 120):
    """Run the real command; its CompletedProcess (text)."""
    return subprocess.run([*COMMAND, *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=timeout)


def status(directory) -> dict[str, dict]:
    """``executorlib status --json``, keyed by function name."""
    done = executorlib("status", str(directory), "--json")
    assert done.returncode == 0, done.stderr
    return {row["function"]: row for row in json.loads(done.stdout)}


def add(a, b):
    return a + b


def fail(message):
    raise KeyError(message)


def crash(text):
    print(text, flush=True)
    os._exit(3)


def increment(x):
    return x + 1


def wait_marker_then_sleep(marker, seconds):
    Path(marker).touch()
    time.sleep(seconds)


@pytest.fixture(scope="module")
def slurm():
    """The test cluster: started (idempotent) if ``sinfo`` does not answer."""
    if subprocess.run(["sinfo"], capture_output=True).returncode != 0:
        subprocess.run([str(REPO / "scripts" / "slurm-test-cluster"), "start"], check=True)


# ------------------------------------------------------------------ help, hello
def test_help_lists_every_command_with_examples():
    done = executorlib("--help")
    assert done.returncode == 0
    for text in ("hello", "status", "cancel", "clean", "examples:", "salloc -n 2 executorlib hello"):
        assert text in done.stdout
    hello = executorlib("hello", "--help").stdout
    assert "slurm_submission" in hello and "--pmi-mode" in hello
    assert executorlib("frobnicate").returncode == 2  # argparse: unknown command


def test_hello_local_runs_both_calls_with_progress(in_tmp):
    done = executorlib("hello")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "python call          ok   host" in done.stdout
    assert "ranks 0, 1 of 2 on" in done.stdout
    assert "progress: 2/2 calls done" in done.stderr
    assert not list(in_tmp.iterdir())  # nothing left behind


def test_hello_says_why_a_backend_cannot_run_here(in_tmp):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = executorlib("hello", "--backend", "slurm_allocation", env=env)
    assert done.returncode == 2
    assert "not inside a Slurm allocation" in done.stderr
    assert "salloc -n 2 executorlib hello --backend slurm_allocation" in done.stderr
    # outside a Flux instance (tests/flux_instance runs it inside one): the backend says so
    env = {k: v for k, v in env.items() if k != "FLUX_URI"}
    flux = executorlib("hello", "--backend", "flux_allocation", env=env)
    assert flux.returncode == 1
    assert "cannot start the flux_allocation backend" in flux.stderr
    assert "flux start python script.py" in flux.stderr
    assert executorlib("hello", "--pmi-mode", "pmix").returncode == 2


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_hello_inside_salloc_explains_pmi_mismatch_then_runs(slurm, in_tmp):
    # Debian's OpenMPI has no PMI-2: with --pmi-mode pmi2 the first run must say it is a
    # PMI mismatch. The test cluster's MpiDefault is none; without --pmi-mode the executor
    # picks a PMI that srun offers (pmix) and both calls run as srun steps.
    script = f"{COMMAND[-1] if len(COMMAND) == 1 else ' '.join(COMMAND)} hello --backend slurm_allocation"
    done = subprocess.run(
        ["salloc", "-n", "2", "bash", "-c", f"{script} --pmi-mode pmi2; echo EXIT=$?; {script}"],
        capture_output=True, text=True, timeout=280,
    )
    first, second = done.stdout.split("EXIT=")
    assert "MPI call (cores=2)   FAILED" in first and "MPI/PMI mismatch" in first
    assert second.startswith("1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ranks 0, 1 of 2" in second and "everything ran" in second


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_hello_slurm_submission_reports_job_ids(slurm, in_tmp):
    done = executorlib("hello", "--backend", "slurm_submission", timeout=280)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ranks 0, 1 of 2" in done.stdout
    assert "hello_python: job " in done.stdout and "hello_mpi: job " in done.stdout
    assert not list(in_tmp.iterdir())  # its job files were removed after success


# --------------------------------------------------------- status and clean
def test_status_and_clean_of_an_interactive_cache(in_tmp):
    with Executor(cache_directory="cache") as exe:
        assert [exe.submit(add, i, 1).result() for i in range(2)] == [1, 2]
    rows = status("cache")
    assert rows["add"]["state"] == "done" and rows["add"]["runtime"] >= 0
    table = executorlib("status", "cache").stdout
    assert table.splitlines()[0].split() == ["FUNCTION", "STATE", "JOB", "ID", "RUNTIME", "ERROR"]
    assert "2 calls: 2 done" in table
    refused = executorlib("clean", "cache")  # no answer on stdin: nothing removed
    assert refused.returncode == 1 and "nothing removed" in refused.stdout
    assert len(list(Path("cache").glob("*.h5"))) == 2
    assert executorlib("clean", "cache", stdin="n\n").returncode == 1
    removed = executorlib("clean", "cache", stdin="y\n")
    assert removed.returncode == 0 and "removed 2 files of 2 calls" in removed.stdout
    assert list(Path("cache").iterdir()) == []
    missing = executorlib("status", "no-such-dir")
    assert missing.returncode == 2 and "is not a directory" in missing.stderr


@pytest.mark.timeout(180)
def test_status_of_local_jobs_and_clean_failed_only(in_tmp):
    with LocalClusterExecutor(cache_directory="cache") as exe:
        futures = [exe.submit(add, 1, 2), exe.submit(fail, "no such key"), exe.submit(crash, "goodbye")]
        for future in futures[1:]:
            with pytest.raises((KeyError, WorkerDiedError)):
                future.result(timeout=60)
    rows = status("cache")
    assert rows["add"]["state"] == "done" and rows["add"]["job_id"].startswith("local-")
    assert rows["fail"]["state"] == "failed" and rows["fail"]["error"] == "KeyError: 'no such key'"
    # The job ran (it has output) and no process runs its script any more.
    assert rows["crash"]["state"] == "failed" and "ended in state FAILED" in rows["crash"]["error"]
    assert rows["crash"]["error"].endswith("its output ends: goodbye")
    assert "nothing to cancel" in executorlib("cancel", "cache").stdout
    done = executorlib("clean", "cache", "--failed-only", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert set(status("cache")) == {"add"}
    assert "cache/jobs/" in done.stdout and "fail (failed)" in done.stdout


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_status_cancel_clean_of_slurm_jobs(slurm, in_tmp):
    marker = in_tmp / "running"
    exe = SlurmClusterExecutor(cache_directory="cache", resource_dict={"cwd": str(in_tmp)})
    finished = [exe.submit(add, 1, 2), exe.submit(fail, "bad input"), exe.submit(crash, "last words")]
    for future in finished:
        future.exception(timeout=120)
    sleeper = exe.submit(wait_marker_then_sleep, str(marker), 120)
    waiter = exe.submit(increment, sleeper)
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline:  # the job has started
        time.sleep(0.2)
    rows = status("cache")
    assert rows["add"]["state"] == "done" and rows["add"]["job_id"].isdigit()
    assert rows["fail"]["state"] == "failed" and "KeyError: 'bad input'" in rows["fail"]["error"]
    assert rows["crash"]["state"] == "failed"
    assert "ended in state FAILED" in rows["crash"]["error"] and "last words" in rows["crash"]["error"]
    assert rows["wait_marker_then_sleep"]["state"] == "running"
    assert rows["increment"]["state"] == "queued" and "Dependency" in rows["increment"]["error"]
    assert len(rows) == 5  # one row per call: no two calls share a function here

    cancel = executorlib("cancel", "cache")
    assert cancel.returncode == 0, cancel.stderr
    assert cancel.stdout.count("cancelled job") == 2
    for future in (sleeper, waiter):
        with pytest.raises(WorkerDiedError, match="CANCELLED"):
            future.result(timeout=120)
    exe.shutdown()
    assert {row["state"] for row in status("cache").values()} == {"done", "failed"}
    assert "nothing to cancel" in executorlib("cancel", "cache").stdout

    # A job the queue has forgotten (Slurm purges records after MinJobAge) is "lost".
    (job_file,) = [p for p in Path("cache/jobs").glob("*.job") if "wait_marker" in p.name]
    job_file.write_text("999999")
    assert status("cache")["wait_marker_then_sleep"]["state"] == "lost"
    clean = executorlib("clean", "cache", "--failed-only", stdin="yes\n")
    assert clean.returncode == 0
    assert set(status("cache")) == {"add"}
