"""The flux_allocation backend, the parts that need no Flux instance.

What decides what to ask Flux for is pure and tested here; the job handle's eventfd
bridge and messages with a plain ``concurrent.futures.Future`` in the place of the Flux
future; the private environment file with real processes and a real second user. The
behaviour suite and everything else that needs Flux runs inside a real instance:
``tests/flux`` (``scripts/run-tests`` starts it with ``flux start``).
"""

from __future__ import annotations

import importlib.util
import os
import select
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from behaviour import add, die, write_stderr_and_die

from executorlib import Executor, FluxJobExecutor
from executorlib.errors import WorkerDiedError
from executorlib.flux_job import FluxJob
from executorlib.flux_spec import (
    FluxSettings,
    check_resources,
    jobspec_for,
    needs_plugin,
    with_private_environment,
    worker_job,
)
from executorlib.interactive import private_env
from executorlib.interactive.auth import KEYS_ENV, LaunchKeys
from executorlib.interactive.per_task import PerTaskScheduler
from executorlib.interactive.spawner import Launch
from executorlib.options import pmi_option
from executorlib.processes import python_argv
from executorlib.resources import Resources
from executorlib.task import Task

FLUX_IMPORTABLE = importlib.util.find_spec("flux") is not None


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
    return Launch("tcp://node7:5555", worker_id, resources, LaunchKeys(b"p" * 40, b"s" * 40))


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
    assert request.environment[KEYS_ENV] == "p" * 40 + "s" * 40
    assert not any(("s" * 40) in part for part in request.command)
    assert "s" * 40 not in repr(request)
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
    asked = []
    job = FluxJob(exited, cancel=exited.cancel,
                  read_stderr=lambda job_id: asked.append(job_id) or "".join(f"l{i}\n" for i in range(40)))
    job.note_job_id("ƒ2mGTx3")
    exited.set_result(3)
    text = job.how_it_ended()
    assert text.startswith("Flux job ƒ2mGTx3: exit code 3; last lines of its stderr (from Flux's output ")
    assert text.endswith("\n    l38\n    l39") and "l10\n" in text and "l9\n" not in text  # the last 30
    assert asked == ["ƒ2mGTx3"]
    job.note_finish(9)  # a wait status: killed by SIGKILL
    assert "tasks ended with signal SIGKILL (9)" in job.how_it_ended()

    def unreadable(job_id):
        raise FileNotFoundError(f"job {job_id} does not exist or output not ready")

    job = FluxJob(exited, cancel=exited.cancel, read_stderr=unreadable)
    job.note_job_id("ƒ9")
    assert job.how_it_ended().endswith(
        "(its stderr could not be read from Flux: FileNotFoundError: "
        "job ƒ9 does not exist or output not ready)"
    )

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
        self.private = private_env.PrivateDirectory()
        self.environments: list[dict] = []

    def start(self, launch: Launch) -> FluxJob:
        request = worker_job(launch, FluxSettings(log_files=True), "test")
        request, path = with_private_environment(request, self.private, launch.worker_id)
        self.environments.append(dict(request.environment))
        with open(request.stdout, "wb") as out, open(request.stderr, "wb") as err:
            process = subprocess.Popen(
                list(request.command), env=dict(request.environment), cwd=request.cwd,
                stdout=out, stderr=err, start_new_session=True,
            )
        job = FluxJob(self._waits.submit(process.wait), process.kill, request.stderr, private_file=path)
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
    # the workers got their secret from the private file (and removed it), not from env
    assert os.listdir(runner.private.path) == []
    assert all(KEYS_ENV not in env for env in runner.environments)
    assert all(private_env.PATH_ENV in env for env in runner.environments)
    runner.private.close()
    assert not os.path.exists(runner.private.path)


# ------------------------------------------- secrets through a private file
def test_per_launch_variables_are_the_added_or_changed_executorlib_ones():
    inherited = {"EXECUTORLIB_TEST_SESSION": "s1", "EXECUTORLIB_NO_SHM": "1", "HOME": "/h"}
    environment = {**inherited, "EXECUTORLIB_NO_SHM": "0", "EXECUTORLIB_SECRET": "ab",
                   "EXECUTORLIB_CURVE_KEY": "k", "OMP_NUM_THREADS": "2"}
    assert private_env.per_launch(environment, inherited) == {
        "EXECUTORLIB_NO_SHM": "0", "EXECUTORLIB_SECRET": "ab", "EXECUTORLIB_CURVE_KEY": "k",
    }


