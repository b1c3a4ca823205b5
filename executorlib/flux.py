"""The ``flux_allocation`` backend: every worker is a Flux job inside a Flux instance.

Data flow::

    Launch + Resources + FluxSettings
        -> worker_job() / jobspec_for()   pure: a JobRequest (plain data, tested without Flux)
        -> FluxSpawner.start()            thin: JobspecV1 from the request, FluxExecutor.submit
        -> FluxJob handle                 the Flux future's done-callback writes an eventfd,
                                          so the manager's one poll wakes when the job ends

Everything that decides *what* to ask Flux for lives in the pure functions at the top;
the only code that imports ``flux`` is :func:`load_flux` and :class:`FluxSpawner`.
``jobspec_for`` and ``FluxSettings`` are meant for reuse by other Flux paths
(submission mode): they take any command, not only a worker's.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from executorlib.executor import AllocationExecutor
from executorlib.interactive.spawner import Launch, worker_argv, worker_environment
from executorlib.options import parse_options, pmi_option, shared_options
from executorlib.processes import describe_exit, tail_lines
from executorlib.resources import Resources

_STDERR_TAIL_BYTES = 4096
_SUBMIT_WAIT_S = 60  # how long stop() waits for a submission in flight to get its job id
_MAX_URGENCY = 31  # Flux urgency: 0 holds a job, 16 is the default, 31 expedites it
_INSTALL_HINT = (
    "pip install 'executorlib[flux]' (the flux-python bindings) together with a flux-core "
    "installation of the same version (e.g. conda install -c conda-forge flux-core, or "
    "your site's module)"
)


# ------------------------------------------------------------------ pure: what to ask for
@dataclass(frozen=True)
class FluxSettings:
    """Executor-level Flux options, applied to every job the executor submits.

    pmi_mode: the job shell's ``pmi`` option (e.g. ``"pmix"``, ``"simple"``).
    nesting: run the command as the initial program of a nested Flux instance.
    log_files: write each job's stdout/stderr to files in its working directory.
    """

    pmi_mode: str | None = None
    nesting: bool = False
    log_files: bool = False


@dataclass(frozen=True)
class JobRequest:
    """What one Flux job asks for, as plain data; ``shape()`` are the arguments of
    ``flux.job.JobspecV1.from_command``, the other fields are set on the jobspec."""

    command: tuple[str, ...]
    num_tasks: int
    cores_per_task: int
    gpus_per_task: int | None
    num_nodes: int | None
    exclusive: bool
    cwd: str
    environment: Mapping[str, str] = field(default_factory=dict, repr=False)  # holds the secret
    shell_options: Mapping[str, Any] = field(default_factory=dict)
    duration: float | None = None
    urgency: int | None = None
    stdout: str | None = None
    stderr: str | None = None
    name: str | None = None

    def shape(self) -> dict[str, Any]:
        """Keyword arguments of ``JobspecV1.from_command`` (defaults left out, so older
        flux-python releases without ``exclusive`` still accept them)."""
        shape: dict[str, Any] = {"num_tasks": self.num_tasks, "cores_per_task": self.cores_per_task}
        if self.gpus_per_task:
            shape["gpus_per_task"] = self.gpus_per_task
        if self.num_nodes is not None:
            shape["num_nodes"] = self.num_nodes
        if self.exclusive:
            shape["exclusive"] = True
        return shape


def check_resources(resources: Resources) -> None:
    """Raise ``ValueError`` for resources Flux cannot express, before anything is submitted."""
    if resources.gpus_per_core != int(resources.gpus_per_core):
        raise ValueError(
            f"Flux assigns whole GPUs per task; resource_dict['gpus_per_core']="
            f"{resources.gpus_per_core} must be a whole number"
        )
    if resources.exclusive and resources.num_nodes is None:
        raise ValueError(
            "Flux grants exclusive=True only for whole nodes; set resource_dict['num_nodes'] too"
        )
    if resources.num_nodes is not None and resources.num_nodes > resources.cores:
        raise ValueError(
            f"num_nodes={resources.num_nodes} needs at least one task per node, but cores="
            f"{resources.cores}; raise cores or lower num_nodes"
        )
    if resources.priority is not None and not 0 <= resources.priority <= _MAX_URGENCY:
        raise ValueError(
            f"resource_dict['priority'] is the Flux urgency, 0 (hold) to {_MAX_URGENCY} "
            f"(expedite), default 16; got {resources.priority}"
        )


def nested_command(command: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``command`` as the initial program of a new Flux instance started as a job.

    This is how ``flux alloc``/``flux batch`` start an instance: the job runs
    ``flux broker COMMAND``, one broker per node (see :func:`nesting_shell_options`);
    the brokers bootstrap from the job shell's PMI and run ``COMMAND`` once, with
    ``FLUX_URI`` pointing at the new instance.
    """
    return ("flux", "broker", *command)


