"""The zygote: a pre-imported process that forks each fresh local worker.

``python -c <start> FD``, started by the executor's manager thread (see
executorlib/interactive/zygote.py for the executor's half and the whole protocol). It
imports what a worker needs, then waits on the socket ``FD``. For each request it forks;
the child, not the zygote, reads the request (argv, environment, cwd, and its stderr
pipe), so no launch's keys ever pass through the zygote's memory and no later child
inherits them. The zygote reports each child's pid (with a pidfd) and, once it has
reaped it, its wait status. It reaps in its SIGCHLD handler, which Python runs between
any two bytecodes: so a child's end is reported at once even while the zygote imports
(its preload), and the executor's shutdown does not wait for those imports. It holds no
ZeroMQ context or socket: a child starts from a state with nothing to inherit but
imported modules.

It ends when the executor's process ends (it polls a pidfd of it: unlike
PR_SET_PDEATHSIG, this does not depend on which of the caller's threads started it) and
when the executor closes the socket; its children die with it (each worker's own
parent-death signal: worker.die_with_parent).
"""

from __future__ import annotations

import _signal  # not ``signal``: its enum set-up, as with ``socket``
import _socket  # not ``socket``: its enum set-up would delay every first worker
import array
import gc
import json
import os
import select
import sys

_REQUEST_BYTES = 1 << 22  # argv + environment of one launch
_SCM = _socket.SOL_SOCKET, _socket.SCM_RIGHTS
_SIGCHLD = {_signal.SIGCHLD}


def _caller_pidfd() -> int:
    """A pidfd of the executor's process (our parent): readable once it has ended."""
    parent = os.getppid()
    pidfd = os.pidfd_open(parent)
    if os.getppid() != parent:  # it ended before we looked
        os._exit(1)
    return pidfd


class Zygote:
    """The fork loop; :meth:`serve` returns only in a forked child (its ``-c`` code)."""

    def __init__(self, control: _socket.socket, caller: int) -> None:
        self.control, self.caller = control, caller
        self.poller = select.poll()
        self.poller.register(control, select.POLLIN)
        self.poller.register(caller, select.POLLIN)
        _signal.signal(_signal.SIGCHLD, self._reap)

    def serve(self) -> str | None:
        """Fork on each request; None once the executor hung up. The first idle moment
        imports cloudpickle (what calls by value need) and ctypes (a worker's
        parent-death signal), then says "P": the first request, often waiting already,
        does not wait for them, and the executor starts no spare worker before "P" (a
        fork would wait for these imports on its manager thread)."""
        preloaded = False
        while True:
            events = self.poller.poll(None if preloaded else 0)
            if not events and not preloaded:
                import ctypes  # noqa: F401  (worker.die_with_parent)

                import cloudpickle  # noqa: F401

                preloaded = True
                self.control.send(b"P")  # forks answer at once from now on
            for fd, _ in events:
                if fd == self.caller:
                    return None  # the executor's process ended
                if not self.control.recv(1, _socket.MSG_PEEK):
                    return None  # the executor closed its end
                elif (code := self._fork()) is not None:
                    return code

    def _fork(self) -> str | None:
        """Fork a child for the waiting request; "S pid" with its pidfd. SIGCHLD waits
        meanwhile, so that the child's "E" always follows its "S" (and it is still
        there for ``pidfd_open``, not reaped)."""
        mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, _SIGCHLD)
        try:
            taken, consumed = os.pipe()
            # What the zygote holds is the child's too, shared until written: the child's
            # collections need not visit it, which would copy every page of it (and took
            # ~7 ms of each worker's exit). Only what the zygote made since the last
            # fork is new to freeze.
            gc.freeze()
            pid = os.fork()
            if pid == 0:
                _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
                os.close(taken)
                return self._become_worker(consumed)
            os.close(consumed)
            os.read(taken, 1)  # EOF: the child has taken the request off the socket (or died)
            os.close(taken)
            pidfd = os.pidfd_open(pid)
            try:
                self.control.sendmsg([f"S {pid}".encode()], [(*_SCM, array.array("i", [pidfd]))])
            finally:
                os.close(pidfd)  # the executor has its own copy now
        finally:
            # in the zygote a waiting SIGCHLD now runs _reap; the child gets its mask back
            _signal.pthread_sigmask(_signal.SIG_SETMASK, mask)
        return None

    def _reap(self, *_: object) -> None:
        """The SIGCHLD handler: "E pid status" for each child that has ended."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:  # no child left
                return
            if pid == 0:
                return
            try:
                self.control.send(f"E {pid} {status}".encode())
            except OSError:  # the executor hung up: serve() returns on its next poll
                return

    def _become_worker(self, consumed: int) -> str:
        """In the child: take the request, drop everything of the zygote, set up the
        process as ``subprocess.Popen`` would (new session, stdin from /dev/null, the
        executor's stdout, a stderr pipe to the executor)."""
        data, ancillary, _, _ = self.control.recvmsg(_REQUEST_BYTES, _socket.CMSG_SPACE(12))
        os.setsid()  # before the executor learns our pid: it stops us with killpg
        os.close(consumed)
        self.control.close()
        os.close(self.caller)
        stderr, stdout, *channel = array.array("i", ancillary[0][2][:12])
        request = json.loads(data)
        argv = request["argv"]  # python -c CODE ADDRESS ...: fd:N names the executor's N
        if channel and argv[3].startswith("fd:"):
            argv[3] = f"fd:{channel[0]}"
        for fd, target in ((stderr, 2), (stdout, 1)):
            os.dup2(fd, target)
            os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        if request["cwd"]:
            os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["-c", *argv[3:]]
        return argv[2]


def main() -> None:
    fd = int(sys.argv[1])
    os.closerange(3, fd)  # what else the executor's process let us inherit (posix_spawn)
    os.closerange(fd + 1, os.sysconf("SC_OPEN_MAX"))
    caller = _caller_pidfd()
    control = _socket.socket(fileno=fd)
    import executorlib.backend.interactive_serial  # noqa: F401  (what every worker imports)

    code = Zygote(control, caller).serve()
    if code is not None:  # a forked child: run the worker as `python -c CODE` would
        exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})
