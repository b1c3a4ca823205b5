"""The ``flux_allocation`` backend: every worker is a Flux job inside a Flux instance.

Data flow::

    Launch + Resources + FluxSettings
        -> flux_spec.worker_job()        pure: a JobRequest (plain data, tested without Flux)
        -> FluxSpawner.start()           per-launch secrets -> a 0600 file (private_env);
                                         JobspecV1 from the request; FluxExecutor.submit
        -> flux_job.FluxJob handle       the Flux future's done-callback writes an eventfd,
                                         so the manager's one poll wakes when the job ends

The only code that imports ``flux`` is :func:`load_flux` and :class:`FluxSpawner`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from executorlib.executor import AllocationExecutor
from executorlib.flux_job import FluxJob
from executorlib.flux_spec import (
    FluxSettings,
    JobRequest,
    check_resources,
    needs_plugin,
    with_private_environment,
    worker_job,
)
from executorlib.interactive import private_env
from executorlib.interactive.spawner import Launch
from executorlib.options import parse_options, pmi_option, shared_options
from executorlib.resources import Resources

__all__ = ["FluxJobExecutor", "FluxSpawner", "load_flux"]

_SUBMIT_WAIT_S = 60  # how long stop() waits for a submission in flight to get its job id
_PROBE_WAIT_S = 120  # a pmi probe job waits in the queue like any job
# What a PMI server puts into a task's environment: simple PMI (flux-core), PMIx
# (flux-pmix), Cray PALS (flux-coral2).
_PMI_MARKERS = ("PMI_FD=", "PMIX_RANK=", "PMIX_NAMESPACE=", "PALS_RANKID=", "PALS_APINFO=")
INSTALL_HINT = (
    "Flux comes from your site (e.g. `module load flux`), spack (`spack install flux-core "
    "flux-pmix`) or conda-forge (`conda install -c conda-forge flux-core`); its Python "
    "bindings are part of flux-core (`pip install 'executorlib[flux]'` only adds the "
    "flux-python wheel, which needs a flux-core of the same version)"
)


def load_flux(need_instance: bool = True) -> Any:
    """Import ``flux`` (and ``flux.job``, ``flux.resource``) or say how to get it."""
    try:
        import flux
        import flux.job
        import flux.job.output
        import flux.resource
    except ImportError as error:
        raise ModuleNotFoundError(
            f"the flux_allocation backend needs Flux's Python bindings, and `import flux` "
            f"failed ({error}). {INSTALL_HINT}. Then run inside a Flux instance, "
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
    host_socket = True  # a job on the executor's node talks over a Unix socket (host_socket.py)

    def __init__(self, settings: FluxSettings, flux_executor: Any = None) -> None:
        self._flux = load_flux(need_instance=flux_executor is None)
        self._settings = settings
        self._own_executor = flux_executor is None
        self._executor = flux_executor
        self._handle = None
        self._handle_lock = threading.Lock()  # a flux.Flux handle is not thread-safe
        self._private: private_env.PrivateDirectory | None = None
        self._tag = str(os.getpid())
        self.bind_host = socket.gethostname()
        if needs_plugin(settings.pmi_mode):  # here, before any worker holds a core
            try:
                self.check_pmi()
            except BaseException:
                self.close()
                raise

    def _with_handle(self, action: Callable[[Any], Any]) -> Any:
        with self._handle_lock:
            if self._handle is None:
                self._handle = self._flux.Flux()
            return action(self._handle)

    def instance_cores(self) -> int:
        """Cores of the instance's nodes that are up."""
        listing = self._with_handle(lambda h: self._flux.resource.resource_list(h).get())
        return int(listing.up.ncores)

    def start(self, launch: Launch) -> FluxJob:
        request = worker_job(launch, self._settings, self._tag)
        os.makedirs(request.cwd, exist_ok=True)
        request, private_file = self._move_secrets(request, launch.worker_id)
        try:
            future = self._submit(request)
        except BaseException:
            private_env.discard(private_file)
            raise
        job = FluxJob(future, lambda: self._cancel(future), request.stderr, self.read_stderr, private_file)
        future.add_jobid_callback(lambda f: job.note_job_id(_job_id(f, 0)))
        future.add_event_callback("finish", lambda _, event: job.note_finish(event.context["status"]))
        return job

    def _move_secrets(self, request: JobRequest, worker_id: int) -> tuple[JobRequest, str]:
        if self._private is None:
            self._private = private_env.PrivateDirectory()
        return with_private_environment(request, self._private, worker_id)

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

    def read_stderr(self, job_id: str) -> str:
        """The stderr of an ended job (and the job shell's messages), from its output
        eventlog in the instance's KVS."""
        output = self._with_handle(
            lambda h: self._flux.job.output.job_output(h, self._flux.job.JobID(job_id), nowait=True)
        )
        return output.stderr

    def check_pmi(self) -> None:
        """Run one tiny job with the executor's ``pmi`` shell option and check that some
        PMI server answered it (Flux's job shell ignores a name it does not know, and
        MPI then fails in ``PMI_Init``); raise a one-line error if none did. Done when
        the executor is made, in the caller's thread, so no worker of ours holds the
        cores the probe needs."""
        mode = self._settings.pmi_mode
        request = JobRequest(("printenv",), 1, 1, None, None, False, os.getcwd(),
                             environment={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                             shell_options={"pmi": mode}, name="executorlib-pmi-probe")
        future = self._submit(request)
        future.result(timeout=_PROBE_WAIT_S)
        job_id = future.jobid(0)
        output = self._with_handle(lambda h: self._flux.job.output.job_output(h, job_id, nowait=True))
        if not any(line.startswith(_PMI_MARKERS) for line in output.stdout.splitlines()):
            raise RuntimeError(
                f"pmi_mode={mode!r}: this Flux instance serves no PMI of that name (a job with "
                f"-o pmi={mode} got no PMI_FD, PMIX_* or PALS_* variable; Flux ignores names it "
                "does not know): leave pmi_mode unset for Flux's own PMI (OpenMPI 4.1, MPICH), "
                "or install flux-pmix for pmi_mode='pmix'"
            )

    def _cancel(self, future: Future) -> None:
        if future.cancel():  # not submitted yet
            return
        job_id = _job_id(future, _SUBMIT_WAIT_S)
        if job_id is None:  # the submission failed or never finished: no job to stop
            return
        with contextlib.suppress(OSError):  # the job ended meanwhile: nothing to stop
            self._with_handle(lambda h: self._flux.job.cancel(h, job_id, "stopped by executorlib"))

    def close(self) -> None:
        """Shut down the FluxExecutor this spawner created (never a user's); remove
        the private files no worker read."""
        if self._own_executor and self._executor is not None:
            self._executor.shutdown(wait=False)
        if self._private is not None:
            self._private.close()


def _job_id(future: Any, timeout: float) -> Any:
    """The Flux future's job id, or None where the job was never submitted."""
    try:
        return future.jobid(timeout)
    except Exception:  # CancelledError, the submission's error, or a timeout
        return None


@shared_options()
class FluxJobExecutor(AllocationExecutor):
    """Runs each worker as a Flux job in the enclosing Flux instance.

    pmi_mode (alias flux_executor_pmi_mode): the job shell's PMI; unset is Flux's own
    (simple PMI, which OpenMPI 4.1 and MPICH use), ``"pmix"`` needs flux-pmix, and a
    PMI the instance cannot serve is a one-line RuntimeError here (one probe job);
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
