"""The executors: one ``concurrent.futures.Executor`` class per backend.

``Executor(backend=...)`` returns an instance of the backend's class, the way
``pathlib.Path`` returns a ``PosixPath``; each class declares only its own options and
takes the options shared by all backends through ``**options`` (see
``executorlib.options``, where they are documented once)::

    Executor                    dispatch on backend=
      BaseExecutor              submit/map/shutdown, graph mode, len(), info, batched
        AllocationExecutor      runs workers: one per call, or a block-allocation pool
          SingleNodeExecutor    local processes / mpiexec       (here)
          SlurmJobExecutor      srun steps                      (executorlib.slurm)
          FluxJobExecutor       Flux jobs                       (executorlib.flux)
        _ClusterExecutor        one queue job per call          (executorlib.submission)
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor as _StdExecutor
from concurrent.futures import Future
from dataclasses import replace
from typing import Any, ClassVar

from executorlib import call_log, futures_api
from executorlib.dependencies import DependencyGraph, futures_in, notify_cancelled, on_done_of_new
from executorlib.options import Options, parse_options, shared_options, warn_ignored
from executorlib.resources import Resources
from executorlib.task import Task

__all__ = ["BACKENDS", "Executor", "BaseExecutor", "AllocationExecutor", "SingleNodeExecutor", "Options"]

BACKENDS: dict[str, str] = {
    "local": "SingleNodeExecutor",
    "slurm_allocation": "SlurmJobExecutor",
    "flux_allocation": "FluxJobExecutor",
    "slurm_submission": "SlurmClusterExecutor",
    "flux_submission": "FluxClusterExecutor",
    "local_submission": "LocalClusterExecutor",
}

# resource_dict keys a backend cannot honour; a call that sets one is warned once per
# executor (ignoring them changes where or how long a call runs, not what it computes).
_UNUSED_RESOURCES: dict[str, tuple[str, ...]] = {
    "local": ("slurm_cmd_args", "num_nodes", "exclusive", "run_time_max", "memory_max",
              "submission_template", "partition", "priority"),
    "slurm_allocation": ("submission_template", "partition", "priority"),
    "flux_allocation": ("slurm_cmd_args", "openmpi_oversubscribe", "memory_max",
                        "submission_template", "partition"),
}


class Executor(_StdExecutor):
    """A ``concurrent.futures.Executor`` for HPC allocations.

    ``Executor(backend="local" | "slurm_allocation" | "flux_allocation" |
    "slurm_submission" | "flux_submission" | "local_submission", **options)`` returns
    the backend's class: ``SingleNodeExecutor``, ``SlurmJobExecutor``,
    ``FluxJobExecutor``, ``SlurmClusterExecutor``, ``FluxClusterExecutor`` or
    ``LocalClusterExecutor``. ``submit`` takes an extra keyword ``resource_dict`` with
    the resources of that one call. Any backend accepts the options of the others (a
    script runs with only ``backend=`` changed); those it has no use for are ignored
    with a warning that says why.
    """

    backend: ClassVar[str] = ""

    def __new__(cls, *args: Any, backend: str | None = None, **options: Any) -> Executor:
        if cls is Executor:
            cls = backend_class(backend or "local")
            return cls.__new__(cls, *args, **options)  # a backend may choose a subclass
        if backend is not None and backend != cls.backend:
            raise ValueError(
                f"{cls.__name__} is the {cls.backend!r} backend; got backend={backend!r}. "
                f"Use Executor(backend={backend!r}) instead."
            )
        if options.get("ssh") is not None:  # from a laptop: the work runs in an agent there
            from executorlib.remote import remote_executor

            return remote_executor(cls.backend, args, options)
        return super().__new__(cls)


def backend_class(backend: str) -> type[Executor]:
    """The class for a backend name, or a ValueError listing the valid names."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    import executorlib

    return getattr(executorlib, BACKENDS[backend])


