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

from executorlib.executor import Options, WorkerExecutor
from executorlib.queue import FluxQueue, LocalQueue, PysqaQueue, SlurmQueue
from executorlib.resources import Resources
from executorlib.submitter import Queue, Submitter


# ---------------------------------------------------------------- executors
class _ClusterExecutor(WorkerExecutor):
    """One queue job per call (see the module docstring).

    max_workers: how many jobs this executor keeps in the queue at once (the rest wait
        in order; default: no cap). cache_directory: where results, task files, job
        scripts and job output go (default ``./executorlib_cache``); a later run of the
        same script finds its results and jobs there. resource_dict: default resources
        of every call (``submission_template`` is a Jinja2 job script). pysqa_config_directory:
        submit through a pysqa configuration instead. disable_dependencies,
        plot_dependency_graph(_filename): as for the other executors. refresh_rate:
        accepted for compatibility; job states are polled with back-off.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        cache_directory: str = "executorlib_cache",
        resource_dict: dict | None = None,
        pysqa_config_directory: str | None = None,
        disable_dependencies: bool = False,
        plot_dependency_graph: bool = False,
        plot_dependency_graph_filename: str | None = None,
        refresh_rate: float | None = None,
        pmi_mode: str = "pmix",
        backend: str | None = None,
    ) -> None:
        options = Options(
            max_workers=max_workers, cache_directory=os.fspath(cache_directory),
            resources=Resources.from_dict(resource_dict), disable_dependencies=disable_dependencies,
            plot_dependency_graph=plot_dependency_graph,
            plot_dependency_graph_filename=plot_dependency_graph_filename,
        )
        queue = PysqaQueue(pysqa_config_directory) if pysqa_config_directory else self._queue(pmi_mode)
        self._setup(options, lambda: Submitter(queue, options.cache_directory, max_workers))

    def _queue(self, pmi_mode: str) -> Queue:
        raise NotImplementedError

    def _check_fits(self, resources: Resources) -> None:
        """The queue decides what fits; its refusal fails the call's future."""


class SlurmClusterExecutor(_ClusterExecutor):
    __doc__ = "Each call is one Slurm job (``sbatch``).\n\n    " + (_ClusterExecutor.__doc__ or "")
    backend = "slurm_submission"

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
