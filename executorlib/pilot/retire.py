"""When the pool's worker jobs end: the ``retire`` step of each round (see pool.py).

A job ends when all its workers are idle for ``idle_timeout`` while no call waits (never
below ``min_workers``), when it is surplus after a resize (idle jobs first, else the least
busy drain: they take no new call and each worker stops when its calls are done), when
its end is within the margin, when it is still PENDING after ``pending_timeout``, when
nobody needs it while it is pending, or to make room for a call no job has time for.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from executorlib.dependencies import settle
from executorlib.errors import WorkerDiedError
from executorlib.interactive.scheduler import Worker
from executorlib.pilot.placement import PoolPolicy

if TYPE_CHECKING:
    from executorlib.pilot.job import PilotJob
    from executorlib.task import Task

_log = logging.getLogger("executorlib")


class Retirement:
    """The retire step, mixed into PilotScheduler (which owns the state it reads)."""

    _policy: PoolPolicy
    _workers: dict[int, Worker]
    _pending: deque[Task]
    _max_workers: int
    _draining: set[PilotJob]
    _blocked: tuple[float, str] | None
    _demand_gone: float

    def _stop(self, worker: Worker, why: str) -> None:
        raise NotImplementedError

    def _groups(self) -> dict[PilotJob, list[Worker]]:
        """The pool's jobs, each with its workers that are not stopping."""
        groups: dict[PilotJob, list[Worker]] = {}
        for worker in self._workers.values():
            if not worker.stopping:
                groups.setdefault(worker.process.job, []).append(worker)
        return groups

    def _retire(self, now: float) -> None:
        policy, groups = self._policy, self._groups()
        active = sum(map(len, groups.values()))
        surplus = active - max(policy.min_workers, min(self._max_workers, active))
        for job, workers in groups.items():
            if all(w.ready and not w.tasks for w in workers):
                if job.time_left() < policy.end_margin:
                    self._stop_all(workers, "its job ends within the margin")
                elif surplus > 0 or self._idle_too_long(workers, now, active - len(workers)):
                    self._stop_all(workers, "idle")
                    surplus, active = surplus - len(workers), active - len(workers)
            elif not job.connected and job.pending:
                if self._pending_too_long(job):
                    self._on_pending_timeout(workers, now)
                    active -= len(workers)
                elif surplus > 0 or self._unneeded(now, active - len(workers)):
                    self._stop_all(workers, "no call needs it any more")
                    surplus, active = surplus - len(workers), active - len(workers)
            else:
                self._stop_all([w for w in workers if w.ready and not w.tasks and (
                    job in self._draining or job.time_left() < policy.end_margin)], "its job ends")
        self._drain(groups, surplus)

    def _drain(self, groups: dict[PilotJob, list[Worker]], surplus: int) -> None:
        """Surplus left after a resize, all busy: the least busy jobs take no new call."""
        if surplus <= 0:
            self._draining.clear()  # max_workers was raised again: they may serve on
            return
        surplus -= sum(len(groups.get(job, ())) for job in self._draining)
        busy = sorted((j for j in groups if j not in self._draining and j.connected),
                      key=lambda j: sum(len(w.tasks) for w in groups[j]))
        for job in busy:
            if surplus <= 0:
                return
            self._draining.add(job)
            surplus -= len(groups[job])

    def _make_room(self) -> None:
        """A full pool whose jobs all have too little time left for a waiting call that
        declares run_time_max: stop one idle job, so that a fresh job can start."""
        workers = list(self._workers.values())
        full = len(workers) + self._policy.workers_per_job > self._max_workers
        if not (self._pending and full) or any(w.stopping for w in workers):
            return
        idle = [job for job, group in self._groups().items() if all(w.ready and not w.tasks for w in group)]
        if not idle:
            return  # checked first: a busy pool never scans its queue here
        longest = max((t.resources.run_time_max or 0 for t in self._pending), default=0)
        if not longest:
            return
        needed = longest + self._policy.end_margin
        if any(w.process.job.time_left() >= needed for w in workers):
            return  # a worker that can take it exists; the call waits for it
        job = min(idle, key=lambda j: j.time_left())
        self._stop_all(self._groups()[job], f"a call needs {longest} s")

    def _stop_all(self, workers: list[Worker], why: str) -> None:
        for worker in workers:
            self._stop(worker, why)

    def _idle_too_long(self, workers: list[Worker], now: float, others: int) -> bool:
        """All of a job's ``workers`` idle for idle_timeout, and ``others`` enough without them."""
        timeout = self._policy.idle_timeout
        idle_since = max(w.process.idle_since for w in workers)
        return (timeout is not None and not self._pending and others >= self._policy.min_workers
                and now - idle_since >= timeout)

    def _unneeded(self, now: float, others: int) -> bool:
        timeout = self._policy.idle_timeout
        return (timeout is not None and others >= self._policy.min_workers
                and now - self._demand_gone >= timeout)

    def _pending_too_long(self, job: PilotJob) -> bool:
        timeout = self._policy.pending_timeout
        return timeout is not None and time.time() - job.submitted >= timeout

    def _on_pending_timeout(self, workers: list[Worker], now: float) -> None:
        job: PilotJob = workers[0].process.job
        status = job.status
        why = (
            f"Slurm job {job.job_id or '(not yet submitted)'} (workers "
            f"{', '.join(str(w.worker_id) for w in workers)}) was still PENDING after "
            f"pending_timeout={self._policy.pending_timeout:g} s in partition "
            f"{status.partition or '(default)'} (squeue's reason: {status.reason or 'none given'})"
        )
        self._stop_all(workers, why)
        self._blocked = (now + (self._policy.pending_timeout or 0), why)
        others = [w for w in self._workers.values() if not w.stopping]
        _log.warning("executorlib: %s; cancelled it; the pool goes on with %d other worker(s)",
                     why, len(others))
        if not others:
            error = WorkerDiedError(
                f"no worker could start: {why}. Ask for fewer resources per worker (resource_dict), "
                "another partition, or a longer pending_timeout"
            )
            while self._pending:
                settle(self._pending.popleft().future, exception=error)
