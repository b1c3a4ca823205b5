"""``SlurmClusterExecutor(block_allocation=True)``: a pool of long-lived worker jobs.

    SlurmPilotExecutor ── PilotScheduler (pool.py: the manager thread + elastic policy,
                                          retire.py: when jobs end)
        └─ PilotSpawner.start(launch)  ─ sbatch (job.py) ─>  worker job on a node
             PilotJob: N PilotWorkers, an eventfd each <── JobWatcher (watcher.py: one squeue)
             Guardian: cancels our jobs if this process dies (backend/pilot_guardian.py)
        worker  ── connects back to this host's name over the authenticated channel
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from executorlib import files
from executorlib.options import parse_options, pmi_option
from executorlib.pilot.job import PilotSettings, PilotSpawner
from executorlib.pilot.placement import PoolPolicy
from executorlib.pilot.pool import PilotScheduler
from executorlib.resources import Resources
from executorlib.submission import SlurmClusterExecutor

_PILOT_OPTIONS = (
    "max_workers", "cache_directory", "resource_dict", "block_allocation", "init_function",
    "disable_dependencies", "plot_dependency_graph", "plot_dependency_graph_filename",
    "export_workflow_filename", "log_obj_size", "restart_limit",
)


class SlurmPilotExecutor(SlurmClusterExecutor):
    """Long-lived Slurm worker jobs ("pilot jobs") that this executor submits itself,
    that connect back to it and run many calls each. Made by
    ``SlurmClusterExecutor(block_allocation=True, ...)``; use it from a login node or a
    notebook when calls are too many or too short for one job each.

    max_workers: at most this many workers at once (``exe.max_workers = n`` changes it
        while the pool runs). min_workers: keep at least this many.
    workers_per_job: workers hosted by each worker job (default 1): the job asks Slurm
        for that many times a worker's resources (``cores``, ``gpus_per_core``,
        ``memory_max``) and starts that many workers, each with its own connection and
        key; fewer jobs count against a site's job limits (MaxSubmitJobs). min_workers
        and max_workers count workers and must be multiples of it; the pool grows and
        shrinks by whole jobs (a job ends when all its workers are idle, or, after a
        resize, when its last worker has finished its calls). A job that is lost, or one
        of whose workers crashes, fails over the calls of all its workers.
    idle_timeout: seconds a worker may sit idle (while no call waits) before its job
        ends; None: never. pending_timeout: seconds a worker job may wait in the queue
        before it is cancelled (squeue's reason is logged); None: no limit.
    worker_time_limit: seconds, each worker job's ``sbatch --time`` (rounded up to
        minutes); None: the partition's default. A call may declare
        ``resource_dict={"run_time_max": s}``: it then only goes to a worker whose job
        has that much time left (plus a 30 s margin), or to a fresh job.
    max_retries: how often a call runs again when its worker job is lost (scancel,
        preemption, time limit, a node lost); never on a Python exception.
    restart_limit: how many worker jobs lost while running (not ended by the pool) are
        replaced before the pool gives up and fails its calls; None (default): no limit.
    init_function: runs once per worker; the dict it returns fills keyword arguments.
    resource_dict: each worker job's resources (``cores``, ``threads_per_core``,
        ``gpus_per_core``, ``partition``, ``memory_max``, ``num_nodes``, ``exclusive``,
        ``cwd``, ``env``, ``slurm_cmd_args``, ``container``: the workers run in it).
        cache_directory: results are cached there when given; job output goes to
        ``<it or ./executorlib_cache>/pilot/``.
    pmi_mode (alias flux_executor_pmi_mode): ``srun --mpi=`` for MPI workers (``cores > 1``,
        default pmix). disable_dependencies, plot_dependency_graph(_filename),
        export_workflow_filename, log_obj_size: as for the other executors.
    """

    def __init__(
        self,
        max_workers: int = 1,
        *,
        min_workers: int = 0,
        idle_timeout: float | None = 60.0,
        pending_timeout: float | None = None,
        worker_time_limit: int | None = None,
        max_retries: int = 0,
        workers_per_job: int = 1,
        pmi_mode: str | None = None,
        flux_executor_pmi_mode: str | None = None,
        block_allocation: bool = True,
        **options: Any,
    ) -> None:
        options = parse_options(
            type(self).__name__, {**options, "max_workers": max_workers, "block_allocation": True},
            accepted=_PILOT_OPTIONS,
        )
        policy = PoolPolicy(min_workers, max_workers, idle_timeout, pending_timeout, max_retries,
                            options.restart_limit, workers_per_job)
        _check_policy(policy, worker_time_limit)
        self._policy, self._time_limit, self._output = policy, worker_time_limit, None
        pmi = pmi_option(pmi_mode, flux_executor_pmi_mode) or "pmix"

        def scheduler() -> PilotScheduler:
            self._output = _private_directory(options.cache_directory or "executorlib_cache")
            spawner = PilotSpawner(PilotSettings(self._output, worker_time_limit, pmi, workers_per_job))
            return PilotScheduler(
                spawner, options.resources, policy, options.init_function, _cache(options.cache_directory)
            )

        self._setup(options, scheduler)

    def _backend_info(self) -> dict[str, Any]:
        policy = self._policy
        return {"queue": "Slurm (pilot pool)", "min_workers": policy.min_workers,
                "idle_timeout": policy.idle_timeout, "pending_timeout": policy.pending_timeout,
                "worker_time_limit": self._time_limit, "max_retries": policy.max_retries,
                "workers_per_job": policy.workers_per_job, "restart_limit": policy.restart_limit}

    @property
    def max_workers(self) -> int:
        """The most workers at once; set it to resize the pool while it runs."""
        return self._scheduler._max_workers if self._scheduler else self._options.max_workers

    @max_workers.setter
    def max_workers(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < max(1, self._policy.min_workers):
            raise ValueError(
                f"max_workers must be an int >= max(1, min_workers={self._policy.min_workers}), got {value!r}"
            )
        _check_multiple("max_workers", value, self._policy.workers_per_job)
        if self._scheduler is not None:  # None in graph mode: nothing runs
            self._scheduler.resize(value)

    def worker_jobs(self) -> list[dict[str, Any]]:
        """The pool's worker jobs now: job id, node, state, calls done, idle for, time left."""
        return self._scheduler.jobs()

    def _resources_for(self, resource_dict: dict | None) -> Resources:
        """Calls run on the pool's workers: only ``run_time_max`` may differ per call."""
        default = self._options.resources
        if not resource_dict:
            return default
        resources = Resources.from_dict(resource_dict, base=default)
        if Resources.from_dict({"run_time_max": resources.run_time_max}, base=default) != resources:
            raise ValueError(
                "a pilot pool runs every call on the same worker jobs, so a per-call resource_dict "
                "may only set run_time_max; pass the other keys to SlurmClusterExecutor(resource_dict=...)"
            )
        needed = (resources.run_time_max or 0) + self._policy.end_margin
        if self._time_limit is not None and resources.run_time_max and needed > self._time_limit:
            raise ValueError(
                f"run_time_max={resources.run_time_max} s plus the {self._policy.end_margin:g} s margin "
                f"exceeds worker_time_limit={self._time_limit} s, so no worker job could run this call "
                "to its end; raise worker_time_limit or lower run_time_max"
            )
        return resources

    def __exit__(self, *exc_info: object) -> bool:
        """Leaving ``with`` waits for the calls and ends every worker job (a pool cannot
        be re-attached to from another process, unlike one job per call)."""
        self.shutdown(wait=True)
        return False

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait, cancel_futures=cancel_futures)
        if wait and self._output is not None:
            shutil.rmtree(self._output, ignore_errors=True)


