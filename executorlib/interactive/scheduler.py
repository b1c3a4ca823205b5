"""The manager thread shared by block allocation and one-worker-per-call.

Data flow::

    submit() ── Task ──> inbox (deque) ──wake(eventfd)──┐
    input futures done ─ callback ─> inbox ─────────────┤   (or straight to a lent
                                                        v    idle worker: see below)
       manager thread: ONE poll over  [wake eventfd, every worker's pidfd, stderr
                                        pipe and socket pair (or the ROUTER)]
         inbox   -> cache lookup -> pending (FIFO) -> policy picks/starts a worker
         channel -> HELLO / READY / RESULT / FAILURE  -> futures resolved here
         pidfd   -> worker ended: its call fails with exit code/signal + stderr tail;
                    calls sent ahead that it never started go back to the queue

Subclasses (pool.py, per_task.py) decide which worker runs what; this module owns the
loop, the workers' bookkeeping and every way a call can end. The loop sleeps in one poll
and is woken by events only; its timeouts are the grace period for workers to exit and
a subclass's back-off before it starts a worker again.

While the manager thread sleeps in its poll with nothing queued, it lends one idle
worker on a socket (pipe.py, host_socket.py; never the ROUTER: ZeroMQ sockets are not
thread-safe) to the submitting threads: the next call is encoded and sent to that worker
by ``submit()`` itself, under the scheduler's lock, as the manager would have sent it,
and the manager does not even wake up for it. A round trip then costs one thread wake-up
less. The manager takes the worker back, under the same lock, whenever its poll returns,
before it touches anything: so a lent worker, and all the state a send changes, is only
ever in one thread's hands.

Nothing that goes wrong with one call or one worker stops the loop: a call that cannot
be pickled, a result or error that cannot be unpickled here (even by raising
SystemExit), a send to a worker whose connection closed before its process ended (the
call goes back to the queue) — each ends that call or that worker, never the executor.
Every worker is started from the manager thread, which outlives them: a worker's
parent-death signal (spawner.py) fires when the executor's process ends.
"""

from __future__ import annotations

import functools
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from executorlib import serialize
from executorlib.dependencies import claim, settle, substitute, when_resolved
from executorlib.errors import ExecutorShutdownError, WorkerDiedError, with_remote_traceback
from executorlib.interactive import protocol
from executorlib.interactive.encoding import CallEncoder, unpicklable_call
from executorlib.interactive.endpoints import POLLIN, POLLOUT, ExecutorSocket, Poller
from executorlib.interactive.parts import Inbox, ResultCache, Spawner, Worker
from executorlib.interactive.pipe import ADDRESS_PREFIX, PipePeer
from executorlib.interactive.spawner import Launch
from executorlib.resources import Resources
from executorlib.task import Task

if TYPE_CHECKING:
    from executorlib.interactive.channel import Peer

__all__ = ["ResultCache", "Scheduler", "Spawner", "Worker"]

_EXIT_GRACE_MS = 5_000
_LIVE: weakref.WeakSet[Scheduler] = weakref.WeakSet()


