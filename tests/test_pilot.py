"""Pilot pools on the real test cluster: ``SlurmClusterExecutor(block_allocation=True)``.

Worker jobs are submitted with the real sbatch to partition ``multi`` (the namespace
nodes n1, n2: 4 CPUs each), connect back over ZeroMQ to this host's bridge address, and
are watched with the real squeue. Every test waits on events (a file a call writes, a job
state), never on a sleep, and ends with no pilot job left in squeue.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from executorlib import SlurmClusterExecutor, WorkerDiedError

pytestmark = pytest.mark.slurm
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB_NAME = "executorlib-pilot"


# --------------------------------------------------------------- called in workers
def job_of(value):
    import os
    import socket

    return value, os.environ.get("SLURM_JOB_ID"), socket.gethostname()


def hold(directory, name):
    """Say where this attempt runs (a file ``name-JOBID``), then wait for ``release``."""
    import os
    import time

    job_id = os.environ["SLURM_JOB_ID"]
    open(os.path.join(directory, f"{name}-{job_id}"), "w").close()
    deadline = time.monotonic() + 150
    while not os.path.exists(os.path.join(directory, "release")) and time.monotonic() < deadline:
        time.sleep(0.05)
    return job_id


def failing_init():
    raise ValueError("the model file is missing")


def use_model(x, model):
    return x + model


# ------------------------------------------------------------------------ helpers
def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)
    return value


def started(directory, name):
    """Job ids of the attempts of ``hold(directory, name)`` that have started."""
    prefix = f"{name}-"
    return sorted(entry[len(prefix):] for entry in os.listdir(directory) if entry.startswith(prefix))


def attempts_of(directory, name, count):
    """The job ids of ``count`` started attempts, or None while there are fewer."""
    jobs = started(directory, name)
    return jobs if len(jobs) == count else None


def pilot_jobs(states="PENDING,RUNNING,COMPLETING,CONFIGURING,SUSPENDED"):
    """{job id: [state, reason]} of this test session's pilot jobs in squeue (``states``:
    squeue --states). Other sessions on the shared test cluster submit pilot jobs of the
    same name: only those whose output goes under this session's pytest folder count."""
    out = subprocess.run(
        ["squeue", "--noheader", f"--name={JOB_NAME}", f"--states={states}",
         "--Format=JobID:|,State:|,Reason:|,STDOUT:"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    rows = [line.split("|") for line in out.splitlines() if line.count("|") == 3]
    return {job.strip(): [state.strip(), reason.strip()] for job, state, reason, output in rows
            if output.startswith(SESSION["temp"])}


SESSION = {"temp": ""}  # this session's pytest folder (the slurm fixture sets it)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The test cluster: started (idempotent) if ``sinfo`` does not answer."""
    SESSION["temp"] = str(tmp_path_factory.getbasetemp())
    if subprocess.run(["sinfo"], capture_output=True).returncode != 0:
        subprocess.run([os.path.join(REPO, "scripts", "slurm-test-cluster"), "start"], check=True)


@pytest.fixture(autouse=True)
def no_pilot_job_left(slurm):
    """After each test: no pilot job in squeue (cancelled and reported if one is)."""
    yield
    try:
        wait_until(lambda: not pilot_jobs(), 60, "the test's pilot jobs to leave squeue")
    except AssertionError:
        left = pilot_jobs()
        subprocess.run(["scancel", *left], check=False)
        pytest.fail(f"pilot jobs left in squeue: {left}")


# -------------------------------------------------------------------------- tests
@pytest.mark.timeout(240)
def test_grows_to_max_workers_under_a_burst_and_shrinks_to_min_after_idle(tmp_path):
    with SlurmClusterExecutor(
        block_allocation=True, max_workers=3, min_workers=1, idle_timeout=2,
        resource_dict={"partition": "multi"}, cache_directory=str(tmp_path / "cache"),
    ) as exe:
        burst = [exe.submit(hold, str(tmp_path), f"call{i}") for i in range(5)]
        wait_until(lambda: sum(bool(started(tmp_path, f"call{i}")) for i in range(5)) == 3, 120,
                   "three calls running at once")
        assert len(exe.worker_jobs()) == 3 == exe.max_workers  # grew to max_workers, not beyond
        (tmp_path / "release").touch()
        used = {f.result(timeout=120) for f in burst}
        assert len(used) == 3
        assert len(pilot_jobs()) <= 3

        sizes = []

        def shrunk():
            sizes.append(len(exe.worker_jobs()))
            return len(pilot_jobs()) == 1 and sizes[-1] == 1

        wait_until(shrunk, 120, "the pool to shrink to min_workers=1 after idle_timeout")
        assert min(sizes) == 1  # never below min_workers while shrinking
        value, job_id, node = exe.submit(job_of, 7).result(timeout=60)
        assert (value, job_id) == (7, next(iter(pilot_jobs())))
        assert node in ("n1", "n2")


@pytest.mark.timeout(240)
def test_max_workers_resizes_the_pool_while_it_runs(tmp_path):
    with SlurmClusterExecutor(
        block_allocation=True, max_workers=1, idle_timeout=None, resource_dict={"partition": "multi"},
        cache_directory=str(tmp_path / "cache"),
    ) as exe:
        calls = [exe.submit(hold, str(tmp_path), f"call{i}") for i in range(3)]
        wait_until(lambda: started(tmp_path, "call0"), 120, "the first call")
        assert len(exe.worker_jobs()) == 1
        exe.max_workers = 3  # call1 waits on worker 0 (sent ahead); call2 needs a new job
        wait_until(lambda: started(tmp_path, "call2"), 120, "a call on a second worker job")
        assert len(exe.worker_jobs()) == 2 and exe.max_workers == 3  # only what waiting calls need
        (tmp_path / "release").touch()
        assert len({f.result(timeout=120) for f in calls}) == 2
        exe.max_workers = 1  # idle_timeout=None: only the resize ends the surplus worker
        wait_until(lambda: len(exe.worker_jobs()) == 1 and len(pilot_jobs()) == 1, 120, "shrinking to 1")
        with pytest.raises(ValueError, match="max_workers must be an int >= max"):
            exe.max_workers = 0


def cli(*args):
    argv = [sys.executable, "-c", "from executorlib.cli import main; raise SystemExit(main())", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout


@pytest.mark.timeout(240)
def test_executorlib_status_lists_and_cancel_ends_a_running_pools_jobs(tmp_path):
    cache = str(tmp_path / "cache")
    with SlurmClusterExecutor(
        block_allocation=True, max_workers=1, idle_timeout=None, resource_dict={"partition": "multi"},
        cache_directory=cache,
    ) as exe:
        _, job_id, node = exe.submit(job_of, 1).result(timeout=120)
        listed = wait_until(lambda: (out := cli("status", cache)) and "calls done" in out.lower()
                            and f"{job_id} " in out and out, 60, "status to list the job")
        assert node in listed and "RUNNING" in listed
        assert cli("cancel", cache).strip() == f"cancelled pilot worker jobs {job_id}"
        wait_until(lambda: not exe.worker_jobs(), 60, "the pool to see its job end")
        _, again, _ = exe.submit(job_of, 2).result(timeout=120)  # a waiting call starts a new job
        assert again != job_id


@pytest.mark.timeout(240)
def test_a_job_pending_too_long_is_cancelled_while_the_others_serve(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="executorlib")
    # 4 CPUs per worker job: the two nodes of "multi" hold two; the third waits (Resources)
    with SlurmClusterExecutor(
        block_allocation=True, max_workers=3, pending_timeout=3, idle_timeout=None,
        resource_dict={"partition": "multi", "threads_per_core": 4},
        cache_directory=str(tmp_path / "cache"),
    ) as exe:
        calls = [exe.submit(hold, str(tmp_path), f"call{i}") for i in range(3)]
        wait_until(lambda: "still PENDING" in caplog.text, 120, "the pending timeout")
        assert "partition multi" in caplog.text and "squeue's reason: Resources" in caplog.text
        assert len(exe.worker_jobs()) >= 1
        (tmp_path / "release").touch()
        used = {f.result(timeout=120) for f in calls}
        assert 1 <= len(used) <= 2


@pytest.mark.timeout(240)
def test_a_pending_job_nobody_needs_any_more_is_cancelled_after_idle_timeout(tmp_path):
    # three calls ask for three jobs of 4 CPUs; two fit on n1/n2 and serve all three calls
    with SlurmClusterExecutor(
        block_allocation=True, max_workers=3, idle_timeout=3,
        resource_dict={"partition": "multi", "threads_per_core": 4}, cache_directory=str(tmp_path / "cache"),
    ) as exe:
        futures = [exe.submit(job_of, i) for i in range(3)]
        seen = wait_until(lambda: len(ids := {row["job_id"] for row in exe.worker_jobs()} - {None}) == 3
                          and ids, 60, "three worker jobs submitted")
        used = {job_id for _, job_id, _ in [f.result(timeout=120) for f in futures]}
        wait_until(lambda: not exe.worker_jobs() and not pilot_jobs(), 120, "the pool to scale in to 0")
        final = pilot_jobs("all")
        states = {job: final[job][0] for job in seen if job in final}
        waiting = seen - used
        assert waiting and all(states[job] == "CANCELLED" for job in waiting)  # never idle forever
        assert all(states[job] == "COMPLETED" for job in used)  # idle workers ended their jobs


@pytest.mark.timeout(240)
def test_a_job_that_can_never_start_fails_the_calls_with_partition_and_reason(tmp_path):
    # 9 tasks: more CPUs than the whole partition has (squeue's reason: PartitionConfig)
    with SlurmClusterExecutor(
        block_allocation=True, max_workers=1, pending_timeout=3,
        resource_dict={"partition": "multi", "cores": 9}, cache_directory=str(tmp_path / "cache"),
    ) as exe:
        future = exe.submit(job_of, 1)
        with pytest.raises(WorkerDiedError) as caught:
            future.result(timeout=120)
    message = str(caught.value)
    assert "still PENDING" in message and "partition multi" in message and "PartitionConfig" in message


@pytest.mark.timeout(120)
def test_a_refused_worker_job_fails_the_calls_with_sbatchs_words(tmp_path):
    with SlurmClusterExecutor(
        block_allocation=True, max_workers=2, resource_dict={"partition": "no-such-partition"},
        cache_directory=str(tmp_path / "cache"),
    ) as exe:
        futures = [exe.submit(job_of, i) for i in range(3)]
        refused = r"sbatch refused the worker job .*(?i:invalid partition)"
        for future in futures:
            with pytest.raises(WorkerDiedError, match=refused):
                future.result(timeout=60)


@pytest.mark.timeout(240)
def test_a_cancelled_worker_job_fails_over_its_call_up_to_max_retries(tmp_path):
    with SlurmClusterExecutor(
        block_allocation=True, max_workers=2, max_retries=1, resource_dict={"partition": "multi"},
        cache_directory=str(tmp_path / "cache"),
    ) as exe:
        # once cancelled: runs again elsewhere; its result arrives once, from the second job
        survivor = exe.submit(hold, str(tmp_path), "survivor")
        done = []
        survivor.add_done_callback(done.append)
        first = wait_until(lambda: started(tmp_path, "survivor"), 120, "the first attempt")[0]
        subprocess.run(["scancel", first], check=True)
        attempts = wait_until(lambda: attempts_of(tmp_path, "survivor", 2), 120, "the second attempt")
        second = next(job for job in attempts if job != first)
        (tmp_path / "release").touch()
        assert survivor.result(timeout=120) == second
        assert done == [survivor]

        # cancelled twice with max_retries=1: WorkerDiedError naming job, node and state
        os.remove(tmp_path / "release")
        victim = exe.submit(hold, str(tmp_path), "victim")
        seen: list[str] = []
        for attempt in (1, 2):
            jobs = wait_until(lambda n=attempt: attempts_of(tmp_path, "victim", n), 120, f"attempt {attempt}")
            last = next(job for job in jobs if job not in seen)
            seen = jobs
            subprocess.run(["scancel", last], check=True)
        with pytest.raises(WorkerDiedError) as caught:
            victim.result(timeout=120)
    message = str(caught.value)
    assert f"Slurm job {last} on n" in message and "CANCELLED" in message and "hold" in message


@pytest.mark.timeout(180)
def test_init_function_failure_fails_the_calls_with_its_error(tmp_path):
    with SlurmClusterExecutor(
        block_allocation=True, max_workers=1, init_function=failing_init,
        resource_dict={"partition": "multi"}, cache_directory=str(tmp_path / "cache"),
    ) as exe:
        future = exe.submit(use_model, 1)
        with pytest.raises(WorkerDiedError, match="the model file is missing") as caught:
            future.result(timeout=120)
        assert isinstance(caught.value.__cause__, ValueError)


def ok_init():
    return {"model": 40}


@pytest.mark.timeout(180)
def test_init_function_runs_once_per_worker_and_fills_keyword_arguments(tmp_path):
    with SlurmClusterExecutor(
        block_allocation=True, max_workers=1, init_function=ok_init,
        resource_dict={"partition": "multi"}, cache_directory=str(tmp_path / "cache"),
    ) as exe:
        assert [f.result(timeout=120) for f in [exe.submit(use_model, i) for i in range(3)]] == [40, 41, 42]


@pytest.mark.timeout(240)
def test_a_call_with_run_time_max_only_goes_to_a_worker_with_that_much_time_left(tmp_path):
    with SlurmClusterExecutor(
        block_allocation=True, max_workers=2, min_workers=1, worker_time_limit=300,
        resource_dict={"partition": "multi"}, cache_directory=str(tmp_path / "cache"),
    ) as exe:
        with pytest.raises(ValueError, match="exceeds worker_time_limit=300"):
            exe.submit(job_of, 0, resource_dict={"run_time_max": 290})
        _, short, _ = exe.submit(job_of, 1).result(timeout=120)
        # shorten the worker's job to 1 minute: less than 40 s + the 30 s margin remains
        subprocess.run(["scontrol", "update", f"JobId={short}", "TimeLimit=1"], check=True)
        wait_until(lambda: any(row["job_id"] == short and row["time_left"] is not None
                               and row["time_left"] < 70 for row in exe.worker_jobs()),
                   60, "the pool to learn the new end time")
        _, fresh, _ = exe.submit(job_of, 2, resource_dict={"run_time_max": 40}).result(timeout=120)
        assert fresh != short
        # within the 30 s margin of its end the short worker takes no call and ends its job itself
        wait_until(lambda: short not in pilot_jobs(), 90, "the short job to end")
        assert pilot_jobs("all")[short][0] == "COMPLETED"  # ended by the pool, not by TIMEOUT


def calc_mpi(i):
    from mpi4py import MPI

    return i, MPI.COMM_WORLD.Get_size(), MPI.COMM_WORLD.Get_rank(), MPI.Get_processor_name()


@pytest.mark.timeout(180)
def test_an_mpi_worker_job_runs_each_call_on_all_its_ranks(tmp_path):
    pytest.importorskip("mpi4py")
    with SlurmClusterExecutor(
        block_allocation=True, max_workers=1, resource_dict={"partition": "multi", "cores": 2},
        cache_directory=str(tmp_path / "cache"),
    ) as exe:
        ranks = exe.submit(calc_mpi, 3).result(timeout=120)
    assert [rank[:3] for rank in ranks] == [(3, 2, 0), (3, 2, 1)] and ranks[0][3] in ("n1", "n2")


@pytest.mark.timeout(180)
def test_the_worker_jobs_key_is_in_its_environment_only(tmp_path):
    """The key material reaches the worker through the environment sbatch exports: not in
    the job's script, its Slurm record, the worker's argv, or a file others can read."""
    cache = tmp_path / "cache"
    with SlurmClusterExecutor(
        block_allocation=True, max_workers=1, resource_dict={"partition": "multi"},
        cache_directory=str(cache),
    ) as exe:
        _, job_id, _ = exe.submit(job_of, 1).result(timeout=120)
        worker = worker_of_job(job_id)
        keys = [value for name, value in worker.environ().items()
                if name.startswith("EXECUTORLIB_") and name != "EXECUTORLIB_TEST_SESSION"
                and len(value) >= 32]
        script = subprocess.run(["scontrol", "write", "batch_script", job_id, "-"], capture_output=True,
                                text=True, check=True).stdout
        record = subprocess.run(["scontrol", "show", "job", "-d", job_id], capture_output=True,
                                text=True, check=True).stdout
        pool_directories = list((cache / "pilot").iterdir())
        assert keys and "executorlib.backend.interactive_serial" in script
        for key in keys:
            assert key not in script and key not in record and key not in " ".join(worker.cmdline())
        assert [oct(d.stat().st_mode & 0o777) for d in pool_directories] == ["0o700"]


def worker_of_job(job_id):
    """The worker process (on this machine: the nodes are namespaces) of Slurm job ``job_id``."""
    for process in psutil.process_iter(["cmdline"]):
        try:
            if ("executorlib.backend.interactive_serial" in " ".join(process.info["cmdline"] or [])
                    and process.environ().get("SLURM_JOB_ID") == job_id):
                return process
        except psutil.Error:
            continue
    raise AssertionError(f"no worker process of Slurm job {job_id}")


def test_sbatch_argv_of_a_worker_job():
    from executorlib.pilot.job import PilotSettings, sbatch_argv
    from executorlib.resources import Resources

    resources = Resources.from_dict({"partition": "multi", "cores": 2, "threads_per_core": 2})
    argv = sbatch_argv(resources, PilotSettings("/out", time_limit_s=90), 7)
    assert argv[:2] == ["sbatch", "--parsable"]
    assert {"--partition=multi", "--ntasks=2", "--cpus-per-task=2", "--time=2",
            "--output=/out/worker-7-%j.out", "--job-name=executorlib-pilot"} <= set(argv)


KILLED_SCRIPT = """
import json, sys, time
from executorlib import SlurmClusterExecutor

directory, mode = sys.argv[1], sys.argv[2]
# "pending": a job that can never start (9 tasks > the partition's 8 CPUs); "running": two workers
resources = {"partition": "multi", "cores": 9 if mode == "pending" else 1}
exe = SlurmClusterExecutor(block_allocation=True, max_workers=2, min_workers=1 if mode == "pending" else 2,
                           idle_timeout=None, resource_dict=resources, cache_directory=directory + "/cache")
if mode == "pending":
    while not [row for row in exe.worker_jobs() if row["reason"] == "PartitionConfig"]:
        time.sleep(0.1)
else:
    exe.submit(sum, [1, 2]).result(timeout=120)
    while sum(row["ready"] for row in exe.worker_jobs()) < 2:
        time.sleep(0.1)
with open(directory + "/jobs.json", "w") as file:
    json.dump(exe.worker_jobs(), file)
time.sleep(600)  # killed here
"""


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kill_guardian", [False, True], ids=["pending-job", "running-jobs-and-guardian"])
def test_killed_executor_leaves_no_pilot_job_behind(tmp_path, kill_guardian):
    """SIGKILL of the executor: its guardian cancels a job that is still pending; with the
    guardian killed too, running workers end their jobs themselves (connection lost)."""
    import json

    script = tmp_path / "pool.py"
    script.write_text(textwrap.dedent(KILLED_SCRIPT))
    mode = "running" if kill_guardian else "pending"
    process = subprocess.Popen([sys.executable, str(script), str(tmp_path), mode])
    try:
        wait_until(lambda: (tmp_path / "jobs.json").exists(), 150, "the pool to start")
        jobs = {row["job_id"] for row in json.loads((tmp_path / "jobs.json").read_text())}
        assert jobs and jobs <= set(pilot_jobs())
        victims = [process.pid]
        if kill_guardian:
            children = psutil.Process(process.pid).children()
            victims += [c.pid for c in children if "pilot_guardian" in " ".join(c.cmdline())]
            assert len(victims) == 2
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        process.wait(timeout=30)
        killed_at = time.monotonic()
        wait_until(lambda: not (jobs & set(pilot_jobs())), 60, f"pilot jobs {jobs} to leave squeue")
        assert time.monotonic() - killed_at < 60
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
