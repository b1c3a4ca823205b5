"""Slurm allocation mode: every worker is an ``srun`` step of the current allocation.

Inside ``salloc`` or an ``sbatch`` script (``SLURM_JOB_ID`` set), ``SlurmJobExecutor``
starts each worker as ``srun --exact ... python -m executorlib.backend.<worker>``: one
step per worker, steps side by side on the allocation's CPUs without blocking each
other. ``srun`` itself is the worker process the manager watches, so a step that ends
(a killed rank, ``scancel``, a time limit) is seen at once through srun's pidfd, and
srun's last words ("STEP 12.3 ... CANCELLED ... DUE TO TIME LIMIT") explain why::

    SlurmJobExecutor ── PerTaskScheduler / PoolScheduler (executorlib.interactive)
        └─ SrunSpawner.start(launch)
             srun_command(resources, settings) + worker_argv  ->  SrunProcess
                 how_it_ended(): step id, Slurm state, allocation out of time?

``srun_command`` is a pure function of the resources and the executor's settings.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from functools import cache
from typing import Any

from executorlib.executor import AllocationExecutor
from executorlib.interactive.spawner import Launch, WorkerProcess, worker_argv, worker_environment
from executorlib.options import Options, parse_options, pmi_option, shared_options
from executorlib.resources import Resources

# srun reads these from its environment as if they were options. salloc/sbatch (or the
# step a nested executor runs in) export them for the whole job; each worker's step is
# shaped by its resource_dict alone, so they are not passed on to srun.
_STEP_SHAPING_VARIABLES = (
    "SLURM_NNODES", "SLURM_JOB_NUM_NODES", "SLURM_NPROCS", "SLURM_NTASKS",
    "SLURM_NTASKS_PER_NODE", "SLURM_NTASKS_PER_CORE", "SLURM_NTASKS_PER_SOCKET",
    "SLURM_NTASKS_PER_GPU", "SLURM_CPUS_PER_TASK", "SRUN_CPUS_PER_TASK", "SLURM_CPUS_PER_GPU",
    "SLURM_GPUS", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK", "SLURM_TRES_PER_TASK",
    "SLURM_GRES", "SLURM_STEP_GRES", "SLURM_MEM_PER_CPU", "SLURM_MEM_PER_GPU",
    "SLURM_MEM_PER_NODE", "SLURM_DISTRIBUTION", "SLURM_DIST_PLANESIZE", "SLURM_CPU_BIND",
    "SLURM_OVERCOMMIT", "SLURM_OVERLAP", "SLURM_EXCLUSIVE", "SLURM_EXACT", "SLURM_TIMELIMIT",
    "SLURM_SPREAD_JOB", "SLURM_USE_MIN_NODES",
)
_QUERY_TIMEOUT_S = 10


# ------------------------------------------------------------------ the allocation
@dataclass(frozen=True)
class Allocation:
    """The Slurm job this process runs in: its id and how many CPUs it holds."""

    job_id: str
    cpus: int

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Allocation:
        """Read ``SLURM_JOB_ID`` and the job's CPUs; a RuntimeError outside a job."""
        job_id = environ.get("SLURM_JOB_ID")
        if not job_id:
            raise RuntimeError(
                "backend='slurm_allocation' runs workers as srun steps inside a Slurm "
                "allocation, but this process is not in one (SLURM_JOB_ID is not set). Start "
                "Python inside `salloc` or an `sbatch` script, or use "
                "backend='slurm_submission' to submit one Slurm job per call from here."
            )
        return cls(job_id, allocation_cpus(environ))


def allocation_cpus(environ: Mapping[str, str]) -> int:
    """CPUs of the job: ``SLURM_JOB_CPUS_PER_NODE`` (e.g. ``"8(x2),4"`` = 20), else
    ``SLURM_NTASKS`` x ``SLURM_CPUS_PER_TASK``, else ``SLURM_CPUS_ON_NODE``.

    The job's CPUs come first because a nested executor runs inside a step, where
    ``SLURM_NTASKS`` describes that one step, not the allocation its steps share.
    """
    per_node = environ.get("SLURM_JOB_CPUS_PER_NODE")
    if per_node:
        return parse_cpus_per_node(per_node)
    if environ.get("SLURM_NTASKS"):
        return int(environ["SLURM_NTASKS"]) * int(environ.get("SLURM_CPUS_PER_TASK") or 1)
    if environ.get("SLURM_CPUS_ON_NODE"):
        return int(environ["SLURM_CPUS_ON_NODE"])
    return len(os.sched_getaffinity(0))


