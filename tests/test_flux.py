"""The flux_allocation backend.

What decides what to ask Flux for is pure and tested here always. The job handle's
eventfd bridge and messages are tested with a plain ``concurrent.futures.Future`` in the
place of the Flux future. ``TestFluxAllocation`` (the behaviour suite) runs only where
``import flux`` works inside a Flux instance: no flux-core build is available from the
package registries on our machines.
"""

from __future__ import annotations

import importlib.util
import os
import select
import subprocess
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
from behaviour import BehaviourSuite, add, die, write_stderr_and_die

from executorlib import Executor, FluxJobExecutor
from executorlib.errors import WorkerDiedError
from executorlib.flux import (
    FluxJob,
    FluxSettings,
    check_resources,
    jobspec_for,
    pmi_option,
    worker_job,
)
from executorlib.interactive import protocol
from executorlib.interactive.per_task import PerTaskScheduler
from executorlib.interactive.spawner import Launch
from executorlib.processes import python_argv
from executorlib.resources import Resources
from executorlib.task import Task

FLUX_IMPORTABLE = importlib.util.find_spec("flux") is not None
FLUX_READY = FLUX_IMPORTABLE and bool(os.environ.get("FLUX_URI"))
NO_FLUX = (
    "Flux is not available: `import flux` failed / FLUX_URI not set — no flux-core build is "
    "available from the package registries on this machine"
)


# ------------------------------------------------------------------ behaviour suite
@pytest.mark.skipif(not FLUX_READY, reason=NO_FLUX)
class TestFluxAllocation(BehaviourSuite):
    backend = "flux_allocation"
    extra = {"flux_log_files": True}  # the stderr tail in death messages comes from the log

    @pytest.fixture(autouse=True)
    def _logs_in_tmp(self, in_tmp):
        return in_tmp


@pytest.mark.skipif(not FLUX_READY, reason=NO_FLUX)
def test_flux_mpi_ranks_and_nested_executor():
    with Executor(backend="flux_allocation", max_cores=2, resource_dict={"cores": 2}) as exe:
        assert exe.submit(_ranks).result(timeout=90) == [(2, 0), (2, 1)]
    with FluxJobExecutor(flux_executor_nesting=True, max_cores=2) as exe:
        assert exe.submit(_nested_sum, resource_dict={"cores": 2}).result(timeout=120) == 3


def _ranks():
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_size(), MPI.COMM_WORLD.Get_rank()


def _nested_sum():
    with FluxJobExecutor(max_cores=2) as inner:
        return inner.submit(add, 1, 2).result(timeout=60)


# -------------------------------------------------------- without Flux: the error
def test_missing_flux_is_a_clear_error_at_construction(monkeypatch):
    monkeypatch.delenv("FLUX_URI", raising=False)
    if FLUX_IMPORTABLE:
        with pytest.raises(RuntimeError, match="FLUX_URI is not set.*flux start python script.py"):
            Executor(backend="flux_allocation")
        return
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'executorlib\[flux\]'.*flux-core") as info:
        Executor(backend="flux_allocation", pmi_mode="pmix", max_cores=2)
    assert "inside a Flux instance" in str(info.value)


def test_pmi_mode_alias():
    assert pmi_option(None, "pmix") == "pmix"
    assert pmi_option("pmix", None) == "pmix"
    assert pmi_option("pmix", "pmix") == "pmix"
    assert pmi_option(None, None) is None
    with pytest.raises(ValueError, match="pmi_mode='pmix' and flux_executor_pmi_mode='simple' disagree"):
        pmi_option("pmix", "simple")
    with pytest.raises(ValueError, match="name of a Flux PMI"):
        pmi_option("", None)
    with pytest.raises(ValueError, match="disagree"):
        FluxJobExecutor(pmi_mode="pmix", flux_executor_pmi_mode="pmi2")  # before any Flux import


# ------------------------------------------------------------ pure: the job request
def launch_for(resources: Resources, worker_id: int = 4) -> Launch:
    return Launch("tcp://node7:5555", worker_id, resources, b"s" * 32)


