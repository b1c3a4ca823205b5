"""What to ask Flux for: pure functions from Resources + options to a Flux job request.

Nothing here imports ``flux``, so all of it is tested without a Flux instance;
``executorlib.flux`` turns a :class:`JobRequest` into a ``flux.job.JobspecV1``.
``jobspec_for`` and ``FluxSettings`` take any command, not only a worker's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from executorlib.interactive import private_env
from executorlib.interactive.spawner import Launch, worker_argv, worker_environment
from executorlib.resources import Resources

_MAX_URGENCY = 31  # Flux urgency: 0 holds a job, 16 is the default, 31 expedites it
# Values of the job shell's ``pmi`` option that flux-core serves by itself (its "simple"
# PMI wire protocol; pmi1 and pmi2 are aliases of it). Anything else needs a shell plugin
# (pmix: flux-pmix; cray-pals: flux-coral2), and the shell ignores names it does not know.
BUILTIN_PMI = frozenset({"simple", "pmi1", "pmi2"})


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
    environment: Mapping[str, str] = field(default_factory=dict, repr=False)
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
    if resources.container is not None:
        raise ValueError(
            "resource_dict['container'] is not supported with Flux: its workers read their keys "
            "from a private file outside any container; run the container around the Flux "
            "instance instead, or use the local, slurm_allocation or pilot-pool backends"
        )
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


def needs_plugin(pmi_mode: str | None) -> bool:
    """Whether ``pmi_mode`` names a PMI that only a job shell plugin can serve."""
    if pmi_mode is None:
        return False
    return not any(name.strip() in BUILTIN_PMI for name in pmi_mode.split(","))


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


def is_parallel(launch: Launch, settings: FluxSettings) -> bool:
    """Whether the worker runs as MPI ranks started by Flux (under nesting it is one
    process that owns the nested instance, and starts its own parallel jobs there)."""
    return launch.resources.cores > 1 and not settings.nesting


def worker_command(launch: Launch, settings: FluxSettings) -> list[str]:
    """The worker's argv. Flux starts the MPI ranks itself (no mpiexec)."""
    module = "interactive_parallel" if is_parallel(launch, settings) else "interactive_serial"
    return worker_argv(module, launch)


def worker_job(launch: Launch, settings: FluxSettings, tag: str) -> JobRequest:
    """The Flux job that starts the worker of ``launch``, with the worker's whole
    environment (secret included: the spawner moves it out, see ``private_env``)."""
    stem = f"executorlib-{tag}-worker{launch.worker_id}"
    return jobspec_for(
        launch.resources, worker_command(launch, settings), settings,
        environment=worker_environment(launch), log_stem=stem,
    )


def with_private_environment(
    request: JobRequest, directory: private_env.PrivateDirectory, worker_id: int
) -> tuple[JobRequest, str]:
    """``request`` with its per-launch variables (the secret, key material) moved into a
    new private file of ``directory``, and only that file's path in its environment:
    the instance owner reads a jobspec's environment (``flux job info --original``)."""
    secret = private_env.per_launch(dict(request.environment), dict(os.environ))
    path = directory.write(worker_id, secret)
    public = {k: v for k, v in request.environment.items() if k not in secret}
    return replace(request, environment={**public, private_env.PATH_ENV: path}), path
