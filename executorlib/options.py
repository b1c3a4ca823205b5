"""Executor options: declared, documented and parsed in one place.

Every executor class takes its own options as named parameters and the options it
shares with the other backends through ``**options``; :func:`parse_options` turns
those into one frozen :class:`Options`, by keyword. :func:`shared_options` writes the
shared options into a class's ``__doc__`` and ``__init__`` signature, so
``help(SlurmJobExecutor)`` and an IDE show them without a second copy in the source.

A script written for one backend must run on another with only ``backend=`` changed.
So a keyword that another backend understands is never a ``TypeError`` here: it is
ignored with one warning saying why (:data:`IGNORED_BECAUSE`), or refused with an
error where ignoring it would change what the script computes.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from executorlib.resources import Resources

_DOCS = {
    "max_workers": "block allocation: number of workers; otherwise a cap on calls running at once.",
    "max_cores": "cores the executor may use at once (default: this machine's / the allocation's).",
    "cache_directory": "store each result in an HDF5 file there and reuse it on the next run.",
    "resource_dict": "default resources of every call (see ``executorlib.resources.Resources``).",
    "block_allocation": "keep ``max_workers`` long-lived workers instead of one process per call.",
    "init_function": "block allocation only: runs once per worker; the dict it returns fills "
    "keyword arguments of later calls that declare them.",
    "disable_dependencies": "do not resolve futures in arguments (a future is then an error).",
    "hostname_localhost": "workers connect to 127.0.0.1 instead of this host's name.",
    "plot_dependency_graph": "run nothing; draw the graph of submitted calls at shutdown "
    "(futures resolve to None).",
    "plot_dependency_graph_filename": "where to draw that graph (PNG, SVG, PDF); setting it "
    "alone switches the graph mode on.",
    "export_workflow_filename": "run nothing; at shutdown write the submitted calls as a Python "
    "Workflow Definition JSON file (futures resolve to None).",
    "log_obj_size": "log the pickled size of every call and result (logger ``executorlib``, "
    "level INFO).",
    "restart_limit": "block allocation: how many times dead workers are replaced before the "
    "pool gives up and fails its calls (default None: keep replacing).",
    "refresh_rate": "accepted for compatibility; nothing here polls on a timer.",
}

# Options of other backends that this one has no use for, and why ignoring them is safe.
IGNORED_BECAUSE = {
    "pmi_mode": "it chooses the PMI of srun (--mpi) or Flux; local MPI calls start with mpiexec, "
    "which needs none",
    "flux_executor": "only backend='flux_allocation' submits workers through a FluxExecutor",
    "flux_executor_nesting": "only backend='flux_allocation' starts workers in nested Flux instances",
    "flux_log_files": "only backend='flux_allocation' writes Flux job log files",
    "pysqa_config_directory": "only the submission backends submit jobs through pysqa",
    "max_cores": "each call is its own queue job and the queue decides how many run at once "
    "(max_workers caps the jobs this executor keeps in the queue)",
    "hostname_localhost": "queue jobs return their results through files; no worker connects back",
    "restart_limit": "each call is its own queue job; there is no long-lived worker to replace",
}
IGNORED_BECAUSE["flux_executor_pmi_mode"] = IGNORED_BECAUSE["pmi_mode"]
_WARNED: set[tuple[str, str]] = set()


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
    export_workflow_filename: str | None = None
    log_obj_size: bool = False
    restart_limit: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_workers", "max_cores"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        limit = self.restart_limit
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ValueError(f"restart_limit must be an int >= 0 or None, got {limit!r}")
        if self.init_function is not None and not self.block_allocation:
            raise ValueError(
                "init_function runs once per long-lived worker, so it needs block_allocation=True"
            )
        if self.init_function is not None and not callable(self.init_function):
            raise TypeError(f"init_function must be callable, got {self.init_function!r}")

    @property
    def graph_only(self) -> bool:
        """True when the executor records the graph of calls instead of running them."""
        return bool(
            self.plot_dependency_graph or self.plot_dependency_graph_filename
            or self.export_workflow_filename
        )


def _keyword(name: str) -> str:
    return "resource_dict" if name == "resources" else name


SHARED: tuple[str, ...] = tuple(_keyword(f.name) for f in fields(Options))
_DEFAULTS = {_keyword(f.name): None if f.name == "resources" else f.default for f in fields(Options)}
_TYPES = {_keyword(f.name): "dict | None" if f.name == "resources" else f.type for f in fields(Options)}


def parse_options(
    owner: str, keywords: Mapping[str, Any], accepted: Iterable[str] = SHARED,
    defaults: Mapping[str, Any] | None = None,
) -> Options:
    """``Options`` from the ``**options`` an executor of class ``owner`` was given.

    ``accepted``: the shared options this class uses; the others, and the options of
    other backends, are ignored with a warning (see :data:`IGNORED_BECAUSE`). A keyword
    no backend knows is a ``TypeError`` that lists the valid ones.
    """
    accepted = set(accepted)
    given = {**(defaults or {}), **keywords}
    given.pop("backend", None)  # checked by Executor.__new__
    given.pop("refresh_rate", None)  # nothing polls on a timer
    for name in [key for key in given if key not in accepted]:
        value = given.pop(name)
        if name not in IGNORED_BECAUSE:
            raise TypeError(
                f"{owner}() got an unexpected keyword argument {name!r}; its options are: "
                f"{', '.join(sorted(accepted | {'refresh_rate'}))}"
            )
        if value is not None and value is not False and (owner, name) not in _WARNED:
            _WARNED.add((owner, name))  # once per process: a script may open many executors
            warn_ignored(owner, f"{name}={value!r}", IGNORED_BECAUSE[name])
    resources = Resources.from_dict(given.pop("resource_dict", None))
    return Options(resources=resources, **given)


def warn_ignored(owner: str, what: str, reason: str) -> None:
    """One warning for a setting that ``owner`` accepts for compatibility and ignores."""
    warnings.warn(f"{owner}: {what} is ignored: {reason}", UserWarning, stacklevel=4)


def pmi_option(pmi_mode: str | None, flux_executor_pmi_mode: str | None) -> str | None:
    """``pmi_mode`` and its older name ``flux_executor_pmi_mode`` as one value."""
    if pmi_mode is not None and flux_executor_pmi_mode is not None and pmi_mode != flux_executor_pmi_mode:
        raise ValueError(
            f"pmi_mode={pmi_mode!r} and flux_executor_pmi_mode={flux_executor_pmi_mode!r} disagree; "
            "they are the same option, give only pmi_mode"
        )
    value = pmi_mode if pmi_mode is not None else flux_executor_pmi_mode
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(
            f"pmi_mode must be the name of a Flux PMI or of an srun --mpi plugin, e.g. 'pmix', got {value!r}"
        )
    return value


def shared_options(accepted: Iterable[str] = SHARED) -> Callable[[type], type]:
    """Class decorator: append the shared options to ``__doc__`` and to the signature of
    ``__init__`` (in place of its ``**options``), so ``help()`` and IDEs show them."""
    names = [name for name in accepted if name != "max_workers"]

    def decorate(cls: type) -> type:
        cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n\n    Shared options:\n\n" + "".join(
            f"    {name}: {_DOCS[name]}\n" for name in ["max_workers", *names, "refresh_rate"]
        )
        init = cls.__dict__["__init__"]
        own = [p for p in inspect.signature(init).parameters.values() if p.kind != p.VAR_KEYWORD]
        taken = {p.name for p in own}
        extra = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=_DEFAULTS[name],
                              annotation=_TYPES[name])
            for name in names if name not in taken
        ]
        init.__signature__ = inspect.Signature([*own, *extra])
        return cls

    return decorate