def parse_cpus_per_node(text: str) -> int:
    """Slurm's compressed list ``"8(x2),4"`` -> 8 + 8 + 4."""
    total = 0
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if match is None:
            raise ValueError(f"cannot read SLURM_JOB_CPUS_PER_NODE={text!r}: {part!r} is not 'N' or 'N(xM)'")
        total += int(match[1]) * int(match[2] or 1)
    return total


# ------------------------------------------------------------- the srun command
@dataclass(frozen=True)
class SrunSettings:
    """Executor-level settings of every srun step."""

    job_id: str
    pmi_mode: str | None = None  # srun --mpi=...; None: the cluster's MpiDefault
    srun: str = "srun"


def srun_command(resources: Resources, settings: SrunSettings) -> list[str]:
    """The ``srun`` options that start one worker step for ``resources``.

    ``--exact`` gives the step only what it asks for, so steps run side by side;
    ``--mem=0`` lets a step use the job's memory without reserving it from other steps;
    ``--gres=none`` keeps a step that asks for no GPU from taking all of the job's.
    ``run_time_max`` (seconds) becomes ``--time`` in minutes, rounded up: Slurm's
    time limits have a resolution of one minute.
    """
    argv = [
        settings.srun, f"--jobid={settings.job_id}", "--job-name=executorlib", "--exact",
        "--kill-on-bad-exit=1", f"--ntasks={resources.cores}",
        f"--cpus-per-task={resources.threads_per_core}",
        f"--mem={math.ceil(resources.memory_max * 1024)}M" if resources.memory_max else "--mem=0",
    ]
    argv += _optional_options(resources)
    if resources.cores > 1 and settings.pmi_mode:
        argv.append(f"--mpi={settings.pmi_mode}")
    return [*argv, *resources.slurm_cmd_args]


def _optional_options(resources: Resources) -> list[str]:
    argv = []
    if resources.gpus_per_core:
        argv.append(f"--gpus-per-task={_whole_gpus(resources.gpus_per_core)}")
    else:  # a step without a GRES request would get all of the job's GPUs
        argv.append("--gres=none")
    if resources.num_nodes is not None:
        argv.append(f"--nodes={resources.num_nodes}")
    if resources.exclusive:
        argv.append("--exclusive")
    if resources.run_time_max is not None:
        argv.append(f"--time={math.ceil(resources.run_time_max / 60)}")
    if resources.openmpi_oversubscribe:
        argv.append("--overcommit")  # more tasks than CPUs, in Slurm's words
    if resources.cwd:
        argv.append(f"--chdir={resources.cwd}")
    return argv


def _whole_gpus(gpus: float) -> int:
    if gpus != int(gpus):
        raise ValueError(
            f"gpus_per_core={gpus} but Slurm gives each task whole GPUs (srun --gpus-per-task); "
            "use an integer, or share a GPU between tasks with slurm_cmd_args"
        )
    return int(gpus)


def srun_environment(env: dict[str, str], keep: Mapping[str, str]) -> dict[str, str]:
    """``env`` without the job-wide variables srun would read as step options
    (those the caller set in ``resource_dict['env']``, ``keep``, stay)."""
    return {k: v for k, v in env.items() if k not in _STEP_SHAPING_VARIABLES or k in keep}


# --------------------------------------------------------- why a step ended
_CANCELLED = re.compile(r"\*\*\* (STEP|JOB) (\S+) ON (\S+) CANCELLED AT (\S+)(?: DUE TO ([A-Z ]+?))? \*\*\*")
_STEP_ID = re.compile(r"StepId=(\d+\.\d+)|\bSTEP (\d+\.\d+) ON\b")
_TASK_ERROR = re.compile(r"srun: error: (\S+): tasks? ([\d,\-]+): (.+)")
_SRUN_ERROR = re.compile(r"srun: error: (?!\S+: tasks? )(.+)")


def step_outcome(stderr: str) -> tuple[str | None, str]:
    """(step id or None, Slurm's account of how the step ended) from srun's stderr:
    cancellations and task errors in the order srun reported them."""
    ids = [a or b for a, b in _STEP_ID.findall(stderr)]
    events = [(m.start(), _describe_cancel(m)) for m in _CANCELLED.finditer(stderr)]
    events += [(m.start(), f"task {m[2]} on {m[1]}: {m[3]}") for m in _TASK_ERROR.finditer(stderr)]
    events += [(m.start(), m[1]) for m in _SRUN_ERROR.finditer(stderr)]
    account = "; ".join(dict.fromkeys(text for _, text in sorted(events)))
    return (ids[0] if ids else None), account or "ended"


