"""Laptop side: an Executor whose calls run in an agent on the cluster, reached by ssh.

    submit() ─ _Call (future stays here) ─> Submit(id, fn/args pickled by value;
               futures of this executor in the arguments become Ref(id))
    reader thread <─ Outcome(id) ─ resolves the future; Ack(ids) (batched, ack thread)
                  lets the agent forget it
    future.cancel() ─ Cancel(id) ─> CancelAnswer: True only for a call that had not
               started there; False once it runs (concurrent.futures' contract)
    ssh ended (killed, laptop asleep, network gone) ─> reconnect with back-off,
               Resume(pending ids) ─> agent answers Missing(ids) ─> those are sent again

Calls keep running on the cluster while the connection is down; a call finished
meanwhile is delivered on reconnect. A new agent (the old one was gone) gets every
pending call again; with a ``cache_directory`` those are found there by their hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from concurrent.futures import BrokenExecutor, CancelledError, Future
from concurrent.futures import Executor as _StdExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any

import executorlib
from executorlib import serialize
from executorlib.dependencies import claim, find_futures, notify_cancelled, settle, substitute, when_resolved
from executorlib.errors import with_remote_traceback
from executorlib.processes import describe_exit
from executorlib.remote import wire
from executorlib.remote.futures import Acks, RemoteFuture
from executorlib.remote.ssh import SshTarget, parse_banner

_FIRST_DELAY_S, _MAX_DELAY_S = 0.5, 30.0
_ANSWER_MARGIN_S = 60.0  # a cancel waits for the agent's answer at most reconnect_timeout + this


@dataclass(eq=False)
class _Call:
    id: int
    fn: Callable[..., Any]
    args: tuple
    kwargs: dict
    resource_dict: dict | None
    future: Future
    ready: bool = False  # its inputs from elsewhere are resolved; the agent may have it
    withdrawn: bool = False  # cancelled here before it was sent: never send it


class RemoteExecutor(_StdExecutor):
    """Runs ``backend``'s executor with ``options`` in an agent on ``target``.

    Built by ``SingleNodeExecutor(ssh=...)`` / ``SlurmClusterExecutor(ssh=...)``; see
    ``executorlib.remote``. ``reconnect_timeout``: how long to keep trying after the
    connection dropped before failing the pending futures; ``idle_timeout``: how long the
    agent keeps undelivered results (without ``cache_directory``) for a client that
    went away.
    """

    def __init__(self, backend: str, options: dict, target: SshTarget,
                 reconnect_timeout: float = 600.0, idle_timeout: float = 900.0) -> None:
        self._backend, self._options, self._target = backend, options, target
        self._reconnect_timeout, self._idle_timeout = reconnect_timeout, idle_timeout
        self._session = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._calls: dict[int, _Call] = {}
        self._ids: weakref.WeakKeyDictionary[Future, int] = weakref.WeakKeyDictionary()
        self._next_id = 0
        self._shutdown = False
        self._broken: ConnectionError | None = None  # set when reconnecting gave up
        self._closing = threading.Event()
        self._cancels: dict[int, threading.Event] = {}  # asked the agent, no answer yet
        self._process: subprocess.Popen | None = None
        self._channel: wire.Channel | None = None
        self._channel, self._process = self._open()
        self._reader = threading.Thread(target=self._read_loop, name="executorlib-ssh", daemon=True)
        self._reader.start()
        self._acks = Acks(self._send_acks)

    # ---------------------------------------------------------------- the API
    def submit(self, fn: Callable[..., Any], /, *args: Any, resource_dict: dict | None = None,
               **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` on the cluster; futures of this executor in the
        arguments are resolved there, other futures here before the call is sent."""
        if not callable(fn):
            raise TypeError(f"submit() needs a callable as first argument, got {fn!r}")
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if self._broken is not None:
                raise BrokenExecutor(str(self._broken))
            call = _Call(self._next_id, fn, args, kwargs, resource_dict, RemoteFuture(self._cancel))
            self._next_id += 1
            self._calls[call.id] = call
            self._ids[call.future] = call.id
        call.future.add_done_callback(self._on_done)
        foreign = [f for f in find_futures((args, kwargs)) if f not in self._ids]
        if foreign:
            when_resolved(foreign, call.future, lambda: self._send_call(call))
        else:
            self._send_call(call)
        return call.future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Wait for (or cancel) this executor's calls, then end the session and ssh.
        With ``wait=False`` that happens in the background; safe to call twice."""
        with self._lock:
            first, self._shutdown = not self._shutdown, True
            calls = list(self._calls.values())
        if cancel_futures:
            self._cancel([call.future for call in calls])
        if not first:
            return self._reader.join() if wait else None
        if wait:
            self._finish(cancel_futures)
        else:
            threading.Thread(target=self._finish, args=(cancel_futures,), daemon=True).start()

    def _finish(self, cancel_futures: bool) -> None:
        with self._lock:
            futures = [call.future for call in self._calls.values()]
        wait_futures(futures)
        self._closing.set()
        self._acks.close()
        channel = self._channel
        if channel is not None:
            with contextlib.suppress(OSError):
                channel.send(wire.Bye(cancel_futures))
        self._close_process()
        self._reader.join()

    # ---------------------------------------------------------------- sending
    def _send_call(self, call: _Call, inline: bool = False) -> None:
        """Pickle and send one call; if the link is down, Resume/Missing sends it later."""
        with self._lock:
            if call.withdrawn:
                return
            call.ready = True
            channel = self._channel
        if channel is None or call.future.done():
            return
        try:
            payload = self._payload(call, inline)
        except Exception as error:  # will not pickle: say so on this call's future
            return settle(call.future, exception=error)
        with contextlib.suppress(OSError, ValueError):  # the reader reconnects and resends
            channel.send(wire.Submit(call.id), payload)

    def _payload(self, call: _Call, inline: bool) -> list:
        def resolve(future: Future) -> Any:
            own = self._ids.get(future)
            if own is not None and not (inline and future.done()):
                return wire.Ref(own)
            return future.result()

        args, kwargs = substitute((call.args, call.kwargs), resolve)
        return serialize.dumps((call.fn, args, kwargs, call.resource_dict), by_value=True)

    def _on_done(self, future: Future) -> None:
        call_id = self._ids.get(future)
        with self._lock:
            self._calls.pop(call_id, None)
            asked = self._cancels.pop(call_id, None)
        if asked is not None:
            asked.set()

    def _send_acks(self, ids: tuple[int, ...]) -> None:
        channel = self._channel
        if channel is not None:  # else lost: Resume tells the agent what is still pending
            with contextlib.suppress(OSError, ValueError):
                channel.send(wire.Ack(ids))

    # ---------------------------------------------------------------- cancelling
    def _cancel(self, futures: list[Future]) -> None:
        """Cancel here what was never sent; ask the agent about the rest, and wait
        for its answers (one round trip for all)."""
        local, asked = [], {}
        with self._lock:
            channel = self._channel
            for future in futures:
                call = self._calls.get(self._ids.get(future, -1))
                if call is not None and not call.ready:
                    call.withdrawn = True
                    local.append(future)
                elif call is not None and channel is not None and not self._on_reader():
                    asked[call.id] = self._cancels.setdefault(call.id, threading.Event())
        for future in local:
            _cancel_here(future)
        with contextlib.suppress(OSError, ValueError):  # a reconnect asks again
            for call_id in asked:
                channel.send(wire.Cancel(call_id))
        deadline = time.monotonic() + self._reconnect_timeout + _ANSWER_MARGIN_S
        for event in asked.values():  # set by the answer, or when the future ends
            event.wait(max(0.0, deadline - time.monotonic()))

    def _on_reader(self) -> bool:
        # The reader delivers the answer: it must not wait for it (a done-callback).
        return threading.current_thread() is self._reader

    def _answered(self, answer: wire.CancelAnswer) -> None:
        call = self._calls.get(answer.id)
        if call is not None and answer.cancelled:
            _cancel_here(call.future)
        elif call is not None:
            claim(call.future)  # it runs (or ran) there: cancel() now says False at once
        with self._lock:
            asked = self._cancels.pop(answer.id, None)
        if asked is not None:
            asked.set()

    # ---------------------------------------------------------------- receiving
    def _read_loop(self) -> None:
        while True:
            try:
                message = self._channel.receive() if self._channel else None
            except (OSError, ValueError, ConnectionError, EOFError):
                message = None
            if message is not None:
                self._handle(*message)
            elif self._closing.is_set() or not self._reconnect():
                return

    def _handle(self, record: Any, payload: list) -> None:
        if isinstance(record, wire.Outcome):
            self._resolve(record, payload)
            self._acks.add(record.id)
        elif isinstance(record, wire.CancelAnswer):
            self._answered(record)
        elif isinstance(record, wire.Missing):
            for call_id in record.ids:
                call = self._calls.get(call_id)
                if call is not None:
                    self._send_call(call)
        elif isinstance(record, wire.Unresolved):
            call = self._calls.get(record.id)
            if call is not None:
                self._send_call(call, inline=True)

    def _resolve(self, record: wire.Outcome, payload: list) -> None:
        call = self._calls.get(record.id)
        if call is None:
            return  # delivered already (again after a reconnect), or cancelled here
        if record.cancelled:
            if not _cancel_here(call.future):  # marked running by an earlier answer
                settle(call.future, exception=CancelledError(f"call {record.id} was cancelled"))
            return
        value = serialize.loads(payload)
        if record.failed:
            settle(call.future, exception=with_remote_traceback(value.exception, value.traceback))
        else:
            settle(call.future, value)

    # ---------------------------------------------------------------- connection
    def _open(self) -> tuple[wire.Channel, subprocess.Popen]:
        """Start ssh, check the remote Python, open the session (raises with the reason)."""
        argv = self._target.argv("bridge", self._agent_name(), str(self._idle_timeout))
        with tempfile.TemporaryFile() as errors:
            process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=errors, start_new_session=True)
            try:
                return self._handshake(process), process
            except BaseException as error:
                _stop(process)
                errors.seek(0)
                stderr = errors.read().decode(errors="replace")
                raise _explain(error, self._target, process, stderr) from None

    def _handshake(self, process: subprocess.Popen) -> wire.Channel:
        for _ in range(2):  # "python X.Y", then "ready" (or "missing ...": no executorlib)
            line = process.stdout.readline().decode(errors="replace")
            if not line:
                raise EOFError
            parse_banner(line, self._target, sys.version_info[:2])
        channel = wire.Channel(process.stdout, process.stdin)
        channel.send(wire.Hello(self._session, self._backend, self._options, sys.version_info[:2],
                                executorlib.__version__))
        answer = channel.receive()
        if answer is None:
            raise EOFError
        if isinstance(answer[0], wire.Refused):
            raise ValueError(f"the executorlib agent on {self._target.describe()} refused "
                             f"{self._backend!r} with these options: {answer[0].message}")
        return channel

    def _agent_name(self) -> str:
        text = repr((self._backend, sorted(self._options.items()), self._target.remote_python))
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def _reconnect(self) -> bool:
        """Back-off until a new connection is up (True) or reconnect_timeout passed."""
        self._close_process()
        delay, waited, last = _FIRST_DELAY_S, 0.0, None
        while waited < self._reconnect_timeout and not self._closing.is_set():
            try:
                channel, process = self._open()
            except Exception as error:
                last = error
                self._closing.wait(delay)
                waited, delay = waited + delay, min(2 * delay, _MAX_DELAY_S)
                continue
            with self._lock:
                self._channel, self._process = channel, process
                pending = tuple(sorted(i for i, call in self._calls.items() if call.ready))
                channel.send(wire.Resume(pending))
                for call_id in self._cancels:  # asked before the drop: ask again
                    channel.send(wire.Cancel(call_id))
            return True
        self._fail_pending(last)
        return False

    def _fail_pending(self, last: BaseException | None) -> None:
        with self._lock:
            calls = list(self._calls.values())
        error = ConnectionError(
            f"lost the connection to {self._target.describe()} and could not reconnect within "
            f"{self._reconnect_timeout:.0f} s (last error: {last}); the calls may still run "
            "there: with a cache_directory, a new executor with the same calls collects them"
        )
        with self._lock:
            self._broken = error
        for call in calls:
            settle(call.future, exception=error)

    def _close_process(self) -> None:
        with self._lock:
            process, self._process, self._channel = self._process, None, None
        if process is not None:
            _stop(process)


def _cancel_here(future: Future) -> bool:
    """The plain Future's cancel (not the agent's question), telling wait()/as_completed()."""
    if not Future.cancel(future):
        return False
    notify_cancelled(future)
    return True


def _stop(process: subprocess.Popen) -> None:
    """Close ssh's stdin (the session ends cleanly), then make sure it is gone."""
    for stream in (process.stdin, process.stdout):
        with contextlib.suppress(OSError, ValueError):
            stream.close()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _ended(returncode: int | None) -> str:
    # ssh itself exits 255 on its own errors: not a signal
    return f"exit code {returncode}" if returncode and returncode > 0 else describe_exit(returncode)


def _explain(error: BaseException, target: SshTarget, process: subprocess.Popen,
             stderr: str) -> BaseException:
    """The error of a failed connection attempt, with ssh's own words and a fix."""
    if not isinstance(error, (EOFError, OSError)):
        return error  # wrong Python, no executorlib, options refused: already says why
    tail = " | ".join(stderr.strip().splitlines()[-4:]) or "(nothing on stderr)"
    hint = ""
    if "host key" in stderr.lower() or "REMOTE HOST IDENTIFICATION" in stderr:
        hint = (" The host key is unknown or has changed: verify the host's fingerprint with "
                "the cluster's admins and add it to known_hosts (nothing is accepted silently).")
    elif "Permission denied" in stderr:
        hint = f" Check that your key (or ssh agent) is accepted: `ssh {target.host} true`."
    return ConnectionError(
        f"ssh to {target.describe()} failed ({_ended(process.returncode)}): {tail}.{hint}"
    )
