"""The worker's half of the protocol: connect, run calls, send back what they gave.

Used by ``python -m executorlib.backend.interactive_serial`` (one process) and, on
MPI rank 0, by ``interactive_parallel``. Imports nothing the worker does not need.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any

from executorlib import serialize
from executorlib.interactive import host_socket, private_env, protocol
from executorlib.interactive.encoding import split_batch
from executorlib.interactive.pipe import ADDRESS_PREFIX, PipeConnection

if TYPE_CHECKING:
    from executorlib.interactive.channel import WorkerConnection

CONNECT_TIMEOUT_ENV = "EXECUTORLIB_CONNECT_TIMEOUT"
_PARENT_DEATH_SIGNAL = 16  # SIGSTKFLT; also the seconds until SIGALRM (die_with_parent)
# A worker started for a call gets it right after its HELLO; only a worker with nothing
# for this long is idle (a spare), with time to import what calls by value need (~8 ms,
# which would delay a call whose sender the machine kept waiting for a moment).
_IDLE_AFTER_MS = 5
# What runs a Call on this worker: one process, or every MPI rank (returning a list).
Runner = Callable[[list], Any]


def connect_from_argv() -> WorkerConnection | PipeConnection:
    """Connect to the executor named in ``argv``: ``fd:N``, a socket pair's end this
    worker inherited (pipe.py: ZeroMQ is not even imported), ``unix:...``, a socket on
    this machine (host_socket.py; else its ZeroMQ address), or a ZeroMQ address, with
    the launch's keys from the environment (removed from it here, so nothing this
    worker starts inherits them)."""
    address, worker_id = sys.argv[1], int(sys.argv[2])
    host = os.uname().nodename
    private_env.load()  # launchers that record the environment (Flux) pass it in a file
    try:
        timeout_s = float(os.environ.get(CONNECT_TIMEOUT_ENV, "60"))
        if address.startswith(ADDRESS_PREFIX):
            return PipeConnection.inherited(address, worker_id, timeout_s)
        if address.startswith(host_socket.PREFIX):  # this machine's socket, else the ROUTER
            connection, address = host_socket.connect(address, worker_id, timeout_s)
            if connection is not None:
                return connection
        from executorlib.interactive.auth import LaunchKeys
        from executorlib.interactive.channel import WorkerConnection

        keys = LaunchKeys.pop_from_env()
        return WorkerConnection(address, keys, worker_id, timeout_s)
    except (ConnectionError, TimeoutError) as error:
        sys.exit(
            f"executorlib worker {worker_id} on {host}: {error}. If this worker runs on another "
            "node than the executor, do not use hostname_localhost=True."
        )


def die_with_parent() -> None:
    """Make sure this process ends within seconds of its parent (the executor, or its
    mpiexec, srun step or Flux shell), even while a call holds the GIL.

    The kernel sends SIGSTKFLT (16, unused on Linux) when the parent ends
    (PR_SET_PDEATHSIG); its handler is libc's ``alarm`` itself, so, without the GIL,
    SIGALRM ends the process 16 seconds later. Until then the watchdog thread (when the
    interpreter is responsive) sweeps this worker's shared-memory files and exits.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.signal.argtypes, libc.signal.restype = [ctypes.c_int, ctypes.c_void_p], ctypes.c_void_p
    parent = os.getppid()
    libc.signal(_PARENT_DEATH_SIGNAL, ctypes.cast(libc.alarm, ctypes.c_void_p))  # alarm(16)
    libc.prctl(1, _PARENT_DEATH_SIGNAL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent ended before the signal was set
        os._exit(1)


def serve(connection: WorkerConnection | PipeConnection, run: Runner, on_lost: Callable[[], None]) -> None:
    """Answer INIT and CALL messages until STOP; ``on_lost`` if the executor vanishes
    (its watchdog thread notices, or a socket pair's send or receive fails)."""
    connection.watch_executor(on_lost)
    if not connection.poll(_IDLE_AFTER_MS):  # idle (a spare): load what calls by value need
        import cloudpickle  # noqa: F401
    try:
        _serve(connection, run)
    except ConnectionError:  # our channel's, never a call's (those travel back by value)
        on_lost()


def _serve(connection: WorkerConnection | PipeConnection, run: Runner) -> None:
    while True:
        kind, frames = connection.receive()
        if kind == protocol.STOP:
            return
        began = perf_counter()
        try:
            value = run(frames)
        except BaseException as exception:  # the function's error travels back by value
            value = serialize.Failure(exception, "")
        if kind == protocol.INIT and not isinstance(value, serialize.Failure):
            connection.send(protocol.READY)
        elif isinstance(value, Batch):
            for outcome in value:  # each result leaves as soon as it is there
                _reply(connection, outcome, perf_counter() - began)
                began = perf_counter()
        else:
            _reply(connection, value, perf_counter() - began)


class Batch:
    """The outcomes of several calls that came in one CALL message, produced lazily in
    order: each a value, or a :class:`serialize.Failure` for a call that raised or
    could not be unpickled here (each call is unpickled on its own: encoding.py)."""

    def __init__(self, preload: Preload, calls: list[list]) -> None:
        self._preload, self._calls = preload, calls

    def __iter__(self):
        for frames in self._calls:
            try:
                yield run_call(self._preload, serialize.loads(frames))
            except BaseException as exception:
                yield serialize.Failure(exception, "")


def run_message(preload: Preload, frames: list) -> Any:
    """Run what one INIT or CALL message holds in this process: one call or a Batch."""
    message = serialize.loads(frames)
    if isinstance(message, list):
        return Batch(preload, split_batch(message, frames[1:]))
    return run_call(preload, message)


def _reply(connection: WorkerConnection | PipeConnection, value: Any, seconds: float) -> None:
    """Send a call's outcome and how long it ran here (the pool's scheduling uses it)."""
    if isinstance(value, serialize.Failure):
        # with a traceback: already formatted (an MPI rank's)
        frames = serialize.dumps(value) if value.traceback else serialize.dumps_failure(value.exception)
        connection.send(protocol.FAILURE, protocol.with_seconds(frames, seconds))
        return
    try:
        reply = serialize.dumps(value)
    except Exception as error:
        failure = serialize.SerializationError(f"the function's result could not be pickled: {error}")
        connection.send(protocol.FAILURE, protocol.with_seconds(serialize.dumps_failure(failure), seconds))
        return
    connection.send(protocol.RESULT, protocol.with_seconds(reply, seconds))


WORKER_ID_PARAMETER = "executorlib_worker_id"


class Preload:
    """Keyword arguments that ``init_function`` returned, given to calls that declare
    them; and the worker's number, for calls that declare ``executorlib_worker_id``."""

    def __init__(self, worker_id: int | None = None) -> None:
        self.values: dict[str, Any] = {}
        self.worker_id = worker_id
        self._names: dict[Any, frozenset[str]] = {}

    def set(self, values: Any) -> None:
        if not isinstance(values, dict):
            raise TypeError(f"init_function must return a dict, it returned {type(values).__name__}")
        self.values = values

    def fill(self, call: protocol.Call) -> dict:
        """``call.kwargs`` plus the preloaded values for parameters ``call.fn`` declares."""
        kwargs = call.kwargs
        if _declares_worker_id(call.fn) and WORKER_ID_PARAMETER not in kwargs:
            kwargs = {**kwargs, WORKER_ID_PARAMETER: self.worker_id}
        if not self.values:
            return kwargs
        names = self._declared(call.fn)
        extra = {k: v for k, v in self.values.items() if k in names and k not in kwargs}
        return {**extra, **kwargs} if extra else kwargs

    def _declared(self, fn: Callable) -> frozenset[str]:
        key = getattr(fn, "__code__", fn)
        if key not in self._names:
            import inspect  # only workers with an init_function pay for it

            try:
                self._names[key] = frozenset(inspect.signature(fn).parameters)
            except (TypeError, ValueError):
                self._names[key] = frozenset()
        return self._names[key]


def _declares_worker_id(fn: Callable) -> bool:
    """Whether ``fn`` has a parameter named executorlib_worker_id (cheap: no inspect)."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return False
    return WORKER_ID_PARAMETER in code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]


def run_call(preload: Preload, message: Any) -> Any:
    """Run one decoded INIT function or Call in this process."""
    if isinstance(message, protocol.Call):
        return message.fn(*message.args, **preload.fill(message))
    preload.set(message())
    return None
