"""What the manager thread (scheduler.py) drives: spawners, an optional result cache,
its record of each worker, and its inbox."""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from executorlib.interactive.spawner import Launch, WorkerProcess
from executorlib.resources import Resources
from executorlib.task import Task

if TYPE_CHECKING:
    from executorlib.interactive.channel import Peer
    from executorlib.interactive.pipe import PipePeer


class Spawner(Protocol):
    """Starts workers: local processes, srun steps, Flux jobs. A spawner may have a
    ``stop_helpers()`` method: the manager thread calls it last (the local zygote); one
    with ``spares = True`` has ``can_start_spare()``: whether a worker starts now
    without keeping the manager thread waiting (per_task.py asks before each spare)."""

    bind_host: str
    name: str
    spares: bool  # may idle workers be started ahead of calls (local processes only)

    def start(self, launch: Launch) -> WorkerProcess: ...


class ResultCache(Protocol):
    """Optional result cache between "inputs ready" and "run" (see cache.py)."""

    def load(self, task: Task) -> bool: ...

    def store(self, task: Task, value: Any) -> None: ...


@dataclass(eq=False)
class Worker:
    """The manager's view of one worker process."""

    worker_id: int
    resources: Resources
    process: WorkerProcess
    peer: Peer | PipePeer | None = None
    tasks: deque[Task] = field(default_factory=deque)  # sent (or to send), oldest first
    ready: bool = False  # connected, and init_function done where there is one
    stopping: bool = False

    def describe(self) -> str:
        where = f" on {self.peer.host} (pid {self.peer.pid})" if self.peer else ""
        return f"worker {self.worker_id}{where}"


@dataclass
class Inbox:
    """Events for the manager thread, from any thread."""

    items: deque = field(default_factory=deque)
    signalled: bool = False  # an eventfd write the manager has not read yet
    fd: int = field(default_factory=lambda: os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