def test_private_environment_keeps_the_secret_out_of_the_request(tmp_path, monkeypatch):
    monkeypatch.setenv(private_env.DIR_ENV, str(tmp_path / "private"))
    directory = private_env.PrivateDirectory()
    request = worker_job(launch_for(Resources(env={"MY": "1"})), FluxSettings(), "77")
    moved, path = with_private_environment(request, directory, 4)
    assert KEYS_ENV not in moved.environment and "s" * 40 not in str(moved)
    assert moved.environment[private_env.PATH_ENV] == path and moved.environment["MY"] == "1"
    assert moved.command == request.command
    assert os.stat(path).st_mode & 0o777 == 0o600 and os.stat(directory.path).st_mode & 0o777 == 0o700
    assert Path(path).read_text() == f"{KEYS_ENV}={'p' * 40}{'s' * 40}\n"
    directory.close()
    assert not os.path.exists(directory.path)


def test_worker_loads_the_file_into_its_environment_and_removes_it(tmp_path, monkeypatch):
    monkeypatch.setenv(private_env.DIR_ENV, str(tmp_path / "private"))
    directory = private_env.PrivateDirectory()
    path = directory.write(1, {"EXECUTORLIB_SECRET": "cafe", "EXECUTORLIB_OTHER": "x=y"})
    code = ("import os; from executorlib.interactive import private_env; private_env.load(); "
            "print(os.environ['EXECUTORLIB_SECRET'], os.environ['EXECUTORLIB_OTHER'], "
            "'EXECUTORLIB_PRIVATE_ENV' in os.environ)")
    env = {**os.environ, private_env.PATH_ENV: path}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["cafe", "x=y", "False"], done.stderr
    assert not os.path.exists(path)
    again = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1
    assert f"private environment file {path} does not exist" in again.stderr
    assert "set EXECUTORLIB_PRIVATE_DIR to a directory on a file system shared" in again.stderr
    directory.close()


def test_another_user_cannot_read_the_private_file(other_user, tmp_path, monkeypatch):
    tmp_path.chmod(0o755)  # the other user may walk up to the private directory ...
    monkeypatch.setenv(private_env.DIR_ENV, str(tmp_path / "private"))
    directory = private_env.PrivateDirectory()
    path = directory.write(1, {"EXECUTORLIB_SECRET": "cafe"})
    os.chmod(os.path.dirname(directory.path), 0o755)  # ... and into its base, but no further
    shown = other_user.run(["cat", path])
    assert shown.returncode != 0 and "cafe" not in shown.stdout
    assert "Permission denied" in shown.stderr
    listed = other_user.run(["ls", directory.path])
    assert listed.returncode != 0 and "Permission denied" in listed.stderr
    directory.close()


def test_a_base_directory_others_can_write_is_refused(tmp_path, monkeypatch):
    base = tmp_path / "open"
    base.mkdir()
    base.chmod(0o777)
    monkeypatch.setenv(private_env.DIR_ENV, str(base))
    refused = "writable by nobody else; fix it .* or set EXECUTORLIB_PRIVATE_DIR"
    with pytest.raises(PermissionError, match=refused):
        private_env.PrivateDirectory()


def test_pmi_modes_flux_serves_itself_need_no_plugin():
    assert not needs_plugin(None)
    assert not any(needs_plugin(mode) for mode in ("simple", "pmi1", "pmi2", "pmix,simple"))
    assert all(needs_plugin(mode) for mode in ("pmix", "cray-pals", "bogus"))


# ------------------------------------------------------- finding Flux for the tests
def test_find_flux_without_flux_or_build_script_says_where_flux_comes_from(tmp_path):
    """A machine with neither Flux nor ../shared/flux/build.sh: no silent skip."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    script = repo / "scripts" / "find-flux"
    script.write_bytes((Path(__file__).parent.parent / "scripts" / "find-flux").read_bytes())
    script.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "FLUX_PREFIX": str(tmp_path / "no-flux"), "HOME": str(tmp_path)}
    done = subprocess.run([str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    for where in ("module load flux", "spack install flux-core flux-pmix", "conda install -c conda-forge"):
        assert where in done.stderr.replace("\nfind-flux: ", " ")


def test_find_flux_gives_a_flux_with_its_python_bindings():
    script = Path(__file__).parent.parent / "scripts" / "find-flux"
    found = subprocess.run([str(script)], capture_output=True, text=True, timeout=900)
    assert found.returncode == 0, f"no Flux here: {found.stderr}"
    check = "command -v flux && python3 -c 'import flux.job; print(flux.job.JobspecV1.__name__)'"
    done = subprocess.run(["bash", "-c", f"{found.stdout}\n{check}"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.split()[-1] == "JobspecV1", done.stderr