def _check_policy(policy: PoolPolicy, time_limit: int | None) -> None:
    per_job = policy.workers_per_job
    if isinstance(per_job, bool) or not isinstance(per_job, int) or per_job < 1:
        raise ValueError(f"workers_per_job must be an int >= 1, got {per_job!r}")
    for name in ("min_workers", "max_workers"):
        _check_multiple(name, getattr(policy, name), per_job)
    for name in ("min_workers", "max_retries"):
        value = getattr(policy, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if policy.min_workers > policy.max_workers:
        raise ValueError(f"min_workers={policy.min_workers} exceeds max_workers={policy.max_workers}")
    for name in ("idle_timeout", "pending_timeout"):
        value = getattr(policy, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or value <= 0):
            raise ValueError(f"{name} must be a number of seconds > 0, or None; got {value!r}")
    if time_limit is not None and (isinstance(time_limit, bool) or not isinstance(time_limit, int)
                                   or time_limit <= policy.end_margin):
        raise ValueError(
            f"worker_time_limit must be an int of seconds > {policy.end_margin:g} (the margin "
            f"before a job's end in which a worker takes no new call), got {time_limit!r}"
        )


def _check_multiple(name: str, value: int, per_job: int) -> None:
    if value % per_job:
        raise ValueError(
            f"{name}={value} is not a multiple of workers_per_job={per_job}: each worker job hosts "
            f"{per_job} workers, so the pool grows and shrinks by {per_job}; use "
            f"{value - value % per_job or per_job} or {value - value % per_job + per_job}"
        )


def _private_directory(parent: str) -> str:
    """A new 0700 directory for the pool's job output, under ``parent/pilot``."""
    base = files.private_directory(os.path.join(parent, "pilot"))  # refuses one others can write
    return tempfile.mkdtemp(prefix="pool-", dir=base)


def _cache(cache_directory: str | None) -> Any:
    if cache_directory is None:
        return None
    from executorlib.cache import FileCache

    return FileCache(cache_directory)
