"""Pilot pools with several workers per job (``workers_per_job``), a lost worker's late
result, the "make room" rule and ``restart_limit``, on the real test cluster.

Same rules as tests/test_pilot.py (its helpers and fixtures are used here): worker jobs
go to partition ``multi`` (n1, n2: 4 CPUs each), every wait is on an event (a file a call
writes, a job state, a log record), and no pilot job is left in squeue after a test.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess

import psutil
import pytest
from test_pilot import (  # noqa: F401 - slurm, no_pilot_job_left: fixtures used here
    attempts_of,
    cli,
    hold,
    job_of,
    no_pilot_job_left,
    pilot_jobs,
    slurm,
    started,
    wait_until,
)

from executorlib import SlurmClusterExecutor, WorkerDiedError

pytestmark = pytest.mark.slurm
MULTI = {"partition": "multi"}


def pool(tmp_path, **options):
    options.setdefault("resource_dict", MULTI)
    return SlurmClusterExecutor(block_allocation=True, cache_directory=str(tmp_path / "cache"), **options)


def workers_of_job(job_id):
    """The worker processes of Slurm job ``job_id`` (on this machine: the nodes are namespaces)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if ("executorlib.backend.interactive_serial" in " ".join(process.info["cmdline"] or [])
                    and process.environ().get("SLURM_JOB_ID") == job_id):
                found.append(process)
        except psutil.Error:
            continue
    return found


# ------------------------------------------------------- several workers per job
@pytest.mark.timeout(240)
def test_several_workers_of_one_job_run_calls_at_once_each_with_its_own_key(tmp_path):
    with pool(tmp_path, max_workers=2, workers_per_job=2, idle_timeout=2) as exe:
        calls = [exe.submit(hold, str(tmp_path), f"call{i}") for i in range(2)]
        wait_until(lambda: started(tmp_path, "call0") and started(tmp_path, "call1"), 120, "both calls")
        (job_id,) = set(started(tmp_path, "call0") + started(tmp_path, "call1"))  # at once, one job
        assert set(pilot_jobs()) == {job_id}
        assert [row["job_id"] for row in exe.worker_jobs()] == [job_id, job_id]
        listed = wait_until(lambda: (out := cli("status", str(tmp_path / "cache"))) and "worker 1:" in out
                            and out, 60, "status to list the job's workers")
        assert listed.count(f"{job_id} ") == 1 and "worker 0: busy" in listed

        workers = workers_of_job(job_id)
        keys = [{k: v for k, v in w.environ().items() if k.startswith("EXECUTORLIB_KEYS")} for w in workers]
        assert len(workers) == 2 and all(list(k) == ["EXECUTORLIB_KEYS"] for k in keys)
        secrets = [k["EXECUTORLIB_KEYS"] for k in keys]
        assert secrets[0] != secrets[1]  # one key per worker, admitted once each
        script = subprocess.run(["scontrol", "write", "batch_script", job_id, "-"], capture_output=True,
                                text=True, check=True).stdout
        argv = " ".join(" ".join(w.cmdline()) for w in workers)
        assert all(s not in script and s not in argv for s in secrets)

        with pytest.raises(ValueError, match="not a multiple of workers_per_job=2"):
            exe.max_workers = 3
        (tmp_path / "release").touch()
        assert [f.result(timeout=120) for f in calls] == [job_id, job_id]
        # idle: the whole job ends (its workers stop), nothing left in squeue
        wait_until(lambda: not exe.worker_jobs() and not pilot_jobs(), 120, "the pool to shrink to 0")
        assert pilot_jobs("all")[job_id][0] == "COMPLETED"


