"""Submission mode: one queue job per call, on the real Slurm test cluster (sbatch,
squeue, scancel, srun --mpi=pmix) and with the local variant (same files and job
scripts, jobs as local processes). Every job writes real HDF5 files."""

from __future__ import annotations

import gc
import glob
import os
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from concurrent.futures import CancelledError
from pathlib import Path

import pytest

from executorlib import Executor, SlurmClusterExecutor, get_cache_data
from executorlib.errors import RemoteTraceback, WorkerDiedError
from executorlib.queue import FluxQueue, JobSpec, SubmissionError, render_script
from executorlib.resources import Resources
from executorlib.submission import LocalClusterExecutor
from executorlib.taskfiles import TaskFiles

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def add(a, b):
    return a + b


def mark(marker, value):
    with open(marker, "a") as file:
        file.write(f"{value}\n")
    return value


def fail_later(seconds, message):
    time.sleep(seconds)
    raise KeyError(message)


def sleep_then(seconds, value=None):
    time.sleep(seconds)
    return value


def interval(seconds):
    start = time.time()
    time.sleep(seconds)
    return start, time.time()


def crash(text):
    print(text, flush=True)
    os._exit(3)


def calc_mpi(i):
    from mpi4py import MPI

    return i, MPI.COMM_WORLD.Get_size(), MPI.COMM_WORLD.Get_rank()


def runs(marker):
    return Path(marker).read_text().split() if os.path.exists(marker) else []


def job_ids(cache):
    ids = [Path(path).read_text() for path in glob.glob(os.path.join(cache, "jobs", "*.job"))]
    return sorted(ids, key=lambda job_id: (len(job_id), job_id))  # in submission order


def in_queue(ids):
    if not ids:
        return []
    out = subprocess.run(["squeue", "--noheader", "--format=%i", "--jobs=" + ",".join(ids)],
                         capture_output=True, text=True).stdout
    return out.split()


@pytest.fixture(scope="module")
def slurm():
    """The test cluster: started (idempotent) if ``sinfo`` does not answer."""
    if subprocess.run(["sinfo"], capture_output=True).returncode != 0:
        subprocess.run([os.path.join(REPO, "scripts", "slurm-test-cluster"), "start"], check=True)


# ------------------------------------------------------------ local variant
def test_local_variant_chain_cache_and_files(in_tmp):
    marker = str(in_tmp / "marker")
    for _ in range(2):
        with LocalClusterExecutor(cache_directory="cache") as exe:
            future = 0
            for i in range(4, 8):
                future = exe.submit(add, i, exe.submit(mark, marker, future))
            assert future.result(timeout=60) == 22
    assert runs(marker) == ["0", "4", "9", "15"]  # each call ran once over both runs
    rows = get_cache_data("cache")
    assert len(rows) == 8 and all(row["queue_id"].startswith("local-") for row in rows)
    assert len(glob.glob("cache/jobs/*.task.h5")) == 8


def test_local_variant_errors_and_failed_upstream(in_tmp):
    with LocalClusterExecutor(cache_directory="cache") as exe:
        broken = exe.submit(fail_later, 0, "upstream")
        dependant = exe.submit(add, broken, 1)
        with pytest.raises(KeyError, match="upstream") as info:
            broken.result(timeout=60)
        assert isinstance(info.value.__cause__, RemoteTraceback)
        with pytest.raises(KeyError, match="upstream"):
            dependant.result(timeout=60)
        with pytest.raises(WorkerDiedError, match=r"(?s)local job .* ended in state FAILED.*last words"):
            exe.submit(crash, "last words").result(timeout=60)
        with pytest.raises(TypeError, match="cannot be pickled"):
            exe.submit(add, 1, threading.Lock()).result(timeout=60)
        with pytest.raises(SubmissionError, match="does not render.*job_name"):
            exe.submit(add, 1, 2, resource_dict={"submission_template": "{{ nope }}"}).result(timeout=60)
        assert exe.submit(add, 1, 2).result(timeout=60) == 3


def wait_for_file(path, value):
    """Block until ``path`` exists (the test creates it), then return ``value``."""
    while not os.path.exists(path):
        time.sleep(0.05)
    return value