def _describe_cancel(match: re.Match) -> str:
    reason = f" DUE TO {match[5]}" if match[5] else ""
    return f"{match[1].lower()} {match[2]} on {match[3]} CANCELLED{reason}"


def job_out_of_time(job_id: str) -> str | None:
    """A sentence if job ``job_id`` has reached its time limit (asks slurmctld), else None."""
    try:
        shown = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id],
            capture_output=True, text=True, timeout=_QUERY_TIMEOUT_S,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    state = re.search(r"\bJobState=(\S+)", shown)
    end = re.search(r"\bEndTime=(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)", shown)
    if (state and state[1] == "TIMEOUT") or (end and datetime.fromisoformat(end[1]) <= datetime.now()):
        limit = re.search(r"\bTimeLimit=(\S+)", shown)
        return (
            f"the allocation (Slurm job {job_id}) reached its time limit"
            f"{f' ({limit[1]})' if limit else ''}{f' at {end[1]}' if end else ''}, so Slurm ended "
            "all its steps; ask for more time (salloc/sbatch --time) or split the work"
        )
    return None


class SrunProcess(WorkerProcess):
    """An ``srun`` worker step: stops by SIGTERM (a SIGKILLed srun leaves its step
    running) and says which step ended and why."""

    def __init__(self, argv: list[str], env: dict[str, str], job_id: str, resources: Resources) -> None:
        super().__init__(argv, env, None)
        self.job_id = job_id
        self.resources = resources
        self._stopped = False

    def stop(self) -> None:
        """Ask srun to end the step: on SIGTERM it cancels the step, then exits."""
        self._stopped = True
        if self.popen.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGTERM)

    def _on_stderr(self, chunk: bytes) -> None:
        if not self._stopped:  # srun reporting the cancellation we asked for is no news
            super()._on_stderr(chunk)

    def how_it_ended(self) -> str:
        srun_said = super().how_it_ended()  # exit status and the last lines of stderr
        step_id, state = step_outcome(srun_said)
        where = f"Slurm step {step_id}" if step_id else f"a Slurm step of job {self.job_id}"
        text = f"{where}: {state}"
        if "TIME LIMIT" in state or self.popen.returncode != 0:
            if (out_of_time := job_out_of_time(self.job_id)) is not None:
                text = f"{where}: {out_of_time}"
            elif "TIME LIMIT" in state and self.resources.run_time_max:
                text += (
                    f" (its own limit: run_time_max={self.resources.run_time_max} s, i.e. "
                    f"srun --time={math.ceil(self.resources.run_time_max / 60)} min)"
                )
        return f"{text}; srun: {srun_said}"


class SrunSpawner:
    """Workers as srun steps of one allocation (``Spawner`` protocol)."""

    spares = False  # an idle spare step would hold CPUs a nested executor needs
    host_socket = True  # a step on the executor's node talks over a Unix socket (host_socket.py)

    def __init__(self, settings: SrunSettings, bind_host: str) -> None:
        self.settings = settings
        self.bind_host = bind_host
        self.name = f"srun step of Slurm job {settings.job_id}"

    def start(self, launch: Launch) -> SrunProcess:
        resources = launch.resources
        if resources.cwd:
            os.makedirs(resources.cwd, exist_ok=True)
        module = "interactive_serial" if resources.cores == 1 else "interactive_parallel"
        argv = [*srun_command(resources, self.settings), *worker_argv(module, launch)]
        env = srun_environment(worker_environment(launch), resources.env)
        return SrunProcess(argv, env, self.settings.job_id, resources)