@pytest.mark.timeout(240)
def test_resizing_a_pool_of_two_worker_jobs_adds_and_ends_whole_jobs(tmp_path):
    with pool(tmp_path, max_workers=2, workers_per_job=2, idle_timeout=None) as exe:
        calls = [exe.submit(hold, str(tmp_path), f"call{i}") for i in range(6)]
        wait_until(lambda: started(tmp_path, "call0") and started(tmp_path, "call1"), 120, "two calls")
        exe.max_workers = 4  # calls 2, 3 wait on the first job's workers (sent ahead); 4, 5 need a job
        wait_until(lambda: started(tmp_path, "call4") and started(tmp_path, "call5"), 120, "a second job")
        jobs = {started(tmp_path, f"call{i}")[0] for i in (0, 1, 4, 5)}
        assert len(jobs) == 2 and set(pilot_jobs()) == jobs
        exe.max_workers = 2  # every worker busy: one job drains, and ends when its calls are done
        (tmp_path / "release").touch()
        assert {f.result(timeout=120) for f in calls} == jobs
        wait_until(lambda: len(pilot_jobs()) == 1 and len(exe.worker_jobs()) == 2, 120, "one job left")
        (left,) = pilot_jobs()
        assert [f.result(timeout=120)[1] for f in [exe.submit(job_of, i) for i in range(4)]] == [left] * 4


def test_max_and_min_workers_must_be_multiples_of_workers_per_job(tmp_path):
    with pytest.raises(ValueError, match="max_workers=3 is not a multiple of workers_per_job=2.*use 2 or 4"):
        pool(tmp_path, max_workers=3, workers_per_job=2)
    with pytest.raises(ValueError, match="min_workers=1 is not a multiple"):
        pool(tmp_path, max_workers=4, min_workers=1, workers_per_job=2)
    with pytest.raises(ValueError, match="workers_per_job must be an int >= 1"):
        pool(tmp_path, workers_per_job=0)


@pytest.mark.timeout(240)
def test_a_cancelled_job_fails_over_the_calls_of_all_its_workers(tmp_path):
    with pool(tmp_path, max_workers=4, workers_per_job=2, max_retries=1) as exe:
        calls = [exe.submit(hold, str(tmp_path), f"call{i}") for i in range(2)]
        done = []
        for future in calls:
            future.add_done_callback(done.append)
        firsts = wait_until(lambda: (a := started(tmp_path, "call0") + started(tmp_path, "call1"))
                            and len(a) == 2 and a, 120, "both calls")
        (first,) = set(firsts)
        subprocess.run(["scancel", first], check=True)
        for name in ("call0", "call1"):
            wait_until(lambda n=name: attempts_of(tmp_path, n, 2), 120, f"the second attempt of {name}")
        seconds = {job for name in ("call0", "call1") for job in started(tmp_path, name)} - {first}
        assert len(seconds) == 1  # both re-ran, together, in one fresh job
        (tmp_path / "release").touch()
        assert [f.result(timeout=120) for f in calls] == [*seconds] * 2
        assert sorted(map(id, done)) == sorted(map(id, calls))  # each result delivered once


def crash():
    os._exit(3)


@pytest.mark.timeout(240)
def test_a_worker_that_crashes_ends_its_job_and_the_calls_of_its_siblings_fail_over(tmp_path):
    with pool(tmp_path, max_workers=2, workers_per_job=2) as exe:
        sibling = exe.submit(hold, str(tmp_path), "sibling")
        (job_id,) = wait_until(lambda: started(tmp_path, "sibling"), 120, "the sibling call")
        crashed = exe.submit(crash)
        with pytest.raises(WorkerDiedError, match=f"Slurm job {job_id} .*ended FAILED"):
            crashed.result(timeout=120)
        with pytest.raises(WorkerDiedError, match=f"Slurm job {job_id} "):  # max_retries=0
            sibling.result(timeout=120)


def mpi_job_of(i):
    import os

    from mpi4py import MPI

    return i, MPI.COMM_WORLD.Get_size(), os.environ["SLURM_JOB_ID"], os.environ["SLURM_STEP_ID"]