def test_resources_map_to_jobspec_shape_and_attributes(tmp_path):
    resources = Resources.from_dict({
        "cores": 4, "threads_per_core": 2, "gpus_per_core": 1, "num_nodes": 2, "exclusive": True,
        "run_time_max": 600, "priority": 20, "cwd": str(tmp_path), "env": {"A": "b"},
    })
    request = jobspec_for(resources, ["prog", "arg"], FluxSettings(pmi_mode="pmix"), {"A": "b"})
    assert request.command == ("prog", "arg")
    assert request.shape() == {
        "num_tasks": 4, "cores_per_task": 2, "gpus_per_task": 1, "num_nodes": 2, "exclusive": True,
    }
    assert (request.cwd, request.duration, request.urgency) == (str(tmp_path), 600, 20)
    assert request.shell_options == {"pmi": "pmix"}
    assert dict(request.environment) == {"A": "b"}
    assert request.stdout is None and request.stderr is None


def test_defaults_leave_flux_defaults_alone(in_tmp):
    request = jobspec_for(Resources(), ["prog"])
    assert request.shape() == {"num_tasks": 1, "cores_per_task": 1}
    assert request.cwd == os.getcwd()
    assert request.shell_options == {}
    assert (request.duration, request.urgency, request.stdout, request.stderr) == (None,) * 4


def test_nesting_runs_the_command_under_a_broker_per_node():
    settings = FluxSettings(pmi_mode="simple", nesting=True)
    request = jobspec_for(Resources(cores=3, threads_per_core=2), ["python", "-m", "x"], settings)
    assert request.command == ("flux", "broker", "python", "-m", "x")
    assert request.shape() == {"num_tasks": 3, "cores_per_task": 2}
    assert request.shell_options == {
        "pmi": "simple", "per-resource.type": "node", "mpi": "none", "exit-timeout": "none",
    }


def test_log_files_and_error_log_file(tmp_path):
    settings = FluxSettings(log_files=True)
    request = jobspec_for(Resources(cwd=str(tmp_path)), ["prog"], settings, log_stem="job1")
    assert (request.stdout, request.stderr) == (str(tmp_path / "job1.out"), str(tmp_path / "job1.err"))
    explicit = Resources(cwd=str(tmp_path), error_log_file=str(tmp_path / "mine.err"))
    assert jobspec_for(explicit, ["prog"]).stderr == str(tmp_path / "mine.err")
    assert jobspec_for(explicit, ["prog"], settings).stderr == str(tmp_path / "mine.err")


def test_worker_job_keeps_the_secret_out_of_argv(tmp_path):
    resources = Resources(cores=2, threads_per_core=3, cwd=str(tmp_path), env={"MY": "1"})
    request = worker_job(launch_for(resources), FluxSettings(log_files=True), "77")
    assert request.command == (*python_argv("interactive_parallel"), "tcp://node7:5555", "4")
    assert request.environment[protocol.SECRET_ENV] == (b"s" * 32).hex()
    assert not any(("s" * 64) in part for part in request.command)
    assert "s" * 64 not in repr(request)
    assert request.environment["OMP_NUM_THREADS"] == "3" and request.environment["MY"] == "1"
    assert request.stderr == str(tmp_path / "executorlib-77-worker4.err")
    assert request.name == "executorlib-77-worker4"


def test_worker_job_is_serial_for_one_core_or_under_nesting():
    serial = worker_job(launch_for(Resources()), FluxSettings(), "1")
    assert serial.command == (*python_argv("interactive_serial"), "tcp://node7:5555", "4")
    nested = worker_job(launch_for(Resources(cores=4)), FluxSettings(nesting=True), "1")
    assert nested.command[:5] == ("flux", "broker", *python_argv("interactive_serial"))
    assert nested.num_tasks == 4


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"gpus_per_core": 0.5}, "whole GPUs per task"),
        ({"exclusive": True}, "set resource_dict\\['num_nodes'\\] too"),
        ({"num_nodes": 3, "cores": 2}, "num_nodes=3 needs at least one task per node"),
        ({"priority": 32}, "Flux urgency, 0 \\(hold\\) to 31"),
        ({"priority": -1}, "got -1"),
    ],
)
def test_requests_flux_cannot_express_are_refused_early(values, match):
    with pytest.raises(ValueError, match=match):
        check_resources(Resources.from_dict(values))
    with pytest.raises(ValueError, match=match):
        jobspec_for(Resources.from_dict(values), ["prog"])


# ------------------------------------------- the handle, a plain Future in Flux's place
def wait_readable(fd: int, timeout_s: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout_s * 1000))


