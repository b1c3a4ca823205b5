"""GPUs for local workers: which ones this machine has, and one set per running call.

``resource_dict={"gpus_per_core": g}`` on the local backend gives each worker
``cores * g`` GPUs of its own through ``CUDA_VISIBLE_DEVICES``; no two workers that run
at the same time share one. The GPUs are those in this process's
``CUDA_VISIBLE_DEVICES`` (as Slurm and most launchers set it), else those that
``nvidia-smi`` lists. Asking for more than there are is an error, never ignored.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import threading
from dataclasses import replace
from functools import cache

from executorlib.interactive.spawner import Launch, LocalSpawner, WorkerProcess, worker_environment
from executorlib.interactive.zygote import Zygote
from executorlib.resources import Resources


@cache
def visible_gpus() -> tuple[str, ...]:
    """The GPU ids this process may use (asked once per process)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return tuple(gpu for gpu in listed.split(",") if gpu.strip() not in ("", "-1", "NoDevFiles"))
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ()
    try:
        shown = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return tuple(line.strip() for line in shown.stdout.splitlines() if line.strip().isdigit())


def gpus_needed(resources: Resources) -> int:
    """GPUs one call with ``resources`` holds: ranks x GPUs per rank, rounded up."""
    return math.ceil(resources.cores * resources.gpus_per_core)


def check_local_gpus(resources: Resources, workers: int = 1) -> None:
    """Raise ``ValueError`` unless ``workers`` calls with ``resources`` fit on this
    machine's GPUs at once."""
    have, need = len(visible_gpus()), gpus_needed(resources) * workers
    if need > have:
        found = f"{have} GPU(s) ({', '.join(visible_gpus())})" if have else "no GPU"
        raise ValueError(
            f"resource_dict gpus_per_core={resources.gpus_per_core} x cores={resources.cores}"
            f"{f' x {workers} workers' if workers > 1 else ''} needs {need} GPU(s), but the local "
            f"backend finds {found} on this machine (CUDA_VISIBLE_DEVICES, nvidia-smi); ask for "
            "fewer GPUs, or run where there are GPUs (backend='slurm_allocation' or 'flux_allocation')"
        )


class GpuPool:
    """The machine's GPUs, handed out to workers and taken back when they end."""

    def __init__(self, gpus: tuple[str, ...]) -> None:
        self._free = list(gpus)
        self._lock = threading.Lock()

    def take(self, count: int) -> list[str]:
        with self._lock:
            if count > len(self._free):
                raise RuntimeError(
                    f"a call needs {count} GPU(s) but only {len(self._free)} of this machine's GPUs "
                    "are free: the others belong to calls still running; let fewer GPU calls run at "
                    "once (max_workers or max_cores) so that each finds its own"
                )
            taken, self._free = self._free[:count], self._free[count:]
            return taken

    def give_back(self, gpus: list[str]) -> None:
        with self._lock:
            self._free.extend(gpus)


class GpuProcess(WorkerProcess):
    """A local worker that returns its GPUs to the pool when it ends."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: str | None, on_end,
                 channel_fd: int | None = None) -> None:
        super().__init__(argv, env, cwd, channel_fd=channel_fd)
        self._on_end = on_end

    def on_readable(self, fd: int) -> bool:
        ended = super().on_readable(fd)
        if ended and self._on_end is not None:
            self._on_end, on_end = None, self._on_end
            on_end()
        return ended


class GpuLocalSpawner(LocalSpawner):
    """``LocalSpawner`` that gives each worker asking for GPUs its own (spare workers
    never hold GPUs: the executor keeps none when its default resources ask for GPUs)."""

    def __init__(self, zygote: Zygote | None = None) -> None:
        super().__init__(zygote)
        self._pool: GpuPool | None = None  # the GPUs are looked up on first use

    def start(self, launch: Launch) -> WorkerProcess:
        count = gpus_needed(launch.resources)
        if not count:
            return super().start(launch)
        if self._pool is None:
            self._pool = GpuPool(visible_gpus())
        gpus = self._pool.take(count)
        env = {**launch.resources.env, "CUDA_VISIBLE_DEVICES": ",".join(gpus)}
        launch = replace(launch, resources=replace(launch.resources, env=env))
        if launch.resources.cwd:
            os.makedirs(launch.resources.cwd, exist_ok=True)
        try:
            return GpuProcess(self.command(launch), worker_environment(launch), launch.resources.cwd,
                              lambda: self._pool.give_back(gpus), launch.channel_fd)
        except BaseException:
            self._pool.give_back(gpus)
            raise