def nesting_shell_options() -> dict[str, Any]:
    """Shell options of a nested instance, as ``JobspecV1.from_nest_command`` sets them:
    one task (broker) per node instead of one per slot, no MPI personality, and no
    exit timeout (the brokers end together when the initial program ends)."""
    return {"per-resource.type": "node", "mpi": "none", "exit-timeout": "none"}


def log_paths(directory: str, stem: str) -> tuple[str, str]:
    """Absolute stdout and stderr file names for a job's log files."""
    base = os.path.join(os.path.abspath(directory), stem)
    return f"{base}.out", f"{base}.err"


def jobspec_for(
    resources: Resources,
    command: list[str] | tuple[str, ...],
    settings: FluxSettings = FluxSettings(),  # frozen, so one shared default is safe
    environment: Mapping[str, str] | None = None,
    cwd: str | None = None,
    log_stem: str | None = None,
) -> JobRequest:
    """The Flux job for ``command`` with ``resources``: ``cores`` tasks of
    ``threads_per_core`` cores and ``gpus_per_core`` GPUs each, in ``resources.cwd``
    (else ``cwd``, else this process's working directory)."""
    check_resources(resources)
    workdir = resources.cwd or cwd or os.getcwd()
    options: dict[str, Any] = {"pmi": settings.pmi_mode} if settings.pmi_mode else {}
    if settings.nesting:
        command = nested_command(command)
        options.update(nesting_shell_options())
    stdout = stderr = None
    if settings.log_files:
        stdout, stderr = log_paths(workdir, log_stem or "flux-job")
    return JobRequest(
        command=tuple(command), num_tasks=resources.cores, cores_per_task=resources.threads_per_core,
        gpus_per_task=int(resources.gpus_per_core) or None, num_nodes=resources.num_nodes,
        exclusive=resources.exclusive, cwd=workdir, environment=dict(environment or {}),
        shell_options=options, duration=resources.run_time_max, urgency=resources.priority,
        stdout=stdout, stderr=resources.error_log_file or stderr, name=log_stem,
    )


def worker_command(launch: Launch, settings: FluxSettings) -> list[str]:
    """The worker's argv. Flux starts the MPI ranks itself (no mpiexec). Under nesting
    the worker is one process that owns the nested instance; a function it runs starts
    its own parallel jobs there (e.g. with a nested ``FluxJobExecutor``)."""
    parallel = launch.resources.cores > 1 and not settings.nesting
    return worker_argv("interactive_parallel" if parallel else "interactive_serial", launch)


def worker_job(launch: Launch, settings: FluxSettings, tag: str) -> JobRequest:
    """The Flux job that starts the worker of ``launch``; its secret only in the environment."""
    stem = f"executorlib-{tag}-worker{launch.worker_id}"
    return jobspec_for(
        launch.resources, worker_command(launch, settings), settings,
        environment=worker_environment(launch), log_stem=stem,
    )


