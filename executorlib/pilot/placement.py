"""Which ready worker takes a call: the pool's placement rules, as plain functions.

A call without ``run_time_max`` goes to the least busy worker that holds fewer than
``CALLS_PER_WORKER`` calls (one running, one sent ahead while calls wait; none ahead
while a worker of a running job is still connecting: it takes the call in a moment)
and whose job does not end within the margin. A call that declares ``run_time_max`` goes alone, to an
idle worker whose job has at least that much time left plus the margin: the one with the
least time left that is still enough, so workers with long futures stay free for long
calls. While a long queue waits, calls without ``run_time_max`` travel eight to a message.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from executorlib.interactive.scheduler import Worker
from executorlib.resources import Resources
from executorlib.task import Task

CALLS_PER_WORKER = 2
MAX_BATCH = 8


@dataclass(frozen=True)
class PoolPolicy:
    """How the pool grows and shrinks (seconds; None: no limit)."""

    min_workers: int = 0
    max_workers: int = 1
    idle_timeout: float | None = 60.0
    pending_timeout: float | None = None
    max_retries: int = 0
    restart_limit: int | None = None  # worker jobs lost while running that are replaced
    workers_per_job: int = 1
    end_margin: float = 30.0  # a worker whose job ends sooner takes no new call


def choose(ready: list[Worker], task: Task, margin: float, room: int = CALLS_PER_WORKER) -> Worker | None:
    """The worker that takes ``task`` now, or None if none may (``room``: the calls a
    worker may hold; 1: none sent ahead)."""
    needed = task.resources.run_time_max
    if needed is None:
        fits = [w for w in ready if len(w.tasks) < room and w.process.job.time_left() > margin]
        return min(fits, key=lambda w: len(w.tasks), default=None)
    fits = [w for w in ready if not w.tasks and w.process.job.time_left() >= needed + margin]
    return min(fits, key=lambda w: w.process.job.time_left(), default=None)


def batch_after(first: Task, pending: deque[Task], workers: int, resources: Resources) -> list[Task]:
    """Calls taken from ``pending`` to travel with ``first`` in one message: only while at
    least 16 per worker wait, none with a run_time_max, none for MPI workers."""
    if first.resources.run_time_max is not None or resources.cores > 1:
        return []
    if len(pending) < 2 * MAX_BATCH * workers:
        return []
    batch = []
    while pending and len(batch) < MAX_BATCH - 1 and pending[0].resources.run_time_max is None:
        task = pending.popleft()
        if claim(task):
            batch.append(task)
    return batch


def claim(task: Task) -> bool:
    """Mark ``task`` running (a retried one already is); False if it was cancelled."""
    return task.future.running() or task.future.set_running_or_notify_cancel()
