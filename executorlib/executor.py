"""The executors: one ``concurrent.futures.Executor`` class per backend.

``Executor(backend=...)`` returns an instance of the backend's class, the way
``pathlib.Path`` returns a ``PosixPath``; each class declares only the options it
understands. Options shared by the classes that run workers inside an allocation
(local, Slurm, Flux):

max_workers: block allocation: number of workers; otherwise a cap on concurrent calls.
max_cores: cores the executor may use at once (default: this machine's / the allocation's).
cache_directory: store each result in an HDF5 file there and reuse it on the next run.
resource_dict: default resources of every call (see ``executorlib.resources.Resources``).
block_allocation: keep ``max_workers`` long-lived workers instead of one process per call.
init_function: block allocation only: runs once per worker; the dict it returns fills
    keyword arguments of later calls that declare them.
disable_dependencies: do not resolve futures in arguments (a future is then an error).
hostname_localhost: workers connect to 127.0.0.1 instead of this host's name.
plot_dependency_graph: run nothing; draw the graph of submitted calls at shutdown
    (futures resolve to None). plot_dependency_graph_filename: where to draw it.
refresh_rate: accepted for compatibility; nothing here polls on a timer.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Executor as _StdExecutor
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, ClassVar

from executorlib.dependencies import DependencyGraph, find_futures
from executorlib.resources import Resources
from executorlib.task import Task

BACKENDS: dict[str, str] = {
    "local": "SingleNodeExecutor",
    "slurm_allocation": "SlurmJobExecutor",
    "flux_allocation": "FluxJobExecutor",
    "slurm_submission": "SlurmClusterExecutor",
    "flux_submission": "FluxClusterExecutor",
}


@dataclass(frozen=True)
class Options:
    """The executor-level settings, checked once in ``__init__`` and passed down whole."""

    max_workers: int | None = None
    max_cores: int | None = None
    cache_directory: str | None = None
    resources: Resources = field(default_factory=Resources)
    block_allocation: bool = False
    init_function: Callable[[], dict] | None = None
    disable_dependencies: bool = False
    hostname_localhost: bool | None = None
    plot_dependency_graph: bool = False
    plot_dependency_graph_filename: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_workers", "max_cores"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if self.init_function is not None and not self.block_allocation:
            raise ValueError(
                "init_function runs once per long-lived worker, so it needs block_allocation=True"
            )
        if self.init_function is not None and not callable(self.init_function):
            raise TypeError(f"init_function must be callable, got {self.init_function!r}")


class Executor(_StdExecutor):
    """A ``concurrent.futures.Executor`` for HPC allocations.

    ``Executor(backend="local" | "slurm_allocation" | "flux_allocation" |
    "slurm_submission" | "flux_submission", **options)`` returns the backend's class:
    ``SingleNodeExecutor``, ``SlurmJobExecutor``, ``FluxJobExecutor``,
    ``SlurmClusterExecutor`` or ``FluxClusterExecutor``. ``submit`` takes an extra
    keyword ``resource_dict`` with the resources of that one call.
    """

    backend: ClassVar[str] = ""

    def __new__(cls, *args: Any, backend: str | None = None, **options: Any) -> Executor:
        if cls is Executor:
            cls = backend_class(backend or "local")
        elif backend is not None and backend != cls.backend:
            raise ValueError(
                f"{cls.__name__} is the {cls.backend!r} backend; got backend={backend!r}. "
                f"Use Executor(backend={backend!r}) instead."
            )
        return super().__new__(cls)


def backend_class(backend: str) -> type[Executor]:
    """The class for a backend name, or a ValueError listing the valid names."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    import executorlib

    return getattr(executorlib, BACKENDS[backend])


class WorkerExecutor(Executor):
    """Shared machinery of the executors that run workers: submit, map, shutdown."""

    def _setup(self, options: Options, scheduler: Any) -> None:
        self._options = options
        self._shutdown_lock = threading.Lock()
        self._is_shutdown = False
        self._graph = DependencyGraph() if options.plot_dependency_graph else None
        self._check_fits(options.resources)
        self._scheduler = None if self._graph else scheduler()
        if self._scheduler is not None:
            self._scheduler.start()

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
                spawner, options.resources, self._pool_size(), options.init_function, host, cache
            )
        from executorlib.interactive.per_task import PerTaskScheduler

        spares = getattr(spawner, "spares", False)
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

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, resource_dict: dict | None = None, **kwargs: Any
    ) -> Future:
        """Schedule ``fn(*args, **kwargs)``; ``resource_dict`` overrides the executor's
        resources for this call. Futures anywhere in the arguments are replaced by
        their results before the call runs."""
        with self._shutdown_lock:
            if self._is_shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
        if not callable(fn):
            raise TypeError(f"submit() needs a callable as first argument, got {fn!r}")
        task = Task(fn, args, kwargs, self._resources_for(resource_dict))
        inputs = find_futures((args, kwargs))
        if inputs and self._options.disable_dependencies:
            raise TypeError(
                f"a Future was passed to {task.name} but disable_dependencies=True; pass "
                "future.result() instead, or leave disable_dependencies False"
            )
        if self._graph is not None:
            self._graph.add(task.name, task.future, inputs)
            task.future.set_result(None)
        else:
            self._scheduler.submit(task, inputs)
        return task.future

    def _resources_for(self, resource_dict: dict | None) -> Resources:
        default = self._options.resources
        if not resource_dict:
            return default  # checked once in _setup
        resources = Resources.from_dict(resource_dict, base=default)
        if self._options.block_allocation and resources != default:
            raise ValueError(
                "with block_allocation=True every call runs on the same long-lived workers, "
                "so a per-call resource_dict must match the executor's; pass resource_dict "
                "to the Executor instead, or use block_allocation=False"
            )
        self._check_fits(resources)
        return resources

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

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Finish (or with ``cancel_futures`` cancel) queued calls and stop the workers.
        Safe to call more than once; ``submit`` afterwards raises ``RuntimeError``."""
        with self._shutdown_lock:
            first, self._is_shutdown = not self._is_shutdown, True
        if self._graph is not None:
            if first:
                self._graph.draw(self._options.plot_dependency_graph_filename)
            return
        self._scheduler.shutdown(wait, cancel_futures)

    def __del__(self) -> None:
        scheduler = getattr(self, "_scheduler", None)
        if scheduler is not None and not self._is_shutdown:
            scheduler.shutdown(wait=False, cancel_futures=False)


class SingleNodeExecutor(WorkerExecutor):
    """Runs each call in a local Python process (``mpiexec`` for ``cores > 1``).

    See the module docstring of ``executorlib.executor`` for the options.
    """

    backend = "local"

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        max_cores: int | None = None,
        cache_directory: str | None = None,
        resource_dict: dict | None = None,
        block_allocation: bool = False,
        init_function: Callable[[], dict] | None = None,
        disable_dependencies: bool = False,
        hostname_localhost: bool | None = None,
        plot_dependency_graph: bool = False,
        plot_dependency_graph_filename: str | None = None,
        refresh_rate: float | None = None,
        backend: str | None = None,
    ) -> None:
        from executorlib.interactive.spawner import LocalSpawner

        options = Options(
            max_workers, max_cores, cache_directory, Resources.from_dict(resource_dict),
            block_allocation, init_function, disable_dependencies, hostname_localhost,
            plot_dependency_graph, plot_dependency_graph_filename,
        )
        self._setup(options, lambda: self._scheduler_for(LocalSpawner()))