@pytest.mark.timeout(180)
def test_mpi_workers_of_one_job_are_steps_of_their_own_ranks(tmp_path):
    pytest.importorskip("mpi4py")
    with pool(tmp_path, max_workers=2, workers_per_job=2, resource_dict={**MULTI, "cores": 2}) as exe:
        ranks = [f.result(timeout=120) for f in [exe.submit(mpi_job_of, i) for i in range(4)]]
    assert all(len(call) == 2 and {r[1] for r in call} == {2} for call in ranks)  # 2 ranks each
    assert len({r[2] for call in ranks for r in call}) == 1  # one job
    assert len({r[3] for call in ranks for r in call}) == 2  # two steps: the two workers


def test_job_script_of_several_workers_keeps_keys_out_of_script_and_argv():
    from executorlib.interactive.auth import LaunchKeys
    from executorlib.interactive.spawner import Launch
    from executorlib.pilot.job import PilotSettings, job_environment, job_script, sbatch_argv
    from executorlib.resources import Resources

    resources = Resources.from_dict({"partition": "multi", "memory_max": 1})
    keys = [LaunchKeys(b"P" * 40, bytes([65 + i]) * 40) for i in range(3)]
    launches = [Launch("tcp://h:1", i + 5, resources, keys[i]) for i in range(3)]
    settings = PilotSettings("/out", workers_per_job=3)
    script, env = job_script(launches, settings), job_environment(launches)
    assert "EXECUTORLIB_KEYS" not in env and all(b"P" * 40 + k.secret == env[f"EXECUTORLIB_KEYS_{i}"].encode()
                                                 for i, k in enumerate(keys))
    assert all(k.secret.decode() not in script for k in keys) and script.count("&\n") == 3
    assert "unset EXECUTORLIB_KEYS_0 EXECUTORLIB_KEYS_1 EXECUTORLIB_KEYS_2" in script
    assert {"--ntasks=3", "--nodes=1", "--mem=3072M"} <= set(sbatch_argv(resources, settings, 5))



def test_several_apptainer_workers_of_one_job_each_get_their_own_key_inside():
    """Apptainer sets APPTAINERENV_NAME inside over NAME: each worker's copy must be its
    own key, and the job's environment must carry no worker's key under either name."""
    from executorlib.interactive.auth import LaunchKeys
    from executorlib.interactive.spawner import Launch
    from executorlib.pilot.job import PilotSettings, job_environment, job_script
    from executorlib.resources import Resources

    resources = Resources.from_dict({"container": {"runtime": "apptainer", "image": "/img.sif"}})
    keys = [LaunchKeys(b"P" * 40, bytes([65 + i]) * 40) for i in range(2)]
    launches = [Launch("tcp://h:1", i, resources, keys[i]) for i in range(2)]
    script = job_script(launches, PilotSettings("/out", workers_per_job=2))
    env = job_environment(launches)
    assert not {"EXECUTORLIB_KEYS", "APPTAINERENV_EXECUTORLIB_KEYS"} & set(env)
    for i in range(2):
        key = f'"${{keys[{i}]}}"'
        assert f"EXECUTORLIB_KEYS={key} APPTAINERENV_EXECUTORLIB_KEYS={key} apptainer" in script


# -------------------------------------------------- restart_limit on a pilot pool
@pytest.mark.timeout(240)
def test_restart_limit_gives_up_after_that_many_lost_jobs(tmp_path):
    with pool(tmp_path, max_workers=1, max_retries=1, restart_limit=0) as exe:
        call = exe.submit(hold, str(tmp_path), "call")
        (first,) = wait_until(lambda: started(tmp_path, "call"), 120, "the call")
        subprocess.run(["scancel", first], check=True)
        with pytest.raises(WorkerDiedError, match=f"restart_limit=0 reached.*Slurm job {first}"):
            call.result(timeout=120)