class BaseExecutor(Executor):
    """What every backend shares: ``submit``, ``map``, ``shutdown``, the graph mode,
    ``len(exe)`` (calls not finished yet), ``exe.info`` and ``exe.batched``."""

    def _setup(self, options: Options, scheduler: Callable[[], Any]) -> None:
        self._options = options
        self._shutdown_lock = threading.Lock()
        self._is_shutdown = False
        self._calls = _CallCount()
        self._on_done = self._calls.done  # one bound method for every future
        self._default_resources = options.resources
        self._warned: set[str] = set()
        self._graph = DependencyGraph() if options.graph_only else None
        self._workflow = None
        if options.export_workflow_filename is not None:
            from executorlib.workflow import WorkflowRecorder

            self._workflow = WorkflowRecorder()
        self._check_fits(options.resources)
        self._warn_unused(options.resources)
        self._scheduler = None if self._graph else scheduler()
        if self._scheduler is not None:
            self._scheduler.start()

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, resource_dict: dict | None = None, **kwargs: Any
    ) -> Future:
        """Schedule ``fn(*args, **kwargs)``; ``resource_dict`` overrides the executor's
        resources for this call. Futures anywhere in the arguments are replaced by
        their results before the call runs."""
        if self._is_shutdown:  # a bool read is atomic; shutdown() may follow either way
            raise RuntimeError("cannot schedule new futures after shutdown")
        if not callable(fn):
            raise TypeError(f"submit() needs a callable as first argument, got {fn!r}")
        resources = self._resources_for(resource_dict) if resource_dict else self._default_resources
        task = Task(fn, args, kwargs, resources, Future())
        inputs = futures_in(args, kwargs)
        if inputs and self._options.disable_dependencies:
            raise TypeError(
                f"a Future was passed to {task.name} but disable_dependencies=True; pass "
                "future.result() instead, or leave disable_dependencies False"
            )
        self._observe(task)
        if self._graph is not None:
            self._record(task, inputs)
        else:
            self._scheduler.submit(task, inputs)
        return task.future

    def _observe(self, task: Task) -> None:
        """Count the call in ``len(exe)`` (and tell waiters of a cancel: _CallCount.done);
        error log and size logging where asked for."""
        future = task.future
        self._calls.submitted()
        on_done_of_new(future, self._on_done)
        if task.resources.error_log_file:
            call_log.log_errors_to(task.resources.error_log_file, task.name, task.args, task.kwargs, future)
        if self._options.log_obj_size:
            call_log.log_sizes(task.name, task.fn, task.args, task.kwargs, future)

    def _record(self, task: Task, inputs: list[Future]) -> None:
        """Graph mode: note the call and its inputs; run nothing."""
        if self._workflow is not None:
            self._workflow.add(task)
        self._graph.add(task.name, task.future, futures_api.origins(inputs))
        task.future.graph_only = True  # items of it resolve to None as well
        task.future.set_result(None)

    def map(
        self, fn: Callable[..., Any], *iterables: Iterable, timeout: float | None = None,
        chunksize: int = 1, **kwargs: Any,
    ) -> Iterator:
        """As ``concurrent.futures.Executor.map``. An element that is a ``Future``
        becomes a dependency (the call waits for it, ``map`` does not); an iterable that
        is itself a ``Future`` is waited for here (up to ``timeout``) and its items used."""
        iterables = tuple(it.result(timeout) if isinstance(it, Future) else it for it in iterables)
        return super().map(fn, *iterables, timeout=timeout, chunksize=chunksize, **kwargs)

    def batched(self, futures: Sequence[Future], n: int) -> list[Future]:
        """Futures that each resolve to a list of ``n`` results of ``futures``, in the
        order they finish (the last one gets the remainder); usable as call arguments."""
        return futures_api.batched(futures, n)

    def __len__(self) -> int:
        """Calls submitted to this executor that have not finished yet."""
        return self._calls.unfinished

    @property
    def info(self) -> dict[str, Any]:
        """The effective settings of this executor, as a JSON-serialisable dict."""
        options = self._options
        init = options.init_function
        return {
            "backend": self.backend, "class": type(self).__name__,
            "max_workers": options.max_workers, "max_cores": self._effective_max_cores(),
            "cache_directory": options.cache_directory,
            "resource_dict": options.resources.as_dict(),
            "block_allocation": options.block_allocation,
            "init_function": None if init is None else getattr(init, "__qualname__", repr(init)),
            "disable_dependencies": options.disable_dependencies,
            "hostname_localhost": options.hostname_localhost,
            "graph_only": options.graph_only,
            "plot_dependency_graph_filename": options.plot_dependency_graph_filename,
            "export_workflow_filename": options.export_workflow_filename,
            "log_obj_size": options.log_obj_size, **self._backend_info(),
        }

    def _effective_max_cores(self) -> int | None:
        return self._options.max_cores

    def _backend_info(self) -> dict[str, Any]:
        return {}

    def _resources_for(self, resource_dict: dict | None) -> Resources:
        default = self._options.resources
        if not resource_dict:
            return default  # checked once in _setup
        resources = Resources.from_dict(resource_dict, base=default)
        if self._options.block_allocation and replace(resources, cache_key=default.cache_key) != default:
            raise ValueError(
                "with block_allocation=True every call runs on the same long-lived workers, "
                "so a per-call resource_dict must match the executor's; pass resource_dict "
                "to the Executor instead, or use block_allocation=False"
            )
        self._check_fits(resources)
        self._warn_unused(resources)
        return resources

    def _check_fits(self, resources: Resources) -> None:
        """Raise if one call could never run as asked (backends say why)."""

    def _warn_unused(self, resources: Resources) -> None:
        default = Resources()
        for key in _UNUSED_RESOURCES.get(self.backend, ()):
            value = getattr(resources, key)
            if value != getattr(default, key) and key not in self._warned:
                self._warned.add(key)
                warn_ignored(
                    type(self).__name__, f"resource_dict[{key!r}]={value!r}",
                    f"the {self.backend} backend has no way to apply it",
                )

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Finish (or with ``cancel_futures`` cancel) queued calls and stop the workers.
        Safe to call more than once; ``submit`` afterwards raises ``RuntimeError``."""
        with self._shutdown_lock:
            first, self._is_shutdown = not self._is_shutdown, True
        if self._graph is not None:
            if first:
                self._write_graph()
            return
        self._scheduler.shutdown(wait, cancel_futures)

    def _write_graph(self) -> None:
        options = self._options
        if self._workflow is not None:
            self._workflow.write(options.export_workflow_filename)
        if options.plot_dependency_graph or options.plot_dependency_graph_filename:
            self._graph.draw(options.plot_dependency_graph_filename)

    def __del__(self) -> None:
        scheduler = getattr(self, "_scheduler", None)
        if scheduler is not None and not self._is_shutdown:
            scheduler.shutdown(wait=False, cancel_futures=False)


class _CallCount:
    """Calls submitted and calls finished, for ``len(exe)``: two numbers instead of a
    set of futures, so a finished call leaves nothing behind (not even a slot in a
    set's table, which never shrinks). ``done`` is the one done-callback every future
    of the executor gets.

    Each number is an ``itertools.count``, whose ``next()`` is atomic: ``submit`` takes
    no lock (a lock round trip is a noticeable part of its cost). Reading takes one
    value of each, which advances both by one and so keeps their difference."""

    __slots__ = ("_lock", "submitted", "_finished")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._finished = itertools.count()
        self.submitted = functools.partial(next, itertools.count())  # no Python frame per call

    def done(self, future: Future) -> None:
        """A call ended; if it was cancelled, ``wait()``/``as_completed()`` learn of it
        now, not only when a scheduler would have started it."""
        next(self._finished)
        notify_cancelled(future)

    @property
    def unfinished(self) -> int:
        with self._lock:  # so that two readers take their pairs one after the other
            finished = next(self._finished)  # first: a call counts as submitted before it can finish
            return self.submitted() - finished


class AllocationExecutor(BaseExecutor):
    """The executors that run workers: one per call within ``max_cores``, or a pool."""

    def _scheduler_for(self, spawner: Any, host: str | None = None) -> Any:
        """The block-allocation or one-worker-per-call scheduler for ``spawner``."""
        options = self._options
        cache = None
        if options.cache_directory is not None:
            from executorlib.cache import FileCache

            cache = FileCache(options.cache_directory)
        if options.block_allocation:
            from executorlib.interactive.pool import PoolScheduler

            return PoolScheduler(
                spawner, options.resources, self._pool_size(), options.init_function, host, cache,
                restart_limit=options.restart_limit,
            )
        from executorlib.interactive.per_task import PerTaskScheduler

        spares = spawner.spares and not options.resources.gpus_per_core  # a spare would hold GPUs
        return PerTaskScheduler(spawner, options.resources, self._max_cores(), host, cache, spares)

    @property
    def max_workers(self) -> int | None:
        """Block allocation: the number of workers, settable while the executor runs
        (more starts workers; fewer stops idle ones first, no call is lost or run
        twice). Otherwise the ``max_workers`` given."""
        resize = getattr(self._scheduler, "resize", None)
        return self._scheduler.size if resize is not None else self._options.max_workers

    @max_workers.setter
    def max_workers(self, value: int) -> None:
        if not self._options.block_allocation or self._scheduler is None:
            raise ValueError("max_workers can change while running only with block_allocation=True")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"max_workers must be a positive int, got {value!r}")
        limit = self._options.max_cores
        if limit is not None and value * self._options.resources.slots > limit:
            raise ValueError(f"max_workers={value} workers exceed max_cores={limit}; raise max_cores")
        self._scheduler.resize(value)

    def _check_fits(self, resources: Resources) -> None:
        """Raise if one call could never get its cores (backends refine the message)."""
        limit = self._max_cores()
        if resources.slots > limit:
            raise ValueError(
                f"a call asks for {resources.slots} cores (cores={resources.cores} x "
                f"threads_per_core={resources.threads_per_core}) but max_cores is {limit}; "
                "raise max_cores or ask for fewer cores"
            )

    def _max_cores(self) -> int:
        options = self._options
        if options.max_cores is not None:
            return options.max_cores
        if options.max_workers is not None:
            return options.max_workers * options.resources.slots
        return self._available_cores()

    def _effective_max_cores(self) -> int | None:
        return self._max_cores()

    def _available_cores(self) -> int:
        return len(os.sched_getaffinity(0))

    def _pool_size(self) -> int:
        """Number of block-allocation workers: max_workers, else what max_cores holds."""
        options = self._options
        per_worker = options.resources.slots
        size = options.max_workers or max(1, self._max_cores() // per_worker)
        if size * per_worker > self._max_cores():
            raise ValueError(
                f"max_workers={size} workers x {per_worker} cores each exceed max_cores="
                f"{self._max_cores()}; lower max_workers or raise max_cores"
            )
        return size


@shared_options()
class SingleNodeExecutor(AllocationExecutor):
    """Runs each call in a local Python process (``mpiexec`` for ``cores > 1``).

    ``resource_dict={"gpus_per_core": g}`` gives each call its own GPUs of this machine
    through ``CUDA_VISIBLE_DEVICES``; asking for more than the machine has is an error.
    """

    backend = "local"

    def __init__(self, max_workers: int | None = None, **options: Any) -> None:
        parsed = parse_options(type(self).__name__, {**options, "max_workers": max_workers})
        zygote = _early_zygote(parsed)  # boots while we import the rest
        try:
            from executorlib.gpus import GpuLocalSpawner

            self._setup(parsed, lambda: self._scheduler_for(GpuLocalSpawner(zygote)))
        except BaseException:
            if zygote is not None:
                zygote.close()
            raise

    def _check_fits(self, resources: Resources) -> None:
        super()._check_fits(resources)
        if resources.gpus_per_core:
            from executorlib.gpus import check_local_gpus

            pool = self._options.block_allocation and resources is self._options.resources
            check_local_gpus(resources, self._pool_size() if pool else 1)


def _early_zygote(options: Options) -> Any:
    """The zygote of a local executor whose calls run on fresh serial workers, started
    before anything else (executorlib/interactive/zygote.py); None for other executors."""
    resources = options.resources
    if options.block_allocation or options.graph_only or resources.cores != 1 or resources.gpus_per_core:
        return None
    from executorlib.interactive.zygote import Zygote
    from executorlib.processes import child_environment

    return Zygote(child_environment(resources))
