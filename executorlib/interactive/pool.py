"""Block allocation: a fixed set of long-lived workers, each serving call after call.

While every worker is busy and calls wait, each worker is sent one call ahead, so it
never sits idle between calls (the standard library's pool queues ahead the same way);
that call counts as running and can no longer be cancelled. While a long queue waits (at
least 16 calls per worker), calls travel eight to a message, which halves the messages
per call; each result still comes back on its own as soon as it is there.

``init_function`` runs once per worker when it connects; a worker is idle only after
that. A worker that ends is replaced. If workers die before they ever connect, or
``init_function`` fails, the pool is broken: every queued and later call fails with the
reason instead of waiting for a worker that will never come.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from executorlib import serialize
from executorlib.dependencies import settle
from executorlib.errors import WorkerDiedError, with_remote_traceback
from executorlib.interactive import protocol
from executorlib.interactive.scheduler import ResultCache, Scheduler, Spawner, Worker
from executorlib.resources import Resources

_START_FAILURES_BEFORE_BROKEN = 3
_CALLS_PER_WORKER = 2  # a worker gets more once it holds fewer calls than this
_MAX_BATCH = 8  # calls in one message when many wait


class PoolScheduler(Scheduler):
    """``size`` workers with the same ``resources``; calls go to whichever is idle."""

    def __init__(
        self, spawner: Spawner, resources: Resources, size: int,
        init_function: Callable[[], dict] | None = None, host: str | None = None,
        cache: ResultCache | None = None,
    ) -> None:
        super().__init__(spawner, host, cache)
        self._resources = resources
        self._size = size
        self._init_frames = serialize.dumps(init_function, by_value=True) if init_function else None
        self._ready: list[Worker] = []
        self._broken: BaseException | None = None
        self._start_failures = 0

    def start(self) -> None:
        for _ in range(self._size):
            self._spawn(self._resources)
        super().start()

    def _schedule(self) -> None:
        if self._broken is not None:
            while self._pending:
                settle(self._pending.popleft().future, exception=self._broken_error())
            return
        while self._pending and (worker := self._least_busy()) is not None:
            batch = []
            while self._pending and len(batch) < self._batch_size():
                task = self._pending.popleft()
                if task.future.set_running_or_notify_cancel():
                    batch.append(task)
            self._send_calls(worker, batch)

    def _batch_size(self) -> int:
        """Calls per message: _MAX_BATCH while at least twice that many wait per worker
        (a long queue of calls), else one; MPI workers take one call at a time."""
        if self._resources.cores > 1:
            return 1
        share = len(self._pending) // max(1, len(self._ready))
        return _MAX_BATCH if share >= 2 * _MAX_BATCH else 1

    def _least_busy(self) -> Worker | None:
        worker = min(self._ready, key=lambda w: len(w.tasks), default=None)
        return worker if worker is not None and len(worker.tasks) < _CALLS_PER_WORKER else None

    def _on_connected(self, worker: Worker) -> None:
        self._start_failures = 0
        if self._init_frames is None:
            self._on_ready(worker)
        else:
            self._socket.send(worker.peer, protocol.INIT, self._init_frames)

    def _on_ready(self, worker: Worker) -> None:
        worker.ready = True
        self._ready.append(worker)

    def _on_task_done(self, worker: Worker) -> None:
        """The worker takes the next call in ``_schedule``."""

    def _on_message(self, peer: Any, kind: bytes, frames: list) -> None:
        worker = self._workers.get(peer.worker_id)
        if kind == protocol.FAILURE and worker is not None and not worker.ready:
            failure = serialize.loads(frames)  # init_function raised
            self._broken = with_remote_traceback(failure.exception, failure.traceback)
            worker.process.stop()
            return
        super()._on_message(peer, kind, frames)

    def _on_worker_gone(self, worker: Worker) -> None:
        if worker in self._ready:
            self._ready.remove(worker)
        if self._stopping or self._broken is not None:
            return
        if worker.peer is None:
            self._start_failures += 1
            if self._start_failures >= _START_FAILURES_BEFORE_BROKEN:
                self._broken = WorkerDiedError(
                    f"{_START_FAILURES_BEFORE_BROKEN} workers in a row ended before connecting; "
                    f"the last: {worker.describe()} {worker.process.how_it_ended()}"
                )
                return
        self._spawn(self._resources)

    def _on_start_failure(self, error: Exception) -> None:
        self._broken = error

    def _broken_error(self) -> BaseException:
        error = WorkerDiedError(f"the worker pool cannot start workers: {self._broken}")
        error.__cause__ = self._broken
        return error
