"""Cluster side: the agent that runs the real executor next to the scheduler.

One agent per user and executor options (its socket name hashes them). It listens on a
Unix socket in a 0700 directory, accepts only peers of its own uid (SO_PEERCRED), and
serves each connection (one ssh session, through a bridge) in a thread::

    connection ─ Hello(session) ─> Session (futures by call id, survives the connection)
               ─ Submit(id)      ─> executor.submit(fn, *args with Ref -> own futures)
               <─ Outcome(id)    ─  done callback of the agent's future
               ─ Ack(ids)        ─> those futures are forgotten (the client has them)
               ─ Cancel(id)      ─> CancelAnswer(id, future.cancel()): False once it runs
               ─ Resume(pending) ─> Missing(ids it never got); resends finished results

Everything the agent sends goes through one sender thread, so the thread reading a
connection never blocks on a write (a client may be busy writing a large Submit).
A session keeps a call's future only until the client acknowledged its outcome;
what a restarted client needs comes from the ``cache_directory``, not from here.

It exits when no connection is open and nothing is left to deliver: no call still
running, and every session either said Bye or runs in queue jobs (submission mode:
jobs outlive the agent and leave result files, which a later client finds by hash);
else after ``idle_timeout`` seconds without a connection once every call finished.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import queue
import select
import signal
import socket
import struct
import sys
import threading
import time
from concurrent.futures import Future
from typing import Any

from executorlib import serialize
from executorlib.remote import wire
from executorlib.remote.bridge import lock

_CRED = struct.Struct("3i")


class Session:
    """One client executor's calls, kept across reconnects."""

    def __init__(self, token: str, outbox: queue.SimpleQueue) -> None:
        self.token = token
        self.futures: dict[int, Future] = {}
        self.channel: wire.Channel | None = None
        self._outbox = outbox

    def deliver(self, call_id: int, future: Future) -> None:
        """Queue the outcome for the sender thread: a large result is pickled and
        written there, not in the executor's thread that finished the call."""
        self._outbox.put((self, lambda: _outcome(call_id, future)))

    def post(self, record: Any) -> None:
        """Queue a record without payload (after the outcomes queued before it)."""
        self._outbox.put((self, lambda: (record, [])))

    def send_now(self, message: Any) -> None:
        channel = self.channel
        if channel is None:
            return  # the client asks again with Resume
        with contextlib.suppress(OSError):
            channel.send(*message())

    def forget(self, ids: tuple[int, ...], lock: threading.Lock) -> None:
        """Drop the futures of calls whose outcome the client acknowledged."""
        with lock:
            for call_id in ids:
                future = self.futures.get(call_id)
                if future is not None and future.done():
                    del self.futures[call_id]


def _send_outcomes(outbox: queue.SimpleQueue) -> None:
    """The agent's sender thread: messages in the order they were queued."""
    while (item := outbox.get()) is not None:
        session, message = item
        session.send_now(message)


def _outcome(call_id: int, future: Future) -> tuple[wire.Outcome, list]:
    if future.cancelled():
        return wire.Outcome(call_id, failed=True, cancelled=True), []
    error = future.exception()
    if error is not None:
        return wire.Outcome(call_id, failed=True), serialize.dumps_failure(error, socket.gethostname())
    try:
        return wire.Outcome(call_id, failed=False), serialize.dumps(future.result())
    except Exception as problem:  # the result will not pickle
        return wire.Outcome(call_id, failed=True), serialize.dumps_failure(problem, socket.gethostname())


