"""Block allocation: a fixed set of long-lived workers, each serving call after call.

No call waits long behind another while a worker is idle. A call handed to a busy
worker cannot be taken back when another worker falls idle (a worker reads its next
message only when its call returns), so a quick call could wait minutes behind a long
one. A worker is therefore sent a call ahead (so it never sits idle between calls; the
standard library's pool queues ahead the same way, and such a call counts as running
and can no longer be cancelled) only where waiting behind it is harmless: in a pool of
one worker, where no one else could run the call, or behind calls of functions whose
last run here took under 5 ms (as its worker reports it: on a busy machine the time
until the result arrives is longer). The same rule lets a long queue of such calls
travel eight to a message, which halves the messages per call; each result still comes
back on its own.

With more workers on this machine than it has cores, runnable workers only take CPU time
from each other and from the manager thread (the kernel shares the cores out among all
of them), so short calls stay on as many busy workers as there are cores: once each core
has a busy worker, a short call goes ahead to one of them (a long queue in batches, as
with that many workers) rather than wake another, as long as their calls are short ones
that began under 5 ms ago. Otherwise, and at the latest 5 ms later, it goes to an idle
worker, and with more busy workers than cores calls spread as usual: a function that
was short and turns slow delays at most one call per core (and a batch), sent ahead.

When a worker dies, the call it was running fails; calls sent ahead that it never
started go back to the queue (scheduler.py).

``init_function`` runs once per worker when it connects; a worker is idle only after
that. Workers are numbered 0 ... size-1 (a function that declares a parameter
``executorlib_worker_id`` receives the number; worker.py); a worker that ends is
replaced under its number, up to ``restart_limit`` times (None: always). ``resize``
changes the size of a running pool: more starts workers; fewer stops idle workers first
and busy ones after their call, so no call is lost or run twice (numbers then stay
unique, below the largest size the pool had). Starting one may fail for a moment (too many open
files): the pool tries again, backing off, and is broken only after several failures
in a row, as when workers die before they ever connect, or ``init_function`` fails:
every queued and later call then fails with the reason instead of waiting for a worker
that will never come.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from executorlib import serialize
from executorlib.dependencies import claim, settle
from executorlib.errors import WorkerDiedError, with_remote_traceback
from executorlib.interactive import protocol
from executorlib.interactive.scheduler import ResultCache, Scheduler, Spawner, Worker
from executorlib.resources import Resources

_START_FAILURES_BEFORE_BROKEN = 5  # in a row: failed spawns and workers dead before connecting
_RETRY_FIRST_S = 0.1  # back-off before the next start, doubled per failure: 0.1 ... 1.6 s
_CALLS_AHEAD = 1  # a lone worker gets one call beyond the one it runs
_MAX_BATCH = 8  # calls in one message when many wait
_SHORT_S = 0.005  # a function whose last call took less may have calls queued behind it
_log = logging.getLogger("executorlib")


class PoolScheduler(Scheduler):
    """``size`` workers with the same ``resources``; calls go to whichever is idle."""

    def __init__(
        self, spawner: Spawner, resources: Resources, size: int,
        init_function: Callable[[], dict] | None = None, host: str | None = None,
        cache: ResultCache | None = None, restart_limit: int | None = None,
    ) -> None:
        super().__init__(spawner, host, cache)
        self._resources = resources
        self._size = self._requested_size = size
        self._restart_limit = restart_limit
        self._restarts = 0
        self._retiring: set[Worker] = set()  # to stop once their calls are done
        self._init_frames = serialize.dumps(init_function, by_value=True) if init_function else None
        self._ready: list[Worker] = []
        self._broken: BaseException | None = None
        self._start_failures = 0
        self._missing: set[int] = set()  # worker numbers to start when the back-off timer comes
        self._short: dict[str, bool] = {}  # function name -> its last call took < _SHORT_S
        self._cores = _machine_cores(spawner)  # None: workers elsewhere (srun, Flux)
        self._restart_at: float | None = None  # when the back-off before a restart ends
        self._head_since: dict[int, float] = {}  # worker id -> when its current call began

    @property
    def size(self) -> int:
        """The number of workers the pool keeps (or is about to keep, after a resize)."""
        return self._requested_size

    def resize(self, size: int) -> None:
        """Keep ``size`` workers from now on (any thread; done by the manager thread)."""
        self._requested_size = size
        self.run_in_manager(lambda: self._resize(size))

    def _on_start(self) -> None:
        self._fill()

    def _fill(self) -> None:
        """Start workers until ``size`` run or start, under the lowest free numbers."""
        active = sum(w not in self._retiring for w in self._workers.values()) + len(self._missing)
        free = (i for i in itertools.count() if i not in self._workers and i not in self._missing)
        for _ in range(self._size - active):
            self._start(next(free))

    def _start(self, worker_id: int) -> None:
        self._missing.discard(worker_id)
        if self._broken is None and not self._done():
            self._spawn(self._resources, worker_id=worker_id)

    def _done(self) -> bool:
        """Shutting down with no call left to run: no worker needs replacing."""
        return self._stopping and not self._pending

    def _resize(self, size: int) -> None:
        self._size = size
        live = [w for w in self._workers.values() if w not in self._retiring and not w.stopping]
        surplus = len(live) + len(self._missing) - size
        while surplus > 0 and self._missing:  # not started yet: simply not started
            self._missing.discard(max(self._missing))
            surplus -= 1
        for worker in sorted(live, key=lambda w: (bool(w.tasks), w.ready))[:max(0, surplus)]:
            self._retire(worker)  # idle ones first, then those still starting, then busy
        self._fill()

    def _retire(self, worker: Worker) -> None:
        """Give ``worker`` no more calls; stop it once it holds none."""
        self._on_connection_lost(worker)
        self._retiring.add(worker)
        if worker.peer is None:
            worker.stopping = True
            worker.process.stop()
        elif not worker.tasks:
            worker.stopping = True
            self._send(worker, protocol.STOP)

    def _schedule(self) -> None:
        if self._broken is not None:
            while self._pending:
                settle(self._pending.popleft().future, exception=self._broken_error())
            return
        while self._pending and (worker := self._least_busy()) is not None:
            batch = []
            size = self._batch_size()
            while self._pending and len(batch) < size:
                task = self._pending.popleft()
                if claim(task.future):
                    batch.append(task)
            self._send_calls(worker, batch)

    def _on_first_call(self, worker: Worker) -> None:
        self._head_since[worker.worker_id] = time.monotonic()

    def _lendable(self) -> Worker | None:
        """An idle worker on a socket, unless the pool is broken or stopping, or (with
        more workers than cores) each core already has a busy worker: then the next
        call may belong behind one of them (:meth:`_least_busy`)."""
        if self._broken is not None or self._stopping:
            return None
        idle = None
        busy = 0
        for worker in self._ready:
            if worker.tasks:
                busy += 1
            elif idle is None and worker.peer is not None and worker.peer.routing_id is None:
                idle = worker
        if self._cores is not None and busy >= self._cores:
            return None
        return idle

    def _batch_size(self) -> int:
        """Calls per message: _MAX_BATCH while at least twice that many wait per worker
        and waiting behind each other is harmless (see the module docstring), else one;
        MPI workers take one call at a time."""
        if self._resources.cores > 1:
            return 1
        share = len(self._pending) // max(1, min(len(self._ready), self._cores or len(self._ready)))
        if share < 2 * _MAX_BATCH:
            return 1
        head = itertools.islice(self._pending, _MAX_BATCH)
        return _MAX_BATCH if self._size == 1 or all(self._short.get(t.name) for t in head) else 1

    def _least_busy(self) -> Worker | None:
        """An idle worker, else one that may take a call ahead (see the module docstring)."""
        worker = min(self._ready, key=lambda w: len(w.tasks), default=None)
        if worker is None or worker.tasks:
            return worker if worker is not None and self._may_wait_behind(worker) else None
        if self._cores is None or not self._short.get(self._pending[0].name):
            return worker
        hot = [w for w in self._ready if w.tasks]
        return self._hot_worker(hot, worker) if len(hot) == self._cores else worker

    def _hot_worker(self, hot: list[Worker], idle: Worker) -> Worker | None:
        """Each core of this machine has one busy worker and the next call is short: a busy
        worker that takes it ahead, else None (held back, at most ``_SHORT_S``), while
        their calls are short ones that began less than ``_SHORT_S`` ago; else ``idle``.
        (Once more workers are busy than there are cores, calls spread again: so no more
        calls than cores ever wait behind a short function that turned slow.)"""
        now = time.monotonic()
        fresh = [w for w in hot if self._may_wait_behind(w, now)]
        if fresh:
            return min(fresh, key=lambda w: len(w.tasks))
        short = [w for w in hot if self._may_wait_behind(w, now, ahead=len(w.tasks))]
        if not short:
            return idle
        self._wake_at(min(self._head_since.get(w.worker_id, now) for w in short) + _SHORT_S)
        return None

    def _may_wait_behind(self, worker: Worker, now: float | None = None, ahead: int = _CALLS_AHEAD) -> bool:
        """Whether busy ``worker`` may take a call ahead (up to ``ahead`` waiting); with
        ``now``, only while its current call began less than ``_SHORT_S`` ago."""
        if len(worker.tasks) > ahead:
            return False
        if now is not None and now - self._head_since.get(worker.worker_id, now) >= _SHORT_S:
            return False
        return self._size == 1 or all(self._short.get(t.name) for t in worker.tasks)

    def _measure(self, worker: Worker) -> None:
        """A result of ``worker``'s oldest call arrived: note whether that function is
        short (by the time the worker reports it ran: on a busy machine the time until
        its result is here is longer); its next call (if sent ahead) begins now."""
        now = time.monotonic()
        seconds = worker.peer.seconds if worker.peer is not None else None
        if seconds is None:
            seconds = now - self._head_since.get(worker.worker_id, now)
        self._short[worker.tasks[0].name] = seconds < _SHORT_S
        self._head_since[worker.worker_id] = now

    def _on_connected(self, worker: Worker) -> None:
        self._start_failures = 0
        if self._init_frames is None:
            self._on_ready(worker)
        else:
            self._send(worker, protocol.INIT, self._init_frames)

    def _on_ready(self, worker: Worker) -> None:
        worker.ready = True
        if worker not in self._retiring:
            self._ready.append(worker)

    def _on_task_done(self, worker: Worker) -> None:
        """The worker takes the next call in ``_schedule``, or stops if it retires."""
        if worker in self._retiring and not worker.tasks and not worker.stopping:
            worker.stopping = True
            self._send(worker, protocol.STOP)

    def _on_message(self, peer: Any, kind: bytes, frames: list) -> None:
        worker = self._workers.get(peer.worker_id)
        if kind == protocol.FAILURE and worker is not None and not worker.ready:
            self._broken = _init_error(worker, frames)
            worker.process.stop()
            return
        if kind in (protocol.RESULT, protocol.FAILURE) and worker is not None and worker.tasks:
            self._measure(worker)
        super()._on_message(peer, kind, frames)

    def _on_connection_lost(self, worker: Worker) -> None:
        if worker in self._ready:
            self._ready.remove(worker)

    def _on_worker_gone(self, worker: Worker) -> None:
        self._on_connection_lost(worker)
        if worker in self._retiring or self._done() or self._broken is not None:
            self._retiring.discard(worker)
            return
        if worker.peer is None:
            self._count_start_failure(
                f"workers ended before connecting; the last: {worker.describe()} "
                f"{worker.process.how_it_ended()}", worker_id=worker.worker_id,
            )
        elif self._restart_limit is not None and self._restarts >= self._restart_limit:
            self._broken = WorkerDiedError(
                f"restart_limit={self._restart_limit} reached: {worker.describe()} ended "
                f"({worker.process.how_it_ended()}) after {self._restarts} replacements"
            )
        else:
            self._restarts += 1
            self._fill()

    def _on_start_failure(self, error: Exception, worker_id: int | None = None) -> None:
        self._count_start_failure(
            f"starting a worker failed: {type(error).__name__}: {error}", error, worker_id
        )

    def _count_start_failure(
        self, what: str, error: Exception | None = None, worker_id: int | None = None
    ) -> None:
        """Start a worker again after a back-off; broken after too many failures in a row."""
        self._start_failures += 1
        if self._start_failures >= _START_FAILURES_BEFORE_BROKEN:
            self._broken = WorkerDiedError(f"{self._start_failures} times in a row {what}")
            self._broken.__cause__ = error
            return
        delay = _RETRY_FIRST_S * 2 ** (self._start_failures - 1)
        _log.warning("executorlib: %s; trying again in %.1f s (%d of %d)", what, delay,
                     self._start_failures, _START_FAILURES_BEFORE_BROKEN)
        if worker_id is not None:
            self._missing.add(worker_id)
        if self._restart_at is None:
            self._restart_at = time.monotonic() + delay
            self._wake_at(self._restart_at)

    def _wake_at(self, when: float) -> None:
        """Have the manager run ``_on_timer`` (and schedule again) at ``when`` or before."""
        self._timer = when if self._timer is None else min(self._timer, when)

    def _on_timer(self) -> None:
        """Start the workers whose back-off is over; the loop then schedules again (calls
        held back for busy workers' short calls: :meth:`_hot_worker`)."""
        if self._restart_at is None:
            return
        if time.monotonic() < self._restart_at:
            self._wake_at(self._restart_at)
            return
        self._restart_at = None
        missing, self._missing = sorted(self._missing), set()
        for worker_id in missing:
            if worker_id not in self._workers:
                self._start(worker_id)

    def _broken_error(self) -> BaseException:
        error = WorkerDiedError(f"the worker pool cannot start workers: {self._broken}")
        error.__cause__ = self._broken
        return error


def _init_error(worker: Worker, frames: list) -> BaseException:
    """init_function's exception from its FAILURE (a clear error if it won't unpickle)."""
    try:
        failure = serialize.loads(frames)
        return with_remote_traceback(failure.exception, failure.traceback)
    except BaseException as error:  # noqa: BLE001 - reported as the pool's reason
        reason = RuntimeError(
            f"init_function failed on {worker.describe()}, and its exception could not be "
            f"unpickled here ({type(error).__name__}: {error}); make the exception "
            "picklable, or catch it inside init_function"
        )
        reason.__cause__ = error
        return reason


def _machine_cores(spawner: Spawner) -> int | None:
    """The CPUs this process may use, for workers on this machine; None for others."""
    return len(os.sched_getaffinity(0)) if spawner.name == "local" else None