# ----------------------------------------------------- the handle the manager polls
class FluxJob:
    """A submitted worker job, with the interface of ``WorkerProcess``.

    ``future`` is the job's future (a ``flux.job.FluxExecutorFuture``; any
    ``concurrent.futures.Future`` works): its done-callback writes an eventfd that the
    manager polls, so no thread waits per job. ``cancel`` stops the job.
    """

    def __init__(self, future: Future, cancel: Callable[[], None], stderr_path: str | None = None) -> None:
        self._future = future
        self._cancel = cancel
        self._stderr_path = stderr_path
        self._lock = threading.Lock()
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.job_id: str | None = None
        self.wait_status: int | None = None
        future.add_done_callback(self._on_done)

    def note_job_id(self, job_id: Any) -> None:
        """Record the job id once Flux has assigned it (called from Flux's thread)."""
        if job_id is not None:
            self.job_id = str(job_id)  # a flux.job.JobID prints as its f58 form, e.g. ƒ2mGTx3

    def note_finish(self, wait_status: int) -> None:
        """Record the wait status of the job's ``finish`` event."""
        self.wait_status = wait_status

    def _on_done(self, _: Future) -> None:
        with self._lock:
            if self._fd >= 0:
                os.eventfd_write(self._fd, 1)

    def fds(self) -> list[int]:
        """The eventfd that becomes readable when the job has ended."""
        return [self._fd]

    def on_readable(self, fd: int) -> bool:
        """The job has ended: close the eventfd and say so."""
        with self._lock:
            os.close(self._fd)
            self._fd = -1
        return True

    def how_it_ended(self) -> str:
        """The job id and its exception or exit status, plus the stderr tail if logged."""
        name = f"Flux job {self.job_id}" if self.job_id else "Flux job (no id yet)"
        text = f"{name}: {describe_job_end(self._future, self.wait_status)}"
        lines = stderr_tail(self._stderr_path)
        if lines:
            text += f"; last lines of {self._stderr_path}:\n    " + "\n    ".join(lines)
        elif self._stderr_path is None:
            text += " (flux_log_files=True keeps the job's stderr in a file)"
        return text

    def stop(self) -> None:
        """Cancel the job (Flux ends its tasks); a no-op once it has ended."""
        if not self._future.done():
            self._cancel()


def describe_job_end(future: Future, wait_status: int | None) -> str:
    """'exit code 3', 'signal SIGKILL (9)', 'cancelled before it ran', or the job's
    exception (a ``flux.job.JobException``: timeout, cancel, lost node; or why the
    submission failed), with the tasks' wait status where the ``finish`` event has one."""
    if future.cancelled():
        return "cancelled before it ran"
    if not future.done():
        return "still running"
    parts = []
    error = future.exception()
    if error is not None:
        parts.append(f"{type(error).__name__}: {error}")
    if wait_status is not None:
        parts.append(f"tasks ended with {describe_exit(os.waitstatus_to_exitcode(wait_status))}")
    elif error is None:
        parts.append(describe_exit(future.result()))
    return "; ".join(parts)


def stderr_tail(path: str | None, lines: int = 30) -> list[str]:
    """The last ``lines`` lines of a log file, or [] when there is none."""
    return tail_lines(path, lines, _STDERR_TAIL_BYTES) or []


# -------------------------------------------------------- thin layer: imports flux
def load_flux(need_instance: bool = True) -> Any:
    """Import ``flux`` (and ``flux.job``, ``flux.resource``) or say how to get it."""
    try:
        import flux
        import flux.job
        import flux.resource
    except ImportError as error:
        raise ModuleNotFoundError(
            f"the flux_allocation backend needs Flux's Python bindings, and `import flux` "
            f"failed ({error}); {_INSTALL_HINT}. Then run inside a Flux instance, "
            "e.g. `flux start python script.py` or `srun flux start python script.py`."
        ) from error
    if need_instance and not os.environ.get("FLUX_URI"):
        raise RuntimeError(
            "the flux_allocation backend submits workers to the enclosing Flux instance, but "
            "FLUX_URI is not set: this process does not run inside one. Start it with "
            "`flux start python script.py` (or `srun flux start ...` in a Slurm job), or "
            "pass flux_executor=flux.job.FluxExecutor(...) connected to an instance."
        )
    return flux