# ---------------------------------------------------------------- the executor
@shared_options()
class SlurmJobExecutor(AllocationExecutor):
    """Runs each call as an ``srun`` step inside the current Slurm allocation.

    Use it in ``salloc`` or an ``sbatch`` script. ``max_cores`` defaults to the CPUs the
    allocation holds. Workers connect back to this node's host name, or to 127.0.0.1
    with ``hostname_localhost=True`` (only when all steps stay on this node).

    pmi_mode (alias flux_executor_pmi_mode): srun's ``--mpi=`` for calls with
    ``cores > 1``, e.g. ``"pmix"``. Without it: the cluster's ``MpiDefault``, or where
    that is ``none``, a PMI the cluster offers (``srun --mpi=list``: pmix, else pmi2).
    """

    backend = "slurm_allocation"

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        pmi_mode: str | None = None,
        flux_executor_pmi_mode: str | None = None,
        **options: Any,
    ) -> None:
        parsed = parse_options(type(self).__name__, {**options, "max_workers": max_workers})
        pmi = pmi_option(pmi_mode, flux_executor_pmi_mode)
        if parsed.graph_only:  # runs nothing, so it needs no allocation
            self._allocation = Allocation("", allocation_cpus(os.environ))
            self._settings = SrunSettings("", pmi)
        else:
            self._allocation = Allocation.from_environment()
            self._settings = SrunSettings(self._allocation.job_id, pmi, _find_srun())
        host = "127.0.0.1" if parsed.hostname_localhost else socket.gethostname()
        self._spawner = SrunSpawner(self._settings, host)
        self._check_max_cores(parsed)
        self._setup(parsed, lambda: self._scheduler_for(self._spawner, host))

    def _available_cores(self) -> int:
        return self._allocation.cpus

    def _backend_info(self) -> dict[str, Any]:
        return {"pmi_mode": self._settings.pmi_mode, "slurm_job_id": self._allocation.job_id}

    def _check_max_cores(self, options: Options) -> None:
        """More cores than the allocation holds would leave steps waiting forever."""
        job, cpus = self._allocation.job_id, self._allocation.cpus
        if options.max_cores is not None and options.max_cores > cpus:
            raise ValueError(
                f"max_cores={options.max_cores} but the allocation (Slurm job {job}) holds {cpus} "
                "CPUs; lower max_cores or ask salloc/sbatch for more"
            )
        wanted = (options.max_workers or 1) * options.resources.slots
        if options.block_allocation and wanted > cpus:
            raise ValueError(
                f"max_workers={options.max_workers} workers x {options.resources.slots} cores "
                f"each need {wanted} CPUs but the allocation (Slurm job {job}) holds {cpus}; "
                "lower max_workers or ask salloc/sbatch for more"
            )

    def _check_fits(self, resources: Resources) -> None:
        if self._options.max_cores is None and resources.slots > self._allocation.cpus:
            raise ValueError(
                f"a call asks for {resources.slots} cores (cores={resources.cores} x "
                f"threads_per_core={resources.threads_per_core}) but the allocation (Slurm job "
                f"{self._allocation.job_id}) holds {self._allocation.cpus} CPUs; ask for fewer "
                "cores or for a larger allocation"
            )
        super()._check_fits(resources)
        if resources.run_time_max and self._allocation.job_id:  # no call Slurm would kill
            if getattr(self, "_clock", None) is None:
                from executorlib.pilot.walltime import AllocationClock

                self._clock = AllocationClock(self._allocation.job_id)
            self._clock.check(resources.run_time_max, "a call")
        if resources.cores > 1 and self._settings.pmi_mode is None and self._allocation.job_id:
            self._settings = replace(self._settings, pmi_mode=default_pmi(resources.cores))
            self._spawner.settings = self._settings
        srun_command(resources, self._settings)  # options srun cannot take fail here


def _find_srun() -> str:
    srun = shutil.which("srun")
    if srun is None:
        raise FileNotFoundError(
            "backend='slurm_allocation' starts workers with srun, which is not on PATH; "
            "load your cluster's Slurm module (or apt-get install slurm-client)"
        )
    return srun


# ------------------------------------------------- a PMI when the user gave none
_PMI_PREFERENCE = ("pmix", "pmi2")  # OpenMPI 4/5 and MPICH both speak one of these


@cache
def cluster_mpi() -> tuple[str, tuple[str, ...]]:
    """(MpiDefault, the MPI plugins ``srun --mpi=list`` offers), asked once per process."""
    config = _ask(["scontrol", "show", "config"])
    default = re.search(r"^MpiDefault\s*=\s*(\S+)", config, re.MULTILINE)
    listed = _ask(["srun", "--mpi=list"])
    plugins = re.findall(r"^\s*(?:srun: )?\s*(?:mpi/)?([a-z][\w]*)\s*$", listed, re.MULTILINE)
    return (default[1] if default else "none"), tuple(dict.fromkeys(plugins))


def _ask(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_QUERY_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout + done.stderr


def default_pmi(cores: int) -> str | None:
    """The PMI for an MPI call when the user gave none: None where the cluster's
    ``MpiDefault`` already names one, else the first of pmix, pmi2 that srun offers;
    a one-line ValueError naming the values to pass when it offers neither."""
    default, offered = cluster_mpi()
    if default not in ("none", ""):
        return None
    for name in _PMI_PREFERENCE:
        if any(plugin == name or plugin.startswith(f"{name}_") for plugin in offered):
            return name
    choices = ", ".join(p for p in offered if p != "none") or "none found"
    raise ValueError(
        f"cores={cores} runs the call under MPI, but this Slurm cluster has MpiDefault=none and "
        f"offers neither pmix nor pmi2 (srun --mpi=list: {choices}); pass pmi_mode= one of "
        f"those that matches your MPI library"
    )