@pytest.mark.timeout(120)
def test_the_same_call_submitted_twice_while_queued_resolves_both(in_tmp):
    """The second identical call finds the first one's job: one job serves both."""
    release = str(in_tmp / "release")
    with LocalClusterExecutor(cache_directory="cache") as exe:
        first = exe.submit(wait_for_file, release, 7)
        second = exe.submit(wait_for_file, release, 7)
        other = exe.submit(add, second, 1)
        Path(release).touch()
        assert [f.result(timeout=60) for f in (first, second, other)] == [7, 7, 8]
    assert len(job_ids("cache")) == 2  # the twin rode on the first call's job


def test_local_variant_cap_keeps_jobs_in_order(in_tmp):
    with LocalClusterExecutor(max_workers=1, cache_directory="cache") as exe:
        spans = [f.result(timeout=60) for f in [exe.submit(interval, 0.5 + i / 100) for i in range(3)]]
    assert spans == sorted(spans)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:], strict=False))


def big_bytes(n):
    return b"x" * n


def test_local_variant_a_job_that_cannot_start_fails_alone(in_tmp):
    with LocalClusterExecutor(cache_directory="cache") as exe:
        lost = exe.submit(add, 1, 1, resource_dict={"cwd": str(in_tmp / "no" / "such" / "dir")})
        with pytest.raises(WorkerDiedError, match=r"(?s)FAILED.*could not start.*no/such/dir"):
            lost.result(timeout=60)
        assert exe.submit(add, 1, 2).result(timeout=60) == 3  # the watcher goes on


def test_local_variant_keeps_no_finished_result(in_tmp):
    with LocalClusterExecutor(cache_directory="cache") as exe:
        future = exe.submit(big_bytes, 10_000_000)
        assert len(future.result(timeout=60)) == 10_000_000
        alive = weakref.ref(future)
        del future
        gc.collect()
        assert alive() is None  # the executor did not keep the future (and its 10 MB)
        first = exe.submit(add, 1, 2)
        assert first.result(timeout=60) == 3
        assert exe.submit(add, first, 1).result(timeout=60) == 4  # a finished input still works


def test_local_variant_cache_key_with_a_sub_directory(in_tmp):
    with LocalClusterExecutor(cache_directory="cache") as exe:
        first = exe.submit(add, 1, 2, resource_dict={"cache_key": "run1/step3"})
        assert exe.submit(add, first, 1, resource_dict={"cache_key": "run1/step4"}).result(timeout=60) == 4
    assert sorted(p.name for p in (in_tmp / "cache" / "jobs" / "run1").iterdir()) == [
        f"step{i}.{suffix}" for i in (3, 4) for suffix in ("job", "out", "sh", "task.h5")]
    rows = {row["filename"]: row for row in get_cache_data("cache")}
    assert rows[str(in_tmp / "cache" / "run1" / "step4.h5")]["queue_id"].startswith("local-")


def test_flux_adapter_renders_and_reads_states():
    # the parts that need no Flux instance (tests/flux runs the rest inside one)
    states = FluxQueue.parse_states("f2a|RUN||add_1\nf3b|INACTIVE|CANCELED|x\nf4c|INACTIVE|COMPLETED|\n")
    assert states["f3b"].state == "CANCELLED" and states["f4c"].state == "COMPLETED"
    assert states["f2a"].state == "RUNNING" and states["f2a"].belongs_to("add_1")
    assert not states["f3b"].belongs_to("add_1") and states["f4c"].belongs_to("add_1")
    spec = JobSpec("add_1", TaskFiles("/c", "add_1"), "/w", Resources(cores=2))
    assert "flux run -n 2" in FluxQueue().command(spec)
    assert "#SBATCH --ntasks=2" in render_script(spec, "true")