class FluxSpawner:
    """Starts each worker as a Flux job through a ``flux.job.FluxExecutor``."""

    name = "flux"
    spares = False  # an idle spare job would hold cores a nested executor needs

    def __init__(self, settings: FluxSettings, flux_executor: Any = None) -> None:
        self._flux = load_flux(need_instance=flux_executor is None)
        self._settings = settings
        self._own_executor = flux_executor is None
        self._executor = flux_executor
        self._handle = None
        self._tag = str(os.getpid())
        self.bind_host = socket.gethostname()

    def handle(self) -> Any:
        """This spawner's connection to the instance (used from one thread at a time)."""
        if self._handle is None:
            self._handle = self._flux.Flux()
        return self._handle

    def instance_cores(self) -> int:
        """Cores of the instance's nodes that are up."""
        return int(self._flux.resource.resource_list(self.handle()).get().up.ncores)

    def start(self, launch: Launch) -> FluxJob:
        request = worker_job(launch, self._settings, self._tag)
        os.makedirs(request.cwd, exist_ok=True)
        future = self._submit(request)
        job = FluxJob(future, lambda: self._cancel(future), request.stderr)
        future.add_jobid_callback(lambda f: job.note_job_id(_job_id(f, 0)))
        future.add_event_callback("finish", lambda _, event: job.note_finish(event.context["status"]))
        return job

    def _submit(self, request: JobRequest) -> Future:
        if self._executor is None:
            self._executor = self._flux.job.FluxExecutor()
        urgency = {} if request.urgency is None else {"urgency": request.urgency}
        return self._executor.submit(self.jobspec(request), **urgency)

    def jobspec(self, request: JobRequest) -> Any:
        """A ``flux.job.JobspecV1`` built from ``request``."""
        jobspec = self._flux.job.JobspecV1.from_command(list(request.command), **request.shape())
        jobspec.cwd = request.cwd
        jobspec.environment = dict(request.environment)
        for key, value in request.shell_options.items():
            jobspec.setattr_shell_option(key, value)
        if request.duration is not None:
            jobspec.duration = request.duration
        if request.stdout is not None:
            jobspec.stdout = request.stdout
        if request.stderr is not None:
            jobspec.stderr = request.stderr
        if request.name:
            jobspec.setattr("system.job.name", request.name)
        return jobspec

    def _cancel(self, future: Future) -> None:
        if future.cancel():  # not submitted yet
            return
        job_id = _job_id(future, _SUBMIT_WAIT_S)
        if job_id is None:  # the submission failed or never finished: no job to stop
            return
        with contextlib.suppress(OSError):  # the job ended meanwhile: nothing to stop
            self._flux.job.cancel(self.handle(), job_id, "stopped by executorlib")

    def close(self) -> None:
        """Shut down the FluxExecutor this spawner created (never a user's)."""
        if self._own_executor and self._executor is not None:
            self._executor.shutdown(wait=False)


def _job_id(future: Any, timeout: float) -> Any:
    """The Flux future's job id, or None where the job was never submitted."""
    try:
        return future.jobid(timeout)
    except Exception:  # CancelledError, the submission's error, or a timeout
        return None


# ------------------------------------------------------------------- the executor
@shared_options()
class FluxJobExecutor(AllocationExecutor):
    """Runs each worker as a Flux job in the enclosing Flux instance.

    pmi_mode (alias flux_executor_pmi_mode): the job shell's PMI, e.g. ``"pmix"``;
    flux_executor: a ``flux.job.FluxExecutor`` to submit through (default: our own);
    flux_executor_nesting: start each worker in a nested Flux instance of its own, so
    the function can open a ``FluxJobExecutor`` there;
    flux_log_files: write each worker's stdout/stderr to
    ``executorlib-PID-workerN.out``/``.err`` in its working directory.
    ``max_cores`` defaults to the cores of the instance's nodes that are up.
    """

    backend = "flux_allocation"

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        pmi_mode: str | None = None,
        flux_executor_pmi_mode: str | None = None,
        flux_executor: Any = None,
        flux_executor_nesting: bool = False,
        flux_log_files: bool = False,
        **options: Any,
    ) -> None:
        options = parse_options(type(self).__name__, {**options, "max_workers": max_workers})
        settings = FluxSettings(
            pmi_option(pmi_mode, flux_executor_pmi_mode), flux_executor_nesting, flux_log_files
        )
        self._spawner = FluxSpawner(settings, flux_executor)
        self._instance_cores: int | None = None
        host = "127.0.0.1" if options.hostname_localhost else None
        self._setup(options, lambda: self._scheduler_for(self._spawner, host))

    def _check_fits(self, resources: Resources) -> None:
        check_resources(resources)
        super()._check_fits(resources)

    def _available_cores(self) -> int:
        if self._instance_cores is None:
            self._instance_cores = self._spawner.instance_cores()
        return self._instance_cores

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """As ``concurrent.futures``; with ``wait`` also closes our own FluxExecutor."""
        super().shutdown(wait, cancel_futures=cancel_futures)
        if wait:
            self._spawner.close()
