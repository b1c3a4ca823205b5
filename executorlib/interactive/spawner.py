"""How a worker process is started: the command line, its environment, its handle.

A spawner turns :class:`~executorlib.resources.Resources` into a launch command (local
python or ``mpiexec``; ``srun`` and Flux live in their own modules) and returns a
:class:`WorkerProcess`, whose file descriptors the scheduler's single poll watches: a
pidfd that becomes readable when the process ends, and its stderr pipe, which is passed
through to our stderr while the last lines are kept for error messages.

Every worker dies with the executor, whatever its call is doing (a C loop that holds
the GIL included): the kernel sends it a parent-death signal (``PR_SET_PDEATHSIG``).
A Python worker sets it for itself at start (worker.die_with_parent: it ends within 16 s,
after its watchdog had the chance to clean up); a launcher we start (``mpiexec``,
``srun``) gets SIGTERM through a wrapper that sets it and then execs the launcher —
util-linux's ``setpriv --pdeathsig`` (about 1 ms), else a ``python -I -S`` one-liner
(tens of ms, on the critical path of every srun worker) — and a launcher's SIGTERM ends
its ranks or its step; each rank, whose parent is the
launcher, sets its own too. Workers are started from the manager thread, which
outlives them: the "parent" of a parent-death signal is the thread that started it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from executorlib.container import container_argv, container_environment, host_python_binds
from executorlib.interactive.protocol import KEYS_ENV
from executorlib.interactive.zygote import Zygote, forkable, interpreter_settings
from executorlib.processes import (
    THREAD_VARIABLES,
    child_environment,
    describe_exit,
    import_path,
    mpiexec_prefix,
    python_argv,
)
from executorlib.resources import Resources

if TYPE_CHECKING:
    from executorlib.interactive.auth import LaunchKeys

_STDERR_TAIL_BYTES = 4096
# Runs as the launcher's process before it execs: SIGTERM (15) when our manager thread,
# its parent, ends (PR_SET_PDEATHSIG = 1); exit at once if that happened already.
_DIE_WITH_PARENT_EXEC = (
    "import ctypes, os, sys; ctypes.CDLL(None, use_errno=True).prctl(1, 15, 0, 0, 0); "
    "os.getppid() == int(sys.argv[1]) or os._exit(1); os.execvp(sys.argv[2], sys.argv[2:])"
)


@dataclass(frozen=True, slots=True)
class Launch:
    """Everything needed to start one worker."""

    # tcp://HOST:PORT; fd:N, the socket pair's end it inherits (pipe.py); or unix:...
    # (host_socket.py)
    address: str
    worker_id: int
    resources: Resources
    keys: LaunchKeys | None  # this launch's CurveZMQ keys (environment only); None for fd:N
    channel_fd: int | None = None  # the descriptor of fd:N, to pass to the worker


class WorkerProcess:
    """A started worker: its pidfd and stderr, both pollable, and how it ended. With a
    ``zygote``, the process is forked from it instead (zygote.py)."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: str | None,
                 zygote: Zygote | None = None, channel_fd: int | None = None) -> None:
        self.argv = argv
        if zygote is not None:
            self.popen = zygote.fork(argv, env, cwd, channel_fd)
            self._pidfd = self.popen.pidfd
        else:
            self.popen = subprocess.Popen(
                _dying_with_us(argv), env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                stderr=subprocess.PIPE, pass_fds=() if channel_fd is None else (channel_fd,),
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
        """Pass the worker's stderr through to ours (where we still have one: a closed
        pipe or ``sys.stderr = None`` is no reason to stop); keep its last lines."""
        try:
            sys.stderr.write(chunk.decode(errors="replace"))
            sys.stderr.flush()
        except (AttributeError, OSError, ValueError):  # None, a closed pipe, a closed file
            pass
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


def _dying_with_us(argv: list[str]) -> list[str]:
    """``argv``, or for a launcher (not Python itself) the wrapper that makes the
    launcher get SIGTERM when this process ends (see the module docstring)."""
    if argv[0] == sys.executable:
        return argv  # a Python worker sets its parent-death signal itself
    if setpriv := _setpriv():
        # If our process died between the fork and setpriv's prctl (microseconds), the
        # launcher would live on; its workers still end when their connection drops.
        return [setpriv, "--pdeathsig", "TERM", "--", *argv]
    return [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT_EXEC, str(os.getpid()), *argv]


@functools.cache
def _setpriv() -> str | None:
    """util-linux's setpriv, where it knows ``--pdeathsig`` (2.33 and later)."""
    import shutil

    path = shutil.which("setpriv")
    if path is None:
        return None
    done = subprocess.run([path, "--help"], capture_output=True, text=True, check=False)
    return path if "--pdeathsig" in done.stdout else None


class LocalSpawner:
    """Workers as local processes: ``python`` for one core (forked from the executor's
    zygote where it has one: zygote.py), ``mpiexec`` for more."""

    bind_host = "127.0.0.1"
    name = "local"
    # Idle spare workers are only safe where nobody else competes for our cores: inside
    # an allocation an idle spare step would hold CPUs a nested executor needs.
    spares = True

    def __init__(self, zygote: Zygote | None = None) -> None:
        self._zygote = zygote  # started by an executor of fresh serial workers (executor.py)
        self._use_zygote = True  # until it fails once

    @staticmethod
    def private_channel(resources: Resources) -> bool:
        """Whether a worker for ``resources`` talks over a socket pair it inherits
        (pipe.py): a serial Python worker of ours, not an ``mpiexec`` rank nor a
        process inside a container (neither passes our descriptor on)."""
        return resources.cores == 1 and resources.container is None

    def start(self, launch: Launch) -> WorkerProcess:
        resources = launch.resources
        if resources.cwd:
            os.makedirs(resources.cwd, exist_ok=True)
        argv, env = self.command(launch), worker_environment(launch)
        zygote = self._zygote_for(argv, env)
        if zygote is not None:
            try:
                return WorkerProcess(argv, env, resources.cwd, zygote, launch.channel_fd)
            except OSError:  # it died or hung: start workers directly from now on
                self._use_zygote = False
                self.stop_helpers()
        return WorkerProcess(argv, env, resources.cwd, channel_fd=launch.channel_fd)

    def can_start_spare(self) -> bool:
        """False while the zygote imports what it loads once idle: a fork would wait
        for it on the manager thread (a later poll's wake-up asks again)."""
        return self._zygote is None or not self._use_zygote or self._zygote.preloaded()

    def _zygote_for(self, argv: list[str], env: dict[str, str]) -> Zygote | None:
        """The executor's zygote, if it has one and it can start this worker."""
        zygote = self._zygote
        if zygote is None or not self._use_zygote or not forkable(argv):
            return None
        return zygote if zygote.settings == interpreter_settings(env) else None

    def stop_helpers(self) -> None:
        """End the zygote, if one was started (the manager thread's last act)."""
        if self._zygote is not None:
            self._zygote.close()
            self._zygote = None

    def command(self, launch: Launch) -> list[str]:
        """The argv that starts the worker for ``launch``."""
        if launch.resources.cores == 1:
            return worker_argv("interactive_serial", launch)
        return [*mpiexec_prefix(launch.resources), *worker_argv("interactive_parallel", launch)]


def worker_argv(module: str, launch: Launch) -> list[str]:
    """Start ``executorlib.backend.<module>`` with ``ADDRESS WORKER_ID``: no secret in argv;
    inside the container of ``resource_dict["container"]`` where there is one."""
    argv = python_argv(module, launch.address, str(launch.worker_id))
    spec = launch.resources.container
    if spec is None:
        return argv
    if spec.host_python:
        spec = spec.with_binds(host_python_binds([sys.base_prefix, sys.prefix], import_path()))
    names = worker_variables(launch)
    return container_argv(spec, argv, names, rootless=os.geteuid() != 0)


def worker_environment(launch: Launch) -> dict[str, str]:
    """The worker's environment: a child's (processes.child_environment) and the
    launch's keys (the worker removes them from its ``os.environ`` on every rank)."""
    env = child_environment(launch.resources)
    if launch.keys is not None:
        env[KEYS_ENV] = launch.keys.to_env()
    if launch.resources.container is not None:
        env = container_environment(launch.resources.container, env, worker_variables(launch))
    return env


def worker_variables(launch: Launch) -> list[str]:
    """Names of the variables a worker needs from its environment (a container passes
    them on by name): the keys, the import path, threads, the user's ``env``."""
    root = ["OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] if os.geteuid() == 0 else []
    return [KEYS_ENV, "PYTHONPATH", *THREAD_VARIABLES, *root, *launch.resources.env]
