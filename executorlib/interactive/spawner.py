"""How a worker process is started: the command line, its environment, its handle.

A spawner turns :class:`~executorlib.resources.Resources` into a launch command (local
python or ``mpiexec``; ``srun`` and Flux live in their own modules) and returns a
:class:`WorkerProcess`, whose file descriptors the scheduler's single poll watches: a
pidfd that becomes readable when the process ends, and its stderr pipe, which is passed
through to our stderr while the last lines are kept for error messages.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass

from executorlib.errors import describe_exit
from executorlib.interactive import protocol
from executorlib.resources import Resources

_STDERR_TAIL_BYTES = 4096
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True, slots=True)
class Launch:
    """Everything needed to start one worker."""

    address: str
    worker_id: int
    resources: Resources
    secret: bytes


class WorkerProcess:
    """A started worker: its pidfd and stderr, both pollable, and how it ended."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: str | None) -> None:
        self.argv = argv
        self.popen = subprocess.Popen(
            argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,  # Ctrl-C reaches the executor, which stops workers
        )
        self._pidfd = os.pidfd_open(self.popen.pid)
        self._stderr = self.popen.stderr.fileno()
        os.set_blocking(self._stderr, False)
        self._tail = bytearray()

    def fds(self) -> list[int]:
        """File descriptors to poll; :meth:`on_readable` handles each."""
        return [self._pidfd, self._stderr] if self._stderr >= 0 else [self._pidfd]

    def on_readable(self, fd: int) -> bool:
        """Handle activity on ``fd``; True once the process has ended."""
        if fd == self._stderr:
            self._drain_stderr()
            return False
        self._drain_stderr()
        self.popen.wait()
        os.close(self._pidfd)
        self.popen.stderr.close()
        return True

    def _drain_stderr(self) -> None:
        while self._stderr >= 0:
            try:
                chunk = os.read(self._stderr, 65536)
            except BlockingIOError:
                return
            if not chunk:
                self._stderr = -1
                return
            self._on_stderr(chunk)

    def _on_stderr(self, chunk: bytes) -> None:
        """Pass the worker's stderr through to ours; keep its last lines."""
        sys.stderr.write(chunk.decode(errors="replace"))
        self._tail += chunk
        del self._tail[:-_STDERR_TAIL_BYTES]

    def how_it_ended(self) -> str:
        """E.g. 'exit code 1' or 'signal SIGKILL (9)', plus the last lines of stderr."""
        text = describe_exit(self.popen.returncode)
        lines = self._tail.decode(errors="replace").strip().splitlines()[-30:]
        return text + ("; last lines of its stderr:\n    " + "\n    ".join(lines) if lines else "")

    def stop(self) -> None:
        """Kill the worker and everything it started (mpiexec ranks, srun)."""
        if self.popen.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                os.killpg(self.popen.pid, signal.SIGKILL)


class LocalSpawner:
    """Workers as local processes: ``python -m`` for one core, ``mpiexec`` for more."""

    bind_host = "127.0.0.1"
    name = "local"
    # Idle spare workers are only safe where nobody else competes for our cores: inside
    # an allocation an idle spare step would hold CPUs a nested executor needs.
    spares = True

    def start(self, launch: Launch) -> WorkerProcess:
        resources = launch.resources
        if resources.cwd:
            os.makedirs(resources.cwd, exist_ok=True)
        argv = self.command(launch)
        return WorkerProcess(argv, worker_environment(launch), resources.cwd)

    def command(self, launch: Launch) -> list[str]:
        """The argv that starts the worker for ``launch``."""
        if launch.resources.cores == 1:
            return worker_argv("interactive_serial", launch)
        return [*mpiexec_prefix(launch.resources), *worker_argv("interactive_parallel", launch)]


def worker_argv(module: str, launch: Launch) -> list[str]:
    """``python -m executorlib.backend.<module> ADDRESS WORKER_ID``: no secret in argv."""
    return [sys.executable, "-m", f"executorlib.backend.{module}", launch.address, str(launch.worker_id)]


def mpiexec_prefix(resources: Resources) -> list[str]:
    """``mpiexec -n CORES`` (+ ``--oversubscribe``), after checking MPI is there."""
    if importlib.util.find_spec("mpi4py") is None:
        raise ModuleNotFoundError(
            f"cores={resources.cores} runs the function under MPI, which needs mpi4py: "
            "pip install 'executorlib[mpi]' (and an MPI library such as OpenMPI)"
        )
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        raise FileNotFoundError(
            f"cores={resources.cores} needs 'mpiexec' on PATH; install OpenMPI "
            "(e.g. apt-get install openmpi-bin) or MPICH"
        )
    extra = ["--oversubscribe"] if resources.openmpi_oversubscribe else []
    return [mpiexec, "-n", str(resources.cores), *extra]


def worker_environment(launch: Launch) -> dict[str, str]:
    """The worker's environment: ours, the secret, the caller's import path, threads."""
    env = dict(os.environ)
    env[protocol.SECRET_ENV] = launch.secret.hex()
    env["PYTHONPATH"] = os.pathsep.join(_import_path())
    threads = str(launch.resources.threads_per_core)
    env.update(dict.fromkeys(_THREAD_VARIABLES, threads))
    if os.geteuid() == 0:  # OpenMPI refuses root unless told; containers and CI run as root
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env.update(launch.resources.env)
    return env


def _import_path() -> list[str]:
    """The caller's script folder and working directory first, then PYTHONPATH.

    Functions from the caller's own modules travel by reference, so workers started
    in another ``cwd`` must still find those modules.
    """
    first = sys.path[0] or os.getcwd() if sys.path else os.getcwd()
    rest = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    return list(dict.fromkeys(p for p in [os.path.abspath(first), os.getcwd(), *rest] if p))