# ----------------------------------------------------------------- Slurm
@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_afterok_chain_and_mpi_job(slurm, in_tmp):
    with Executor(backend="slurm_submission", cache_directory="cache") as exe:
        assert isinstance(exe, SlurmClusterExecutor)
        future = 0
        for i in range(4, 8):
            future = exe.submit(add, i, future)  # 4 jobs, submitted at once, chained by afterok
        mpi = exe.submit(calc_mpi, 3, resource_dict={"cores": 2})
        assert future.result(timeout=200) == 22
        assert mpi.result(timeout=200) == [(3, 2, 0), (3, 2, 1)]
    assert len(job_ids("cache")) == 5
    assert "srun --mpi=pmix" in Path(glob.glob("cache/jobs/calc_mpi_*.sh")[0]).read_text()


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_dead_jobs_report_id_state_and_output(slurm, in_tmp):
    with SlurmClusterExecutor(cache_directory="cache") as exe:
        crashed = exe.submit(crash, "last words")
        victim = exe.submit(sleep_then, 60, 1)
        while not (found := glob.glob("cache/jobs/sleep_then_*.job")):
            time.sleep(0.1)
        victim_id = Path(found[0]).read_text()
        subprocess.run(["scancel", victim_id], check=True)
        with pytest.raises(WorkerDiedError, match=rf"Slurm job {victim_id} running sleep_then ended in state"
                                                    r" CANCELLED"):
            victim.result(timeout=200)
        with pytest.raises(WorkerDiedError, match=r"(?s)ended in state FAILED .*last words"):
            crashed.result(timeout=200)


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_failed_upstream_fails_and_cancels_dependants_at_once(slurm, in_tmp):
    with SlurmClusterExecutor(cache_directory="cache") as exe:
        broken = exe.submit(fail_later, 1, "upstream")
        first = exe.submit(add, broken, 1)
        second = exe.submit(add, first, 1)
        with pytest.raises(KeyError, match="upstream"):
            broken.result(timeout=200)
        for dependant in (first, second):  # at once: their jobs never run (see below)
            with pytest.raises(KeyError, match="upstream"):
                dependant.result(timeout=30)
    ids = job_ids("cache")
    assert len(ids) == 3 and in_queue(ids[1:]) in ([], ids[1:])  # gone, or listed as ended
    states = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%T", "-j", ",".join(ids[1:])],
                            capture_output=True, text=True).stdout.split()
    assert set(states) <= {"CANCELLED"}


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_bad_partition_and_template_fail_only_their_call(slurm, in_tmp):
    template = "#!/bin/bash\necho 'TEMPLATE {{ job_name }} cores={{ cores }}'\n{{ command }}\n"
    with SlurmClusterExecutor(cache_directory="cache") as exe:
        bad = exe.submit(add, 1, 1, resource_dict={"partition": "nope"})
        custom = exe.submit(add, 2, 2, resource_dict={"submission_template": template})
        with pytest.raises(SubmissionError, match="sbatch refused.*(?i:invalid partition)"):
            bad.result(timeout=60)
        assert custom.result(timeout=200) == 4
    (output,) = glob.glob("cache/jobs/add_*.out")
    text = Path(output).read_text()
    assert "TEMPLATE add_" in text and "cores=1" in text


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_cancel_scancels_jobs(slurm, in_tmp):
    exe = SlurmClusterExecutor(cache_directory="cache")
    first = exe.submit(sleep_then, 60, 1)
    while not job_ids("cache"):
        time.sleep(0.05)
    assert first.cancel()
    second = exe.submit(sleep_then, 61, 2)
    exe.shutdown(wait=True, cancel_futures=True)
    with pytest.raises(CancelledError):
        second.result(timeout=0)
    ids = job_ids("cache")
    deadline = time.monotonic() + 30
    while set(in_queue(ids)) and time.monotonic() < deadline:  # ended jobs stay listed briefly
        states = subprocess.run(["squeue", "-h", "-o", "%T", "-j", ",".join(ids)],
                                capture_output=True, text=True).stdout.split()
        if not set(states) - {"CANCELLED", "COMPLETING"}:
            break
        time.sleep(0.2)
    else:
        assert not in_queue(ids)


