"""Child processes: how executorlib starts Python in a worker or a job, and reads how one ended.

One place for what every launcher (local processes, ``mpiexec``, ``srun`` steps, Flux
jobs, queue jobs) shares: the command line that starts a backend module, the child's
environment (threads, the caller's import path, OpenMPI as root, the user's ``env``),
the ``mpiexec`` prefix, how an exit status reads, the last lines of a log file, and
whether a pid is alive.

The import path: a child gets the caller's ``sys.path`` (as ``multiprocessing``'s spawn
does), with ``''`` standing for the caller's working directory only where the caller
itself has ``''``. The child starts through ``python -c`` with that ``''`` removed
before anything is imported, so nothing a stranger planted in the working directory
(a ``zmq.py`` in a world-writable folder) is importable in a worker.
"""

from __future__ import annotations

import os
import signal
import stat
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # workers import this module: keep their start-up lean
    from executorlib.resources import Resources

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# ``python -c`` puts '' (the working directory) first on sys.path: drop it before the
# first import, so a planted module there never loads.
_START = (
    "import sys; sys.path[:1] == [''] and sys.path.pop(0); "
    "from executorlib.backend.{} import main; main()"
)


def python_argv(module: str, *args: str) -> list[str]:
    """``python -c <start executorlib.backend.MODULE> ARGS...``; ``sys.argv[1:]`` are ARGS."""
    return [sys.executable, "-c", _START.format(module), *args]


def child_environment(resources: Resources) -> dict[str, str]:
    """The environment of a worker or job: ours, the caller's import path, threads,
    OpenMPI's permission to run as root (when we are root), then the user's ``env``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(import_path())
    env.update(dict.fromkeys(THREAD_VARIABLES, str(resources.threads_per_core)))
    if os.geteuid() == 0:  # OpenMPI refuses root unless told; containers and CI run as root
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env.update(resources.env)
    return env


def import_path() -> list[str]:
    """The caller's ``sys.path`` as absolute folders, then ``$PYTHONPATH``.

    Functions from the caller's own modules travel by reference, so workers started in
    another ``cwd`` must find those modules; nothing else is added.
    """
    here = os.getcwd()
    entries = [os.path.abspath(entry) if entry else here for entry in sys.path]
    entries += os.environ.get("PYTHONPATH", "").split(os.pathsep)
    return list(dict.fromkeys(entry for entry in entries if entry))


def mpiexec_prefix(resources: Resources) -> list[str]:
    """``mpiexec -n CORES`` (+ ``--oversubscribe``), after checking MPI is there."""
    import importlib.util  # here, not at import: workers load this module at start
    import shutil

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


def describe_exit(returncode: int | None) -> str:
    """'exit code 3', 'signal SIGKILL (9)' — with the usual cause where there is one."""
    if returncode is None:
        return "no exit status yet"
    signum = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
    if not signum:
        return f"exit code {returncode}"
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = "an unknown signal"
    text = f"signal {name} ({signum})" if returncode < 0 else f"exit code {returncode} (= 128 + {name})"
    if signum == signal.SIGKILL:
        text += ", often the out-of-memory killer or a kill from outside"
    elif signum == signal.SIGSEGV:
        text += ", a segmentation fault in compiled code"
    return text


def tail_lines(path: str | None, lines: int = 30, max_bytes: int = 4096) -> list[str] | None:
    """The last ``lines`` lines of the file at ``path`` (from its last ``max_bytes``);
    None when there is no such regular file or it cannot be read. Never blocks on a
    FIFO or a device: anything but a regular file counts as unreadable."""
    if path is None:
        return None
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(descriptor, "rb") as stream:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            return None
        stream.seek(max(0, status.st_size - max_bytes))
        return stream.read().decode(errors="replace").strip().splitlines()[-lines:]


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (ours or another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