class Scheduler:
    """Runs tasks on workers from one manager thread. Thread-safe ``submit``/``shutdown``."""

    def __init__(self, spawner: Spawner, host: str | None = None, cache: ResultCache | None = None) -> None:
        self._spawner = spawner
        self._cache = cache
        self._encoder = CallEncoder()
        self._poller = Poller()
        self._socket = ExecutorSocket(host or spawner.bind_host, self._poller)
        self._inbox = Inbox()
        self._pending: deque[Task] = deque()
        self._workers: dict[int, Worker] = {}
        self._fd_owner: dict[int, Worker] = {}
        self._next_worker_id = 0
        self._waiting: set[Future] = set()  # futures of calls whose inputs are not done yet
        self._lock = threading.Lock()
        self._stopping = False
        self._closed = False
        self._timer: float | None = None  # time.monotonic() at which to call _on_timer
        self._lent: Worker | None = None  # an idle worker submit() may send to (under the lock)
        self._poller.register(self._inbox.fd, POLLIN)
        self._thread = threading.Thread(target=self._run, name="executorlib-manager", daemon=True)
        _LIVE.add(self)

    # ----------------------------------------------------------------- any thread
    def start(self) -> None:
        self._thread.start()

    def submit(self, task: Task, inputs: list | None = None) -> None:
        """Queue ``task``; with ``inputs`` (futures), only once they all succeeded."""
        if not inputs:
            if self._cache is None:  # the common case, one call less
                self._post(task)
            else:
                self._post_unless_cached(task)
            return
        with self._lock:
            self._waiting.add(task.future)
        task.future.add_done_callback(self._forget_waiting)
        when_resolved(inputs, task.future, lambda: self._release(task))

    def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        """Finish (or cancel) what was submitted, then stop every worker."""
        if cancel_futures:
            with self._lock:
                waiting = list(self._waiting)
            for future in waiting:
                future.cancel()
        self._post(functools.partial(self._begin_stop, cancel_futures))
        if wait and self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()

    def _release(self, task: Task) -> None:
        """Inputs done: substitute them and queue ``task`` (if this raises, the task's
        future fails with the error: dependencies.when_resolved)."""
        if task.future.cancelled():
            return
        task.args, task.kwargs = substitute(task.args), substitute(task.kwargs)
        self._post_unless_cached(task)
        self._forget_waiting(task.future)

    def _post_unless_cached(self, task: Task) -> None:
        """A cache hit resolves the future right here, in the submitting (or releasing)
        thread, with no hand-off to the manager; a miss is queued."""
        if self._cache is None or not self._cache.load(task):
            self._post(task)

    def _forget_waiting(self, future: Future) -> None:
        with self._lock:
            self._waiting.discard(future)
            if not self._waiting:  # a set's table never shrinks: a big DAG's would stay
                self._waiting = set()
        self._wake()

    def _post(self, item: Any) -> None:
        failure = None
        with self._lock:
            if self._closed:  # the manager has ended: nothing may wait for it
                if not isinstance(item, Task):
                    return
                failure = ExecutorShutdownError(f"{item.name} arrived after the executor had shut down")
            elif self._lent is not None and isinstance(item, Task) and not self._inbox.items:
                failure = self._send_lent(item)
            else:
                self._inbox.items.append(item)
                if not self._inbox.signalled:  # else the manager has yet to take the inbox
                    self._signal()
        if failure is not None:  # outside the lock: the future's callbacks may submit
            settle(item.future, exception=failure)

    def _send_lent(self, task: Task) -> Exception | None:
        """Send ``task`` to the lent worker from this (submitting) thread, under
        ``self._lock``, while the manager waits in its poll (see the module docstring),
        and lend the next idle worker, if the policy has one; the error to fail the
        call with if it cannot be pickled."""
        worker, self._lent = self._lent, None
        failure = None
        if claim(task.future):  # else cancelled already: nothing to run
            try:
                frames = self._encoder.encode(task.fn, task.args, task.kwargs)
            except Exception as error:
                failure = unpicklable_call(task.name, error)
            else:
                self._deliver(worker, [task], frames)
        self._lent = self._lendable()
        if self._pending:  # the connection was gone: the manager takes the call from here
            self._signal()
        return failure

    def _wake(self) -> None:
        with self._lock:
            if not self._closed:
                self._signal()

    def _signal(self) -> None:
        """Wake the manager (under ``self._lock``). One write per wake-up, not per item:
        while a wake-up is pending, the manager will see what is added meanwhile (it
        clears the flag before it takes the inbox), and a burst of submits costs no
        syscall each nor wakes the manager for every call."""
        if not self._inbox.signalled and threading.get_ident() != self._thread.ident:
            self._inbox.signalled = True
            os.eventfd_write(self._inbox.fd, 1)

    # ------------------------------------------------------------ manager thread
    def _run(self) -> None:
        try:
            self._on_start()
            while True:
                self._take_inbox()
                self._schedule()
                ending = self._stopping and self._drained()
                if ending:
                    if not self._workers:
                        return
                    self._stop_idle_workers()
                if not ending:
                    self._lend()
                events = self._poller.poll(_EXIT_GRACE_MS if ending else self._timer_ms())
                self._take_back()
                if not events and ending:
                    self._kill_all()  # workers that did not exit within the grace period
                for source, mask in events:
                    if not self._poller.stale(source):  # closed meanwhile, maybe reused
                        self._handle(source, mask)
                if self._timer is not None and time.monotonic() >= self._timer:
                    self._timer = None
                    self._on_timer()
        except BaseException as error:  # a bug here must not leave futures pending forever
            self._fail_everything(error)
            raise
        finally:
            self._close()

    def _lend(self) -> None:
        """Before the poll: lend an idle worker to submit() while nothing is queued."""
        if not (self._pending or self._inbox.items):
            worker = self._lendable()
            if worker is not None:
                with self._lock:
                    self._lent = worker

    def _take_back(self) -> None:
        """After the poll: from here on the workers are the manager's alone again (a
        send from submit() in progress has finished when this has the lock)."""
        with self._lock:
            self._lent = None

    def _timer_ms(self) -> int | None:
        if self._timer is None:
            return None
        return max(0, int((self._timer - time.monotonic()) * 1000) + 1)

    def _handle(self, source: Any, mask: int) -> None:
        if source is self._socket.socket:
            while message := self._socket.receive():
                self._on_message(*message)
        elif source == self._inbox.fd:
            os.eventfd_read(self._inbox.fd)
            with self._lock:
                self._inbox.signalled = False  # the loop takes the inbox next
        elif (peer := self._socket.pipes.get(source)) is not None:
            self._on_pipe(peer, mask)
        elif source == self._socket.listener_fd:
            self._socket.accept()
        elif (worker := self._fd_owner.get(source)) and worker.process.on_readable(source):
            self._on_exit(worker)

    def _on_pipe(self, peer: PipePeer, mask: int) -> None:
        """Activity on a local worker's socket pair (or same-host socket): room to send,
        messages, its close (a local worker that closed its end is stopped, an srun step
        or Flux job is not: its launcher ends with it and reports how; either way its
        process end follows)."""
        closed = False
        if mask & POLLOUT:
            try:
                self._socket.on_writable(peer)
            except OSError:
                closed = True
        if mask & ~POLLOUT or closed:
            messages, gone = self._socket.read_pipe(peer)
            for message in messages:
                self._on_message(*message)
            closed = closed or gone
        if closed:
            self._socket.close_pipe(peer)
            worker = self._workers.get(peer.worker_id)
            if worker is None or worker.stopping:
                return
            if getattr(self._spawner, "host_socket", False):  # a step or job ends by itself
                worker.stopping = True  # once its task has: srun or Flux says how it ended
                self._on_connection_lost(worker)
            else:
                self._lose(worker)

    def run_in_manager(self, action: Callable[[], None]) -> None:
        """Have the manager thread run ``action`` (e.g. a pool's resize) between events."""
        self._post(action)

    def _take_inbox(self) -> None:
        while self._inbox.items:
            item = self._inbox.items.popleft()
            if isinstance(item, Task):
                self._pending.append(item)
            else:
                item()  # an action posted by shutdown() or run_in_manager()

    def _begin_stop(self, cancel_futures: bool) -> None:
        self._stopping = True
        if cancel_futures:  # calls put back after their worker died are running: they run
            self._pending = deque(t for t in self._pending if not t.future.cancel())

    def _drained(self) -> bool:
        with self._lock:
            waiting = bool(self._waiting)
        busy = any(worker.tasks for worker in self._workers.values())
        return not (waiting or self._pending or self._inbox.items or busy)

    # -------------------------------------------------------------- workers
    def _spawn(self, resources: Resources, task: Task | None = None, worker_id: int | None = None
               ) -> Worker | None:
        """Start a worker (with ``worker_id``, or the next free number); on failure fail
        ``task`` (if given) with the launcher's error."""
        if worker_id is None:
            worker_id, self._next_worker_id = self._next_worker_id, self._next_worker_id + 1
        private = getattr(self._spawner, "private_channel", None)
        theirs = None
        if private is not None and private(resources):  # a socket pair: pipe.py
            peer, theirs = self._socket.open_pipe(worker_id)
            launch = Launch(f"{ADDRESS_PREFIX}{theirs.fileno()}", worker_id, resources, None, theirs.fileno())
        elif getattr(self._spawner, "host_socket", False):  # maybe on this machine: host_socket.py
            address, keys = self._socket.host_address(worker_id)
            launch = Launch(address, worker_id, resources, keys)
        else:
            launch = Launch(self._socket.address, worker_id, resources, self._socket.launch_keys(worker_id))
        try:
            process = self._spawner.start(launch)
        except Exception as error:
            self._socket.forget(worker_id, None)
            if task is not None:
                settle(task.future, exception=error)
            self._on_start_failure(error, worker_id)
            return None
        finally:
            if theirs is not None:
                theirs.close()  # the worker holds it now
        worker = Worker(worker_id, resources, process)
        if task is not None:
            worker.tasks.append(task)
        self._workers[worker_id] = worker
        for fd in process.fds():
            self._fd_owner[fd] = worker
            self._poller.register(fd, POLLIN)
        return worker

    def _send_call(self, worker: Worker, task: Task) -> bool:
        """Hand ``task`` to ``worker``; False if it cannot be pickled (its future
        failed) or the worker's connection is gone (the task is queued again)."""
        try:
            frames = self._encoder.encode(task.fn, task.args, task.kwargs)
        except Exception as error:
            settle(task.future, exception=unpicklable_call(task.name, error))
            return False
        return self._deliver(worker, [task], frames)

    def _send_calls(self, worker: Worker, tasks: list[Task]) -> None:
        """Hand several tasks to ``worker`` in one message (one result each comes back);
        if the batch cannot be pickled, each task goes alone so only the bad one fails."""
        if len(tasks) > 1:
            try:
                frames = self._encoder.encode_batch([(t.fn, t.args, t.kwargs) for t in tasks])
            except Exception:
                frames = None
            if frames is not None:
                self._deliver(worker, tasks, frames)
                return
        for index, task in enumerate(tasks):
            if worker.stopping:  # the connection is gone: the rest waits for another worker
                self._pending.extendleft(reversed(tasks[index:]))
                return
            self._send_call(worker, task)

    def _deliver(self, worker: Worker, tasks: list[Task], frames: list) -> bool:
        if not worker.tasks:
            self._on_first_call(worker)
        if not self._send(worker, protocol.CALL, frames):
            self._pending.extendleft(reversed(tasks))  # never reached the worker
            return False
        worker.tasks.extend(tasks)
        return True

    def _send(self, worker: Worker, kind: bytes, frames: list = ()) -> bool:
        """Send to ``worker``; False if its connection is gone while its process still
        runs (mpiexec and srun outlive their rank 0 for a moment): the worker is then
        stopped, and its end reported when its process has gone."""
        try:
            self._socket.send(worker.peer, kind, frames)
            return True
        except OSError:  # ConnectionError from the ROUTER, or a socket pair's
            self._lose(worker)
            return False

    def _lose(self, worker: Worker) -> None:
        worker.stopping = True
        worker.process.stop()
        self._on_connection_lost(worker)

    def _on_message(self, peer: Peer, kind: bytes, frames: list) -> None:
        worker = self._workers.get(peer.worker_id)
        if worker is None:
            return
        if kind == protocol.HELLO:
            if worker.peer is not None:  # connected already (it has two ways: host_socket.py)
                return
            worker.peer = peer
            self._on_connected(worker)
        elif kind == protocol.READY:
            self._on_ready(worker)
        elif kind in (protocol.RESULT, protocol.FAILURE) and worker.tasks:
            task = worker.tasks.popleft()
            self._on_task_done(worker)
            self._take_inbox()  # a shutdown(cancel_futures=True) posted before this result
            self._schedule()  # the worker's next call first: it waits while we resolve
            self._resolve(task, kind, frames)

    def _resolve(self, task: Task, kind: bytes, frames: list) -> None:
        try:
            value = serialize.loads(frames)
        except BaseException as error:  # even SystemExit from a __reduce__: this call only
            what = "result" if kind == protocol.RESULT else "exception"
            failure = RuntimeError(
                f"the {what} of {task.name} arrived but could not be unpickled here: {error!r}"
                "; make it picklable with the modules this process imports"
            )
            failure.__cause__ = error
            settle(task.future, exception=failure)
            return
        if kind == protocol.FAILURE:
            settle(task.future, exception=with_remote_traceback(value.exception, value.traceback))
            return
        if self._cache is not None:
            self._cache.store(task, value)
        settle(task.future, result=value)

    def _on_exit(self, worker: Worker) -> None:
        for fd in list(self._fd_owner):
            if self._fd_owner[fd] is worker:
                del self._fd_owner[fd]
                self._poller.unregister(fd)
        del self._workers[worker.worker_id]
        self._socket.forget(worker.worker_id, worker.peer)
        if worker.tasks:  # the oldest was running (or being started); the rest never started
            task = worker.tasks.popleft()
            settle(task.future, exception=self._death_error(worker, task))
            self._pending.extendleft(reversed(worker.tasks))
            worker.tasks.clear()
        self._on_worker_gone(worker)

    def _death_error(self, worker: Worker, task: Task) -> WorkerDiedError:
        stage = "while running" if worker.peer else "before it could run"
        return WorkerDiedError(
            f"{worker.describe()} ({self._spawner.name}) ended {stage} {task.name}: "
            f"{worker.process.how_it_ended()}"
        )

    def _stop_idle_workers(self) -> None:
        for worker in self._workers.values():
            if worker.stopping:
                continue
            worker.stopping = True
            if worker.peer is not None:
                self._send(worker, protocol.STOP)
            else:
                worker.process.stop()  # still starting: nothing to finish

    def _kill_all(self) -> None:
        for worker in self._workers.values():
            worker.process.stop()

    def _fail_everything(self, error: BaseException) -> None:
        tasks = [t for w in self._workers.values() for t in w.tasks] + list(self._pending)
        tasks += [t for t in self._inbox.items if isinstance(t, Task)]
        for task in tasks:
            settle(task.future, exception=RuntimeError(f"executorlib's manager thread failed: {error!r}"))
        self._kill_all()

    def _close(self) -> None:
        _LIVE.discard(self)
        stop_helpers = getattr(self._spawner, "stop_helpers", None)
        if stop_helpers is not None:  # what the spawner keeps to start workers (a zygote)
            stop_helpers()
        with self._lock:
            self._closed = True
            self._lent = None
            os.close(self._inbox.fd)
        self._socket.close()
        self._poller.close()

    # ------------------------------------------------ policy: for subclasses
    def _on_start(self) -> None:
        """First thing in the manager thread (start workers here: see the docstring)."""

    def _on_timer(self) -> None:
        """``self._timer`` has come."""

    def _on_connection_lost(self, worker: Worker) -> None:
        """A send to ``worker`` failed: give it no more calls (its end follows)."""

    def _schedule(self) -> None:
        """Start pending tasks on workers as the policy allows."""
        raise NotImplementedError

    def _on_first_call(self, worker: Worker) -> None:
        """A call is about to be sent to idle ``worker``."""

    def _lendable(self) -> Worker | None:
        """An idle worker on a socket that the next call may go to directly from
        submit() (see the module docstring), or None: then it goes through the queue."""
        return None

    def _on_connected(self, worker: Worker) -> None:
        raise NotImplementedError

    def _on_ready(self, worker: Worker) -> None:
        raise NotImplementedError

    def _on_task_done(self, worker: Worker) -> None:
        raise NotImplementedError

    def _on_worker_gone(self, worker: Worker) -> None:
        raise NotImplementedError

    def _on_start_failure(self, error: Exception, worker_id: int) -> None:
        """A spawner raised while starting worker ``worker_id`` (its task, if it had
        one, already failed)."""


def _stop_all_at_exit() -> None:
    """At interpreter exit, finish what was submitted and stop every worker (like the
    standard library's pools), so no worker outlives a script that never called
    ``shutdown()``."""
    for scheduler in list(_LIVE):
        scheduler.shutdown(wait=True, cancel_futures=False)


threading._register_atexit(_stop_all_at_exit)  # type: ignore[attr-defined]