# ------------------------------------------------ a late result of a lost worker
def outlive_its_job(directory):
    """Hold until ``release-JOBID``, surviving the end of the job: no parent-death signal,
    SIGTERM ignored (a worker the pool counts as lost while it still runs, as on a node
    cut off from the controller); says where it runs in ``attempt-JOBID-PID``."""
    import ctypes
    import os
    import signal
    import time

    job_id = os.environ["SLURM_JOB_ID"]
    ctypes.CDLL(None).prctl(1, 0, 0, 0, 0)  # PR_SET_PDEATHSIG: none
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open(os.path.join(directory, f"attempt-{job_id}-{os.getpid()}"), "w").close()
    deadline = time.monotonic() + 150
    while not os.path.exists(os.path.join(directory, f"release-{job_id}")) and time.monotonic() < deadline:
        time.sleep(0.05)
    return job_id


@pytest.mark.timeout(240)
def test_a_late_result_of_a_lost_worker_is_dropped(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="executorlib")
    attempts = lambda: sorted(e.split("-")[1:] for e in os.listdir(tmp_path) if e.startswith("attempt-"))  # noqa: E731
    pids = []
    # two workers per job: the job script is their parent, so the first worker can outlive it
    with pool(tmp_path, max_workers=2, workers_per_job=2, max_retries=1) as exe:
        try:
            future = exe.submit(outlive_its_job, str(tmp_path))
            results = []
            future.add_done_callback(lambda f: results.append(f.result()))
            [(first, pid)] = wait_until(attempts, 120, "the first attempt")
            pids.append(int(pid))
            subprocess.run(["scancel", first], check=True)
            second = wait_until(lambda: len(a := attempts()) == 2 and a, 120, "the retry in a new job")
            pids.append(int(next(p for j, p in second if j != first)))
            retry_job = next(j for j, _ in second if j != first)
            wait_until(lambda: first not in pilot_jobs(), 60, "the lost job to leave squeue")
            assert psutil.pid_exists(pids[0])  # the first attempt still runs: its result will come
            (tmp_path / f"release-{first}").touch()
            wait_until(lambda: "dropped a message (kind b'R" in caplog.text, 60, "the late result to arrive")
            assert not future.done()  # the late result was not delivered
            (tmp_path / f"release-{retry_job}").touch()
            assert future.result(timeout=120) == retry_job
            assert results == [retry_job]
        finally:
            for pid in pids[:1]:  # the worker that outlived its job: no process left behind
                with contextlib.suppress(psutil.NoSuchProcess):
                    psutil.Process(pid).send_signal(signal.SIGKILL)


# ---------------------------------------------------------------- make room
@pytest.mark.timeout(300)
def test_a_full_pool_whose_jobs_are_too_short_stops_an_idle_one_to_make_room(tmp_path):
    """max_workers=1, its job shortened to 3 minutes: a call with run_time_max=200 fits no
    worker, so the pool ends the idle job (long before its margin) and starts a fresh one."""
    with pool(tmp_path, max_workers=1, worker_time_limit=600, idle_timeout=None) as exe:
        _, short, _ = exe.submit(job_of, 1).result(timeout=120)
        subprocess.run(["scontrol", "update", f"JobId={short}", "TimeLimit=3"], check=True)
        wait_until(lambda: any(row["job_id"] == short and row["time_left"] is not None
                               and row["time_left"] < 200 for row in exe.worker_jobs()),
                   60, "the pool to learn the new end time")
        long_call = exe.submit(job_of, 2, resource_dict={"run_time_max": 200})
        seen = []

        def short_job_gone():
            rows = [row for row in exe.worker_jobs() if row["job_id"] == short]
            seen.extend(row["time_left"] for row in rows)
            return not rows

        wait_until(short_job_gone, 120, "the pool to end the short job")
        assert min(seen) > 30  # ended to make room, not because its end (the margin) came
        _, fresh, _ = long_call.result(timeout=120)
        assert fresh != short and pilot_jobs("all")[short][0] == "COMPLETED"