class Agent:
    """The executor, its sessions and the connections that serve them."""

    def __init__(self, path: str, idle_timeout: float) -> None:
        self.path, self.idle_timeout = path, idle_timeout
        self.executor: Any = None
        self.durable = False
        self.sessions: dict[str, Session] = {}
        self.connections = 0
        self.lock = threading.Lock()
        self.wake_r, self.wake_w = os.pipe()
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=_send_outcomes, args=(self.outbox,), daemon=True).start()

    # ------------------------------------------------------------- lifecycle
    def serve(self, listener: socket.socket) -> None:
        idle_since = time.monotonic()
        while True:
            timeout = max(0.0, idle_since + self.idle_timeout - time.monotonic())
            ready, _, _ = select.select([listener, self.wake_r], [], [], timeout)
            if self.wake_r in ready:
                os.read(self.wake_r, 4096)
            if listener in ready:
                self._accept(listener)
            if self._busy():
                idle_since = time.monotonic()
            elif self._may_leave(idle_since) and self._leave(listener):
                return

    def _busy(self) -> bool:
        """A connection is open, or a call runs whose result lives only here. With result
        files (durable) a detached session's calls need no agent: a client that comes
        back submits them again and finds them by their hash."""
        with self.lock:
            sessions = [s for s in self.sessions.values() if not self.durable or s.channel is not None]
            running = any(not f.done() for s in sessions for f in s.futures.values())
            return self.connections > 0 or running

    def _may_leave(self, idle_since: float) -> bool:
        with self.lock:
            if not self.sessions or self.durable:
                return True
        return time.monotonic() - idle_since >= self.idle_timeout

    def _leave(self, listener: socket.socket) -> bool:
        """Unlink the socket unless a bridge is connecting right now (it holds the lock)."""
        held = lock(self.path[: -len(".sock")] + ".lock")
        try:
            pending, _, _ = select.select([listener], [], [], 0)
            if pending:
                return False
            os.unlink(self.path)
            return True
        finally:
            os.close(held)

    def wake(self) -> None:
        os.write(self.wake_w, b"!")

    def _accept(self, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except OSError:  # the peer gave up before we took it
            return
        _, uid, _ = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
        if uid != os.getuid():
            conn.close()  # another user's process: not a byte read
            return
        with self.lock:
            self.connections += 1
        threading.Thread(target=self._serve_connection, args=(conn,), daemon=True).start()

    # ------------------------------------------------------------- one connection
    def _serve_connection(self, conn: socket.socket) -> None:
        reader, writer = conn.makefile("rb"), conn.makefile("wb")
        channel = wire.Channel(reader, writer)
        session = None
        try:
            session = self._hello(channel)
            if session is not None:
                self._loop(channel, session)
        except (OSError, ConnectionError, EOFError):
            pass
        finally:
            if session is not None and session.channel is channel:
                session.channel = None
            for stream in (reader, writer, conn):
                with contextlib.suppress(OSError):
                    stream.close()
            with self.lock:
                self.connections -= 1
            self.wake()

    def _hello(self, channel: wire.Channel) -> Session | None:
        message = channel.receive()
        if message is None or not isinstance(message[0], wire.Hello):
            return None
        hello = message[0]
        try:
            self._ensure_executor(hello)
        except Exception as error:
            channel.send(wire.Refused(f"{type(error).__name__}: {error}"))
            return None
        with self.lock:
            known = hello.session in self.sessions
            session = self.sessions.setdefault(hello.session, Session(hello.session, self.outbox))
        channel.send(wire.Welcome(known))  # first: the sender thread may write once attached
        session.channel = channel
        return session

    def _ensure_executor(self, hello: wire.Hello) -> None:
        import executorlib

        if hello.version != executorlib.__version__:
            raise RuntimeError(
                f"executorlib {hello.version} on the laptop but {executorlib.__version__} for "
                f"{sys.executable} on {socket.gethostname()}; install the same version on both sides"
            )
        with self.lock:
            if self.executor is not None:
                return
            from executorlib.executor import backend_class

            self.executor = backend_class(hello.backend)(**hello.options)
            # Queue jobs outlive the agent and write result files; local workers do not.
            self.durable = hello.backend.endswith("_submission") and not hello.options.get("block_allocation")

    def _loop(self, channel: wire.Channel, session: Session) -> None:
        while (message := channel.receive()) is not None:
            record, payload = message
            if isinstance(record, wire.Submit):
                self._submit(session, record.id, payload)
            elif isinstance(record, wire.Resume):
                self._resume(session, record.pending)
            elif isinstance(record, wire.Ack):
                session.forget(record.ids, self.lock)
            elif isinstance(record, wire.Cancel):
                future = session.futures.get(record.id)  # None: not here (yet): it will run
                session.post(wire.CancelAnswer(record.id, future is not None and future.cancel()))
            elif isinstance(record, wire.Bye):
                self._bye(session, record.cancel_futures)
                return

    def _submit(self, session: Session, call_id: int, payload: list) -> None:
        if call_id in session.futures:
            return  # sent again across a reconnect: it runs once
        try:
            fn, args, kwargs, resource_dict = serialize.loads(payload)
        except Exception as error:  # e.g. the function's module is missing here
            failed = Future()
            failed.set_exception(error)
            return session.deliver(call_id, failed)
        refs = [ref for ref in _refs((args, kwargs)) if ref.id not in session.futures]
        if refs:
            return session.post(wire.Unresolved(call_id))
        args, kwargs = _resolve((args, kwargs), session.futures)
        try:
            future = self.executor.submit(fn, *args, resource_dict=resource_dict, **kwargs)
        except Exception as error:
            future = Future()
            future.set_exception(error)
        with self.lock:
            session.futures[call_id] = future
        future.add_done_callback(lambda done: (session.deliver(call_id, done), self.wake()))

    def _resume(self, session: Session, pending: tuple[int, ...]) -> None:
        wanted = set(pending)
        with self.lock:
            for call_id in [i for i, f in session.futures.items() if i not in wanted and f.done()]:
                del session.futures[call_id]  # delivered before the connection dropped
            missing = tuple(i for i in pending if i not in session.futures)
            finished = [(i, f) for i, f in session.futures.items() if f.done()]
        session.post(wire.Missing(missing))
        for call_id, future in finished:
            session.deliver(call_id, future)

    def _bye(self, session: Session, cancel_futures: bool) -> None:
        if cancel_futures:
            for future in session.futures.values():
                future.cancel()
        with self.lock:
            self.sessions.pop(session.token, None)
        session.channel = None

    def describe(self) -> str:
        """The agent's state, for its log (``kill -USR2``)."""
        with self.lock:
            sessions = [
                f"session {token[:8]}: {len(s.futures)} calls kept "
                f"({sum(not f.done() for f in s.futures.values())} not done), "
                + ("attached" if s.channel is not None else "detached")
                for token, s in self.sessions.items()
            ]
            return f"agent {os.getpid()}: {self.connections} connections; " + "; ".join(sessions)

    def close(self) -> None:
        """Stop the executor; with durable results, queued jobs stay for a later client."""
        if self.executor is not None:
            self.executor.shutdown(wait=not self.durable)


def _refs(value: Any) -> list[wire.Ref]:
    if isinstance(value, wire.Ref):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [ref for item in value for ref in _refs(item)]
    return []


def _resolve(value: Any, futures: dict[int, Future]) -> Any:
    """``value`` with every Ref replaced by the agent's future for that call."""
    if isinstance(value, wire.Ref):
        return futures[value.id]
    if isinstance(value, dict):
        return {key: _resolve(item, futures) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolve(item, futures) for item in value]
    if isinstance(value, tuple):
        return tuple(_resolve(item, futures) for item in value)
    return value


def main(argv: list[str]) -> None:
    """``SOCKET_PATH READY_FD IDLE_TIMEOUT``: started detached by the bridge."""
    path, ready, idle_timeout = argv[0], int(argv[1]), float(argv[2])
    os.umask(0o077)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    agent = Agent(path, idle_timeout)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1`: stacks to the log
    signal.signal(signal.SIGUSR2, lambda *_: print(agent.describe(), file=sys.stderr, flush=True))
    os.write(ready, b"1")
    os.close(ready)
    print(f"executorlib agent {os.getpid()} listening on {path}", file=sys.stderr, flush=True)
    try:
        agent.serve(listener)
    finally:
        listener.close()
        agent.close()
    print(f"executorlib agent {os.getpid()} idle: exiting", file=sys.stderr, flush=True)
