"""The elastic pool: which worker takes which call, when worker jobs start and end.

A worker job hosts ``workers_per_job`` workers (N; default 1); ``min_workers`` and
``max_workers`` count workers, in steps of N. Every round of the manager thread (after
any event: a call, a message, a job's state change, the alarm) runs, in this order::

    dispatch  pending calls -> ready workers with room (placement.py; a call that declares
              run_time_max: a worker idle now whose job has that much time left + margin)
    retire    (retire.py) a ready worker whose job ends within the margin: STOP once idle;
              a job whose workers are all idle for idle_timeout while no call waits:
              STOP them all (never below min_workers); surplus after a resize: idle jobs
              first, else the least busy jobs drain (no new call; each worker stops
              when its calls are done);
              a job still PENDING after pending_timeout: scancel, with squeue's reason;
              a pending job nobody needs for idle_timeout: scancel
    grow      one job per N waiting calls beyond the workers still starting, up to
              max_workers (and at least min_workers)
    alarm     set to the next deadline of the above

No grow/shrink loop: growth is driven only by calls that wait, shrinking only happens
while none waits (or max_workers was lowered); a pending job counts as capacity that is
coming (it keeps the pool from submitting more), never as idle. After a pending timeout
the pool submits no new job for one more pending_timeout, or until one of its jobs ends
(the queue is full: another job would wait too); calls waiting while the pool has no
worker at all fail with the reason. A job ends when its last worker has stopped.

A worker job that ends while it holds calls (scancel, preemption, time limit, a lost
node, one of its workers crashing) fails over the calls of all its workers: each call
that was running runs again elsewhere up to ``max_retries`` times, else fails with
WorkerDiedError naming the job, node and Slurm's reason; calls sent ahead that were
never started go back to the queue. The lost workers' connections are forgotten, so a
late result of a first attempt is dropped unread: no result twice. ``restart_limit``:
after that many jobs lost while running, the pool gives up (its calls fail).
"""

from __future__ import annotations

import logging
import math
import select
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from executorlib import serialize
from executorlib.dependencies import settle
from executorlib.errors import WorkerDiedError, with_remote_traceback
from executorlib.interactive import protocol
from executorlib.interactive.scheduler import ResultCache, Scheduler, Worker
from executorlib.pilot.alarm import Alarm
from executorlib.pilot.job import PilotJob, PilotSpawner
from executorlib.pilot.placement import CALLS_PER_WORKER, PoolPolicy, batch_after, choose, claim
from executorlib.pilot.retire import Retirement
from executorlib.pilot.status import worker_rows, write_status
from executorlib.resources import Resources
from executorlib.task import Task

_log = logging.getLogger("executorlib")
_START_FAILURES_BEFORE_BROKEN = 3  # jobs in a row that ended before their worker connected
_STATUS_EVERY_S = 1.0  # status.json (for `executorlib status`) at most this often