def test_done_callback_from_another_thread_wakes_the_poll():
    future: Future = Future()
    job = FluxJob(future, cancel=future.cancel)
    [fd] = job.fds()
    assert not wait_readable(fd, 0.05)
    threading.Timer(0.1, future.set_result, [0]).start()
    assert wait_readable(fd, 10)
    assert job.on_readable(fd) is True
    job._on_done(future)  # a late callback after the fd is closed writes nothing


def test_already_finished_future_is_readable_at_once():
    future: Future = Future()
    future.set_result(0)
    job = FluxJob(future, cancel=future.cancel)
    assert wait_readable(job.fds()[0], 1)
    assert job.on_readable(job.fds()[0])


def test_stop_cancels_only_a_running_job():
    calls = []
    future: Future = Future()
    job = FluxJob(future, cancel=lambda: calls.append("cancel"))
    job.stop()
    future.set_result(0)
    job.stop()
    assert calls == ["cancel"]
    assert job.on_readable(job.fds()[0])


def test_how_it_ended_names_job_and_status(tmp_path):
    exited: Future = Future()
    job = FluxJob(exited, cancel=exited.cancel)
    job.note_job_id("ƒ2mGTx3")
    exited.set_result(3)
    assert job.how_it_ended().startswith("Flux job ƒ2mGTx3: exit code 3 (flux_log_files=True")
    job.note_finish(9)  # a wait status: killed by SIGKILL
    assert "tasks ended with signal SIGKILL (9)" in job.how_it_ended()

    raised: Future = Future()
    raised.set_exception(RuntimeError("job.exception type=timeout severity=0 resource allocation expired"))
    log = tmp_path / "w.err"
    log.write_text("".join(f"line {i}\n" for i in range(100)) + "Traceback: last words\n")
    job = FluxJob(raised, cancel=raised.cancel, stderr_path=str(log))
    job.note_finish(15 << 8)  # exited with code 15
    text = job.how_it_ended()
    assert text.startswith("Flux job (no id yet): RuntimeError: job.exception type=timeout")
    assert "tasks ended with exit code 15" in text
    assert text.endswith("Traceback: last words") and "line 99" in text and "line 60" not in text

    never: Future = Future()
    never.cancel()
    assert "cancelled before it ran" in FluxJob(never, cancel=never.cancel).how_it_ended()


# ------------------- the manager + FluxJob + a JobRequest run as one local process
class RequestRunner:
    """Runs each worker's JobRequest (command, environment, cwd, log files) as a local
    process: a stand-in for Flux's job shell with one task, to check that the request
    is complete and that FluxJob drives the real manager thread. Not Flux itself."""

    name = "flux"
    bind_host = "127.0.0.1"

    def __init__(self) -> None:
        self._waits = ThreadPoolExecutor(4)

    def start(self, launch: Launch) -> FluxJob:
        request = worker_job(launch, FluxSettings(log_files=True), "test")
        with open(request.stdout, "wb") as out, open(request.stderr, "wb") as err:
            process = subprocess.Popen(
                list(request.command), env=dict(request.environment), cwd=request.cwd,
                stdout=out, stderr=err, start_new_session=True,
            )
        job = FluxJob(self._waits.submit(process.wait), process.kill, request.stderr)
        job.note_job_id(f"local-{process.pid}")
        return job


@pytest.mark.timeout(60)
def test_manager_runs_calls_and_reports_deaths_through_flux_jobs(tmp_path):
    runner = RequestRunner()
    scheduler = PerTaskScheduler(runner, Resources(cwd=str(tmp_path)), max_cores=2)
    scheduler.start()
    tasks = [Task(f, args, {}, Resources(cwd=str(tmp_path))) for f, args in
             [(add, (1, 2)), (die, (3,)), (write_stderr_and_die, ("last words",))]]
    for task in tasks:
        scheduler.submit(task)
    try:
        assert tasks[0].future.result(timeout=30) == 3
        died = r"\(flux\) ended while running die: Flux job local-\d+: exit code 3"
        with pytest.raises(WorkerDiedError, match=died):
            tasks[1].future.result(timeout=30)
        with pytest.raises(WorkerDiedError, match=r"exit code 7; last lines of .*\.err:\n    last words"):
            tasks[2].future.result(timeout=30)
    finally:
        scheduler.shutdown(wait=True, cancel_futures=True)
        runner._waits.shutdown()
    assert sorted(p.suffix for p in tmp_path.iterdir()).count(".err") >= 3