REATTACH = """
import sys, time
from executorlib import SlurmClusterExecutor

def mark(marker, value, seconds):
    time.sleep(seconds)
    with open(marker, "a") as file:
        file.write(f"{value}\\n")
    return value

if __name__ == "__main__":
    marker, wait = sys.argv[1], sys.argv[2] == "wait"
    exe = SlurmClusterExecutor(cache_directory="cache")
    first = exe.submit(mark, marker, 1, 0)
    second = exe.submit(mark, marker, first, 4)
    third = exe.submit(mark, marker, second, 0)
    if wait:
        print(third.result())
    exe.shutdown(wait=wait)
"""


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_second_process_reattaches_instead_of_resubmitting(slurm, in_tmp):
    (in_tmp / "script.py").write_text(textwrap.dedent(REATTACH))
    marker = str(in_tmp / "marker")
    leave = subprocess.run([sys.executable, "script.py", marker, "leave"], timeout=60)
    assert leave.returncode == 0
    submitted = job_ids("cache")
    assert len(submitted) == 3 and len(runs(marker)) < 3  # still queued or running
    again = subprocess.run([sys.executable, "script.py", marker, "wait"], capture_output=True,
                           text=True, timeout=200)
    assert again.returncode == 0, again.stderr
    assert again.stdout.split() == ["1"]
    assert runs(marker) == ["1", "1", "1"]  # each call ran exactly once
    assert job_ids("cache") == submitted  # nothing was submitted again


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_pysqa_configuration_submits_to_slurm(slurm, in_tmp):
    config = in_tmp / "pysqa"
    config.mkdir()
    (config / "queue.yaml").write_text(textwrap.dedent("""
        queue_type: SLURM
        queue_primary: debug
        queues:
          debug: {cores_max: 8, cores_min: 1, run_time_max: 3600, script: slurm.sh}
    """))
    (config / "slurm.sh").write_text(textwrap.dedent("""\
        #!/bin/bash
        #SBATCH --job-name={{job_name}}
        #SBATCH --chdir={{working_directory}}
        #SBATCH --ntasks={{cores}}
        {%- if dependency_list %}
        #SBATCH --dependency=afterok:{{ dependency_list | join(':') }}
        {%- endif %}

        {{command}}
    """))
    with SlurmClusterExecutor(cache_directory="cache", pysqa_config_directory=str(config)) as exe:
        first = exe.submit(add, 1, 2)
        assert exe.submit(add, first, 3).result(timeout=200) == 6


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_terminate_tasks_in_cache_from_another_process(slurm, in_tmp):
    exe = SlurmClusterExecutor(cache_directory="cache")
    first = exe.submit(sleep_then, 120, 1, resource_dict={"cache_key": "first"})
    second = exe.submit(sleep_then, 120, 2, resource_dict={"cache_key": "second"})
    deadline = time.monotonic() + 120
    while len(job_ids("cache")) < 2 and time.monotonic() < deadline:  # both submitted
        time.sleep(0.05)
    first_id = Path("cache/jobs/first.job").read_text()
    one = _python("from executorlib import terminate_task_in_cache as t; print(t('cache', 'first'))")
    assert one == first_id
    with pytest.raises(WorkerDiedError, match=rf"job {first_id} .*CANCELLED"):
        first.result(timeout=120)
    rest = _python("from executorlib import terminate_tasks_in_cache as t; print(*t('cache'))")
    assert rest == Path("cache/jobs/second.job").read_text()
    with pytest.raises(WorkerDiedError, match="CANCELLED"):
        second.result(timeout=120)
    exe.shutdown()
    assert _python("from executorlib import terminate_tasks_in_cache as t; print(t('cache'))") == "[]"


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_wait_false_leaves_the_with_block_at_once_and_jobs_run_on(slurm, in_tmp):
    with SlurmClusterExecutor(cache_directory="cache", wait=False) as exe:
        future = exe.submit(sleep_then, 20, "done")
    assert not future.done()  # leaving did not wait for a 20 s job...
    assert future.result(timeout=200) == "done"  # ...nor cancel it
    with SlurmClusterExecutor(cache_directory="cache") as exe:  # a later run finds the result
        assert exe.submit(sleep_then, 20, "done").result(timeout=10) == "done"
    assert len(job_ids("cache")) == 1
