"""What a call asks for (``resource_dict``), parsed and checked once, then frozen.

``Resources.from_dict`` is the only place that knows the valid keys and their types;
everything past it trusts the frozen record. The caller's dict is never mutated.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from numbers import Real
from typing import Any

from executorlib.container import Container


@dataclass(frozen=True, slots=True)
class Resources:
    """Resources of one call. Keys not meaningful to a backend are accepted and ignored.

    cores: MPI ranks (``cores > 1`` runs the function on every rank under MPI).
    threads_per_core: threads per rank (``OMP_NUM_THREADS`` & co, ``--cpus-per-task``).
    gpus_per_core: GPUs per rank (Slurm ``--gpus-per-task``, Flux ``gpus_per_task``).
    cwd: working directory of the worker, created if missing.
    openmpi_oversubscribe: allow more ranks than cores (``--oversubscribe``).
    slurm_cmd_args: extra ``srun``/``sbatch`` arguments, appended.
    num_nodes: nodes to spread the ranks over. exclusive: whole nodes only.
    env: extra environment variables for the worker.
    run_time_max: wall-time limit in seconds. memory_max: memory limit in GB.
    cache_key: file name of the cached result instead of the hash of the call.
    submission_template: Jinja2 job-script template (submission mode).
    partition: queue/partition (submission mode). error_log_file: file for stderr.
    priority: Flux urgency.
    container: run the worker in a container, e.g. ``{"runtime": "apptainer", "image":
        "/path/to/image.sif", "binds": {"/data": "/data:ro"}}`` (see executorlib.container).
    """

    cores: int = 1
    threads_per_core: int = 1
    gpus_per_core: float = 0
    cwd: str | None = None
    openmpi_oversubscribe: bool = False
    slurm_cmd_args: tuple[str, ...] = ()
    num_nodes: int | None = None
    exclusive: bool = False
    env: Mapping[str, str] = field(default_factory=dict, hash=False)
    run_time_max: int | None = None
    memory_max: float | None = None
    cache_key: str | None = None
    submission_template: str | None = None
    partition: str | None = None
    error_log_file: str | None = None
    priority: int | None = None
    container: Container | None = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None, base: Resources | None = None) -> Resources:
        """Validate ``values`` and lay them over ``base`` (or the defaults)."""
        base = base or cls()
        if not values:
            return base
        if not isinstance(values, Mapping):
            raise TypeError(f"resource_dict must be a dict, not {type(values).__name__}")
        unknown = sorted(set(values) - set(VALID_KEYS))
        if unknown:
            raise ValueError(
                f"unknown resource_dict key(s) {', '.join(map(repr, unknown))}; "
                f"valid keys are: {', '.join(VALID_KEYS)}"
            )
        return replace(base, **{key: _CHECKS[key](key, value) for key, value in values.items()})

    @property
    def slots(self) -> int:
        """Cores this call occupies: ranks times threads per rank."""
        return self.cores * self.threads_per_core

    def as_dict(self) -> dict[str, Any]:
        """Plain dict of every field (for cache files and templates)."""
        values = asdict(self)
        values["env"] = dict(self.env)
        values["slurm_cmd_args"] = list(self.slurm_cmd_args)
        return values


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"resource_dict[{key!r}] must be a positive int, got {value!r}")
    return value


def _optional_positive_int(key: str, value: Any) -> int | None:
    return None if value is None else _positive_int(key, value)


def _non_negative(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or value < 0:
        raise ValueError(f"resource_dict[{key!r}] must be a number >= 0, got {value!r}")
    return value


def _optional_positive_number(key: str, value: Any) -> float | None:
    if value is not None and (_non_negative(key, value) == 0):
        raise ValueError(f"resource_dict[{key!r}] must be > 0, got {value!r}")
    return value


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"resource_dict[{key!r}] must be True or False, got {value!r}")
    return value


def _optional_str(key: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if not isinstance(value, str):
        raise ValueError(f"resource_dict[{key!r}] must be a string, got {value!r}")
    return value


def _str_list(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not all(isinstance(item, str) for item in value):
        raise ValueError(
            f"resource_dict[{key!r}] must be a list of strings, e.g. ['--mem=4G'], got {value!r}"
        )
    return tuple(value)


def _environment(key: str, value: Any) -> Mapping[str, str]:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError(f"resource_dict[{key!r}] must map str to str, got {value!r}")
    return dict(value)


def _optional_int(key: str, value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"resource_dict[{key!r}] must be an int, got {value!r}")
    return value


def _container(key: str, value: Any) -> Container | None:
    return None if value is None else Container.from_dict(value)


_CHECKS = {
    "cores": _positive_int,
    "threads_per_core": _positive_int,
    "gpus_per_core": _non_negative,
    "cwd": _optional_str,
    "openmpi_oversubscribe": _flag,
    "slurm_cmd_args": _str_list,
    "num_nodes": _optional_positive_int,
    "exclusive": _flag,
    "env": _environment,
    "run_time_max": _optional_positive_int,
    "memory_max": _optional_positive_number,
    "cache_key": _optional_str,
    "submission_template": _optional_str,
    "partition": _optional_str,
    "error_log_file": _optional_str,
    "priority": _optional_int,
    "container": _container,
}
VALID_KEYS: tuple[str, ...] = tuple(f.name for f in fields(Resources))
assert set(VALID_KEYS) == set(_CHECKS)
