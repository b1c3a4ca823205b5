"""Fresh local workers forked from a pre-imported process (the idea of multiprocessing's
forkserver), so that one worker per call costs a fork instead of a Python boot.

    manager thread                                 zygote (backend/zygote.py)
    Zygote.fork(argv, env, cwd) ----------------->  [request waits on the socket]
      request: JSON {argv, env, cwd}                fork()
      + SCM_RIGHTS: its stderr pipe, our stdout,     child: reads the request itself,
        its socket pair's end (pipe.py)
                                                       closes the zygote's fds, setsid,
                                                       stderr, cwd, environ, sys.argv;
                                                       runs argv's ``-c`` code (a worker)
    ForkedChild(pid, pidfd)  <-------- "S pid" + SCM_RIGHTS pidfd (after the child took it)
    ...the worker says HELLO on its socket pair as any other local worker...
    ForkedChild.wait()       <-------- "E pid status" once the zygote reaped it

Every call still gets a fresh process: a child serves one launch, and it starts from the
zygote's state, which has imported modules and nothing else (no ZeroMQ context or
socket, no launch's keys: those reach the child through the request it reads itself,
and leave its environment as with any worker). The socket is a ``socketpair`` private to
the executor and its zygote. The zygote is started lazily: by a local executor whose
calls run on fresh serial workers, when it is made (before the executor imports ZeroMQ
and the rest, so that both boot at once on two cores), else on the first launch that
can use it; never at import, never by other backends. It ends when the manager thread
ends (:meth:`Zygote.close`, its last act) or the executor's process ends; a worker
dies with the zygote (its own parent-death signal), as a worker started directly dies
with the executor.

A launch uses the zygote only when it would start Python the same way: a serial worker,
and the same interpreter settings (``PYTHON*`` and ``LD_*`` variables, which act before
or while the zygote imported its modules). Others, and any launch after the zygote
failed, start with ``subprocess.Popen`` as before.
"""

from __future__ import annotations

import _socket  # not ``socket``: its enum set-up would delay the zygote's start by ~10 ms
import array
import contextlib
import os
import signal
import sys

from executorlib.processes import python_argv

_REPLY_TIMEOUT_S = 60.0  # the first fork waits for the zygote's boot
_SCM = _socket.SOL_SOCKET, _socket.SCM_RIGHTS


def interpreter_settings(env: dict[str, str]) -> dict[str, str]:
    """The variables that shape a Python process before its first line runs."""
    return {k: v for k, v in env.items() if k.startswith(("PYTHON", "LD_"))}


class ForkedChild:
    """What ``WorkerProcess`` needs of a ``Popen``, for a child of the zygote."""

    def __init__(self, zygote: Zygote, pid: int, pidfd: int, stderr: int) -> None:
        self.pid, self.pidfd, self.returncode = pid, pidfd, None
        self.stderr = open(stderr, "rb", buffering=0)  # noqa: SIM115  (closed by WorkerProcess)
        self._zygote = zygote

    def wait(self) -> int:
        """The exit code (negative: the signal), once the process has ended."""
        if self.returncode is None:
            status = self._zygote.exit_status(self.pid)
            self.returncode = -1 if status is None else os.waitstatus_to_exitcode(status)
        return self.returncode


class Zygote:
    """The executor's half: starts the zygote, asks it for children, reads their ends."""

    def __init__(self, env: dict[str, str]) -> None:
        """Start the zygote in ``env``: a worker's environment without launch keys.
        ``posix_spawn``, not ``subprocess``: importing that would delay the start by
        ~5 ms, and the zygote's boot is what a first call waits for. The zygote closes
        any other descriptor it inherits (``close_fds``, as Popen would)."""
        ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
        self.settings = interpreter_settings(env)
        try:
            fd = max(3, theirs.fileno() + 1)  # a new number: dup2 clears close-on-exec
            argv = python_argv("zygote", str(fd))
            self.pid = os.posix_spawn(argv[0], argv, env, setsid=True, file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, theirs.fileno(), fd),
            ])
        finally:
            theirs.close()
        ours.settimeout(_REPLY_TIMEOUT_S)
        self._socket: _socket.socket | None = ours
        self._statuses: dict[int, int] = {}  # pid -> wait status, reported before asked for
        self._preloaded = False

    def fork(self, argv: list[str], env: dict[str, str], cwd: str | None,
             channel_fd: int | None = None) -> ForkedChild:
        """A new child running ``argv`` (``python -c CODE ARGS``) in ``env`` and ``cwd``,
        holding ``channel_fd`` (its socket pair's end: argv names it as ``fd:N``, with our
        number N, which the child replaces by its own); ``OSError`` if the zygote cannot
        give one (then start the worker otherwise)."""
        if self._socket is None:
            raise ConnectionError("the zygote was closed")
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            # as Popen: cwd relative to ours now, and our stdout as it is now
            cwd = os.path.abspath(cwd) if cwd else os.getcwd()
            import json

            request = json.dumps({"argv": argv, "env": env, "cwd": cwd}).encode()
            fds = [write_end, 1] if channel_fd is None else [write_end, 1, channel_fd]
            self._socket.sendmsg([request], [(*_SCM, array.array("i", fds))])
            pid, pidfd = self._until_started()
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        os.set_blocking(read_end, False)
        return ForkedChild(self, pid, pidfd, read_end)

    def exit_status(self, pid: int) -> int | None:
        """The wait status of child ``pid`` (it has ended); None if the zygote is gone."""
        with contextlib.suppress(OSError):
            while pid not in self._statuses:
                self._receive()
        return self._statuses.pop(pid, None)

    def close(self) -> None:
        """Hang up and end the zygote (its children still running end with it)."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)

    def preloaded(self) -> bool:
        """Whether the zygote has said "P": it has imported what it loads while idle,
        so a fork is answered at once (before, it may wait ~15 ms for those imports)."""
        while not self._preloaded and self._socket is not None:
            self._socket.settimeout(0.0)
            try:
                self._receive()
            except OSError:  # nothing waiting (BlockingIOError), or the zygote is gone
                break
            finally:
                if self._socket is not None:
                    self._socket.settimeout(_REPLY_TIMEOUT_S)
        return self._preloaded

    def _until_started(self) -> tuple[int, int]:
        while True:
            message, pidfd = self._receive()
            if message.startswith("S "):
                return int(message[2:]), pidfd

    def _receive(self) -> tuple[str, int]:
        """One message; statuses are kept for :meth:`exit_status`."""
        if self._socket is None:
            raise ConnectionError("the zygote was closed")
        data, ancillary, _, _ = self._socket.recvmsg(64, _socket.CMSG_SPACE(4))
        if not data:
            raise ConnectionError(f"the zygote (pid {self.pid}) has ended")
        message = data.decode()
        if message == "P":
            self._preloaded = True
        elif message.startswith("E "):
            pid, status = message[2:].split()
            self._statuses[int(pid)] = int(status)
        pidfd = array.array("i", ancillary[0][2][:4])[0] if ancillary else -1
        return message, pidfd


def forkable(argv: list[str]) -> bool:
    """Whether ``argv`` starts this Python with ``-c`` (what the zygote can run)."""
    return len(argv) >= 3 and argv[0] == sys.executable and argv[1] == "-c"