class PilotScheduler(Retirement, Scheduler):
    """Calls on worker jobs that this pool submits, grows, shrinks and replaces."""

    def __init__(self, spawner: PilotSpawner, resources: Resources, policy: PoolPolicy,
                 init_function: Callable[[], dict] | None = None, cache: ResultCache | None = None) -> None:
        super().__init__(spawner, spawner.bind_host, cache)
        self._resources, self._policy = resources, policy
        self._max_workers = policy.max_workers  # resize() changes it from any thread
        self._init_frames = serialize.dumps(init_function, by_value=True) if init_function else None
        self._attempts: dict[Task, int] = {}
        self._draining: set[PilotJob] = set()  # surplus jobs that take no new call
        self._lost_jobs = 0
        self._broken: BaseException | None = None
        self._start_failures = 0
        self._blocked: tuple[float, str] | None = None  # (until, why) after a pending timeout
        self._demand_gone = time.monotonic()  # since when no call waits
        self._status_due: float | None = time.monotonic()  # when to write status.json next
        self._status_written = -math.inf
        self._alarm = Alarm()
        self._poller.register(self._alarm.fd, select.POLLIN)

    # ----------------------------------------------------------------- any thread
    def resize(self, max_workers: int) -> None:
        """Change max_workers while the pool runs (idle surplus workers stop at once)."""
        with self._lock:
            self._max_workers = max_workers
        self._wake()

    def jobs(self) -> list[dict[str, Any]]:
        """The pool's workers now, each with its job (a snapshot from the manager's records)."""
        return worker_rows(_snapshot(self._workers))

    # ------------------------------------------------------------ manager thread
    def _handle(self, source: Any, mask: int) -> None:
        if source == self._alarm.fd:
            self._alarm.clear()
            return
        if source in self._fd_owner:  # a job's state changed
            self._changed()
        super()._handle(source, mask)

    def _schedule(self) -> None:
        if self._broken is not None:
            while self._pending:
                settle(self._pending.popleft().future, exception=self._broken_error())
        else:
            self._dispatch()
        now = time.monotonic()
        if self._pending:
            self._demand_gone = math.inf
        elif self._demand_gone == math.inf:
            self._demand_gone = now
        if self._broken is None:
            if not self._stopping:
                self._retire(now)
                self._make_room()
            self._grow(now)  # also while stopping: a call put back after a lost worker
        self._write_status(now)
        self._alarm.set(None if self._stopping else self._next_deadline(now))

    def _changed(self) -> None:
        """Something `executorlib status` shows has changed: write it out soon."""
        if self._status_due is None:
            self._status_due = max(time.monotonic(), self._status_written + _STATUS_EVERY_S)

    def _write_status(self, now: float) -> None:
        if self._status_due is None or now < self._status_due:
            return
        self._status_due, self._status_written = None, now
        try:
            write_status(self._spawner.settings.output_directory, self._max_workers, self.jobs())
        except OSError as error:  # the folder was removed under us: nothing to show
            _log.debug("executorlib: cannot write the pool's status: %s", error)

    # ---------------------------------------------------------------- dispatch
    def _dispatch(self) -> None:
        ready = [w for w in self._workers.values() if w.ready and not w.stopping
                 and w.process.job not in self._draining and not w.process.job.status.final]
        # a worker of a running job is about to connect: squeue says RUNNING, or a worker
        # of the same job already connected (before the watcher's next squeue)
        started = {id(w.process.job) for w in self._workers.values() if w.ready}
        connecting = any(not w.ready and not w.stopping and (w.process.job.status.state == "RUNNING"
                                                             or id(w.process.job) in started)
                         for w in self._workers.values())
        room = 1 if connecting else CALLS_PER_WORKER  # a connecting worker takes it in a moment
        skipped: deque[Task] = deque()
        while self._pending and any(len(w.tasks) < room for w in ready):
            task = self._pending.popleft()
            if task.future.done():
                continue
            worker = choose(ready, task, self._policy.end_margin, room)
            if worker is None:
                skipped.append(task)
            elif claim(task):
                batch = batch_after(task, self._pending, len(ready), self._resources)
                self._send_calls(worker, [task, *batch])
                if worker.stopping:  # its connection was gone: the calls are back in the queue
                    ready.remove(worker)
        self._pending.extendleft(reversed(skipped))

    def _stop(self, worker: Worker, why: str) -> None:
        """End a worker: STOP if connected (its job then completes), else scancel."""
        worker.stopping = True
        self._changed()
        job: PilotJob = worker.process.job
        if worker.peer is None:
            job.stop(why)
            return
        job.cancel_reason = why
        try:
            self._socket.send(worker.peer, protocol.STOP)
        except OSError:  # ConnectionError: its connection is gone
            job.stop(why)
        job.kick()

    # -------------------------------------------------------------------- grow
    def _grow(self, now: float) -> None:
        per_job = self._policy.workers_per_job
        workers = list(self._workers.values())
        active = [w for w in workers if not w.stopping]
        starting = sum(1 for w in active if not w.ready)
        # While stopping, only calls put back after a lost worker may need a new one.
        wanted = -1 if self._stopping else self._policy.min_workers - len(active)
        if self._blocked is not None and (now >= self._blocked[0]):
            self._blocked = None
        if self._blocked is None:
            wanted = max(wanted, len(self._pending) - starting)
        for _ in range(min(math.ceil(wanted / per_job), (self._max_workers - len(workers)) // per_job)):
            self._changed()
            if not self._spawn_job(per_job):
                return

    def _spawn_job(self, size: int) -> bool:
        """Submit one job of ``size`` workers; False if starting one failed."""
        with self._spawner.one_job():
            return all(self._spawn(self._resources) is not None for _ in range(size))

    def _next_deadline(self, now: float) -> float | None:
        policy, deadlines = self._policy, []
        for worker in self._workers.values():
            job: PilotJob = worker.process.job
            if worker.stopping:
                continue
            if worker.ready and not worker.tasks:
                deadlines.append(now + job.time_left() - policy.end_margin)
                if policy.idle_timeout is not None:
                    deadlines.append(worker.process.idle_since + policy.idle_timeout)
            elif job.pending:
                if policy.pending_timeout is not None:
                    deadlines.append(now + job.submitted + policy.pending_timeout - time.time())
                if policy.idle_timeout is not None and math.isfinite(self._demand_gone):
                    deadlines.append(self._demand_gone + policy.idle_timeout)
        if self._blocked is not None:
            deadlines.append(self._blocked[0])
        if self._status_due is not None:
            deadlines.append(self._status_due)
        # A deadline already past was acted on this round (or its condition does not hold).
        future = [d for d in deadlines if now < d < math.inf]
        return min(future) + 0.01 if future else None

    # ------------------------------------------------------------- the workers
    def _on_connected(self, worker: Worker) -> None:
        if worker.stopping:
            self._socket.send(worker.peer, protocol.STOP)
            return
        self._start_failures = 0
        worker.process.job.connected = True
        if self._init_frames is None:
            self._on_ready(worker)
        else:
            self._socket.send(worker.peer, protocol.INIT, self._init_frames)

    def _on_ready(self, worker: Worker) -> None:
        self._changed()
        worker.ready = True
        worker.process.idle_since = time.monotonic()

    def _on_task_done(self, worker: Worker) -> None:
        worker.process.calls_done += 1
        self._changed()
        if not worker.tasks:
            worker.process.idle_since = time.monotonic()

    def _on_message(self, peer: Any, kind: bytes, frames: list) -> None:
        worker = self._workers.get(peer.worker_id)
        if kind == protocol.FAILURE and worker is not None and not worker.ready:
            self._broken = _init_error(worker, frames)
            self._stop(worker, "its init_function failed")
            return
        super()._on_message(peer, kind, frames)

    def _on_exit(self, worker: Worker) -> None:
        """Fail over the calls of a worker job that ended while holding them."""
        if worker.tasks:
            running, *never_started = worker.tasks
            worker.tasks.clear()
            self._pending.extendleft(reversed(never_started))
            if not self._retry(worker, running):
                worker.tasks.append(running)  # the base class fails it with the job's account
        super()._on_exit(worker)

    def _retry(self, worker: Worker, task: Task) -> bool:
        attempts = self._attempts.get(task, 0) + 1
        if attempts > self._policy.max_retries or task.future.done() or self._broken is not None:
            self._attempts.pop(task, None)
            return False
        self._attempts[task] = attempts
        task.future.add_done_callback(lambda _: self._attempts.pop(task, None))
        _log.warning("executorlib: %s, while running %s; running it again (retry %d of %d)",
                     worker.process.how_it_ended().split("; last lines")[0], task.name,
                     attempts, self._policy.max_retries)
        self._pending.appendleft(task)
        return True

    def _on_worker_gone(self, worker: Worker) -> None:
        self._changed()
        self._blocked = None  # one of our jobs ended: the queue has room again
        job: PilotJob = worker.process.job
        self._draining.discard(job)
        if self._stopping or self._broken is not None or job.reported:
            return
        job.reported = True  # the first of its workers to go accounts for the job
        if job.refusal is not None:  # sbatch said no: it will say no again
            self._broken = job.refusal
        elif not job.connected and not worker.stopping:
            self._start_failures += 1
            if self._start_failures >= _START_FAILURES_BEFORE_BROKEN:
                self._broken = WorkerDiedError(
                    f"{self._start_failures} worker jobs in a row ended before their worker "
                    f"connected; the last: {job.how_it_ended()}"
                )
        elif job.connected and job.cancel_reason is None:
            self._count_lost(job)

    def _count_lost(self, job: PilotJob) -> None:
        """A job lost while running (not ended by us): give up after ``restart_limit``."""
        self._lost_jobs += 1
        limit = self._policy.restart_limit
        if limit is not None and self._lost_jobs > limit:
            self._broken = WorkerDiedError(
                f"restart_limit={limit} reached: {self._lost_jobs} worker jobs were lost while "
                f"running, the last: {job.how_it_ended()}; raise restart_limit (None: no limit) "
                "or find out why the jobs end (sacct -j JOBID)"
            )

    def _on_start_failure(self, error: Exception) -> None:
        self._broken = error

    def _broken_error(self) -> BaseException:
        error = WorkerDiedError(f"the pilot pool cannot start workers: {self._broken}")
        error.__cause__ = self._broken
        return error

    def _close(self) -> None:
        super()._close()
        self._alarm.close()
        self._spawner.close()


def _init_error(worker: Worker, frames: list) -> BaseException:
    """init_function's exception, from the worker's FAILURE (a clear error if it won't unpickle)."""
    try:
        failure = serialize.loads(frames)
        return with_remote_traceback(failure.exception, failure.traceback)
    except Exception as error:
        reason = RuntimeError(
            f"init_function failed on {worker.describe()} (Slurm job {worker.process.job.job_id}), and its "
            f"exception could not be unpickled here ({type(error).__name__}: {error}); make it picklable"
        )
        reason.__cause__ = error
        return reason


def _snapshot(workers: dict[int, Worker]) -> list[Worker]:
    """The workers, read from another thread than the manager that changes the dict."""
    while True:
        try:
            return list(workers.values())
        except RuntimeError:  # changed size during iteration: read again
            continue
