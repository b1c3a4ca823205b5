"""Submission mode: one queue job per call, that survives the Python process.

The executors here are thin: each picks a queue (executorlib.queue: Slurm, Flux, pysqa,
local processes) and hands every call to a ``Submitter`` (executorlib.submitter), whose
one watcher thread writes the task file and job script, submits, and resolves futures
from result files and queue states. Where a call's files live: executorlib.taskfiles;
the files of a finished call are found again by a later run of the same script, which
re-attaches to results and jobs instead of submitting again.
"""

from __future__ import annotations

import os
from typing import Any

from executorlib.executor import BaseExecutor
from executorlib.options import parse_options, pmi_option, shared_options
from executorlib.queue import FluxQueue, LocalQueue, PysqaQueue, SlurmQueue
from executorlib.resources import Resources
from executorlib.submitter import Queue, Submitter

# ---------------------------------------------------------------- executors
_CLUSTER_OPTIONS = (
    "max_workers", "cache_directory", "resource_dict", "init_function", "disable_dependencies",
    "plot_dependency_graph", "plot_dependency_graph_filename", "export_workflow_filename",
    "log_obj_size",
)


@shared_options(_CLUSTER_OPTIONS)
class _ClusterExecutor(BaseExecutor):
    """One queue job per call (see the module docstring).

    max_workers: how many jobs this executor keeps in the queue at once (the rest wait
        in order; default: no cap). cache_directory: where results, task files, job
        scripts and job output go (default ``./executorlib_cache``); a later run of the
        same script finds its results and jobs there. resource_dict: default resources
        of every call (``submission_template`` is a Jinja2 job script). pysqa_config_directory:
        submit through a pysqa configuration instead. pmi_mode (alias
        flux_executor_pmi_mode): ``srun --mpi=`` of calls with ``cores > 1`` (default
        pmix). block_allocation: True makes a pool of long-lived worker jobs instead
        (``SlurmClusterExecutor`` only; see executorlib.pilot.executor.SlurmPilotExecutor).
        wait: whether leaving a ``with`` block waits for the jobs (default True); with
        ``wait=False`` it neither waits nor cancels: queued jobs keep running and a later
        run of the script re-attaches to them. refresh_rate: accepted for
        compatibility; job states are polled with back-off.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        cache_directory: str | None = "executorlib_cache",
        pysqa_config_directory: str | None = None,
        pmi_mode: str | None = None,
        flux_executor_pmi_mode: str | None = None,
        block_allocation: bool = False,
        wait: bool = True,
        **options: Any,
    ) -> None:
        if block_allocation:
            raise NotImplementedError(
                f"{type(self).__name__}(block_allocation=True) would keep long-lived worker jobs "
                "in the queue (pilot pools), which executorlib does not offer yet; use "
                "block_allocation=False for one queue job per call, or run a "
                "SlurmJobExecutor/FluxJobExecutor(block_allocation=True) inside an allocation"
            )
        directory = os.fspath(cache_directory if cache_directory is not None else "executorlib_cache")
        options = parse_options(
            type(self).__name__, {**options, "max_workers": max_workers, "cache_directory": directory},
            accepted=_CLUSTER_OPTIONS,
        )
        pmi = pmi_option(pmi_mode, flux_executor_pmi_mode) or "pmix"
        queue = PysqaQueue(pysqa_config_directory) if pysqa_config_directory else self._queue(pmi)
        self._queue_name, self._wait_on_exit = queue.name, wait
        self._setup(options, lambda: Submitter(queue, options.cache_directory, max_workers))

    def __exit__(self, *exc_info: object) -> bool:
        self.shutdown(wait=self._wait_on_exit)
        return False

    def _queue(self, pmi_mode: str) -> Queue:
        raise NotImplementedError

    def _check_fits(self, resources: Resources) -> None:
        """The queue decides what fits; its refusal fails the call's future."""

    def _backend_info(self) -> dict[str, Any]:
        return {"queue": self._queue_name}


class SlurmClusterExecutor(_ClusterExecutor):
    __doc__ = "Each call is one Slurm job (``sbatch``).\n\n    " + (_ClusterExecutor.__doc__ or "")
    backend = "slurm_submission"

    def __new__(cls, *args: Any, block_allocation: bool = False, **options: Any) -> SlurmClusterExecutor:
        """``block_allocation=True``: a pool of long-lived worker jobs (executorlib.pilot)."""
        if block_allocation and options.get("ssh") is not None:  # the agent makes the pool
            return super().__new__(cls, *args, block_allocation=True, **options)
        if block_allocation and cls is SlurmClusterExecutor:
            from executorlib.pilot.executor import SlurmPilotExecutor

            cls = SlurmPilotExecutor
        return super().__new__(cls, *args, **options)

    def _queue(self, pmi_mode: str) -> Queue:
        return SlurmQueue(pmi_mode)


class FluxClusterExecutor(_ClusterExecutor):
    __doc__ = "Each call is one Flux job (``flux batch``).\n\n    " + (_ClusterExecutor.__doc__ or "")
    backend = "flux_submission"

    def _queue(self, pmi_mode: str) -> Queue:
        return FluxQueue()


class LocalClusterExecutor(_ClusterExecutor):
    __doc__ = (
        "Each call is a local process running the same job script and files, for machines "
        "without a queue.\n\n    " + (_ClusterExecutor.__doc__ or "")
    )
    backend = "local_submission"

    def _queue(self, pmi_mode: str) -> Queue:
        return LocalQueue()
