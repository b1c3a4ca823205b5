"""executorlib: a ``concurrent.futures.Executor`` for HPC allocations.

>>> from executorlib import Executor
>>> with Executor() as exe:
...     exe.submit(sum, [1, 1]).result()
2

Names are imported on first use, so a worker process that imports
``executorlib.backend.*`` pays for nothing it does not run.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_NAMES = {
    "Executor": "executorlib.executor",
    "BaseExecutor": "executorlib.executor",
    "SingleNodeExecutor": "executorlib.executor",
    "SlurmJobExecutor": "executorlib.slurm",
    "SlurmClusterExecutor": "executorlib.submission",
    "FluxJobExecutor": "executorlib.flux",
    "FluxClusterExecutor": "executorlib.submission",
    "LocalClusterExecutor": "executorlib.submission",
    "TestClusterExecutor": "executorlib.submission",  # its 1.x name: LocalClusterExecutor
    "split_future": "executorlib.futures_api",
    "get_item_from_future": "executorlib.futures_api",
    "get_cache_data": "executorlib.cache",
    "get_future_from_cache": "executorlib.cache",
    "terminate_tasks_in_cache": "executorlib.inventory",
    "terminate_task_in_cache": "executorlib.inventory",
    "WorkerDiedError": "executorlib.errors",
    "RemoteTraceback": "executorlib.errors",
}
_ALIASES = {"TestClusterExecutor": "LocalClusterExecutor"}
__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module 'executorlib' has no attribute {name!r}")
    value = getattr(importlib.import_module(_NAMES[name]), _ALIASES.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_NAMES])
