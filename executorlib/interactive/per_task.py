"""One worker per call: every call gets a fresh process, within a budget of cores.

Calls start in submission order while ``sum(cores * threads_per_core) <= max_cores``;
the rest wait in the queue (the manager thread sleeps in its poll; nothing spins). While
cores are free and nothing waits, spare workers with the executor's default resources
are started ahead (up to two, one at a time, and only while no other worker boots: a
spare's start would delay the booting worker's answer, on the manager thread, and take
the cores it boots on), so the next call finds a process that has already booted;
a spare still serves exactly one call, and spares give their cores back at once when a
call needs them. Only spawners that declare ``spares = True`` get them (local processes):
inside an allocation an idle spare step would hold CPUs that a nested executor needs.
Cores are released when a worker's process has ended.
"""

from __future__ import annotations

from executorlib.dependencies import claim, notify_cancelled
from executorlib.interactive import protocol
from executorlib.interactive.scheduler import ResultCache, Scheduler, Spawner, Worker
from executorlib.resources import Resources
from executorlib.task import Task

_SPARES = 2  # booted workers kept ready while cores allow: back-to-back calls find one


class PerTaskScheduler(Scheduler):
    """Start one worker for each call; at most ``max_cores`` cores in use."""

    def __init__(
        self, spawner: Spawner, default: Resources, max_cores: int,
        host: str | None = None, cache: ResultCache | None = None, spare: bool = False,
    ) -> None:
        super().__init__(spawner, host, cache)
        self._default = default
        self._max_cores = max_cores
        self._used = 0
        self._spares: list[Worker] = []
        self._keep_spares = spare

    def _schedule(self) -> None:
        while self._pending:
            task = self._pending[0]
            if task.future.cancelled():
                notify_cancelled(self._pending.popleft().future)
            elif self._spares and self._default == task.resources:
                self._pending.popleft()
                self._run_on_spare(task)
            elif self._used + task.resources.slots <= self._max_cores:
                self._pending.popleft()
                self._start_for(task)
            else:
                for spare in self._spares:  # their cores are needed for a real call
                    spare.process.stop()
                self._spares.clear()
                return
        self._start_spares()

    def _start_for(self, task: Task) -> None:
        if not claim(task.future):
            return
        self._used += task.resources.slots
        if self._spawn(task.resources, task) is None:
            self._used -= task.resources.slots

    def _run_on_spare(self, task: Task) -> None:
        if not claim(task.future):
            return
        booted = [spare for spare in self._spares if spare.peer is not None]
        worker = (booted or self._spares)[0]
        self._spares.remove(worker)
        worker.tasks.append(task)
        if worker.peer is not None:
            self._dispatch(worker)

    def _start_spares(self) -> None:
        while (
            self._keep_spares and len(self._spares) < _SPARES and not self._stopping
            and self._used + self._default.slots <= self._max_cores
            and all(worker.peer is not None for worker in self._workers.values())  # none boots now
            and self._spawner.can_start_spare()
        ):
            self._used += self._default.slots
            spare = self._spawn(self._default)
            if spare is None:
                self._used -= self._default.slots
                self._keep_spares = False  # the launcher fails; real calls will report why
                return
            self._spares.append(spare)

    def _stop_idle_workers(self) -> None:
        """Spares have run nothing of the user's: they end at once (SIGKILL), with
        no interpreter shutdown to wait for; the others finish as usual."""
        for spare in self._spares:
            if not spare.stopping:
                spare.stopping = True
                spare.process.stop()
        super()._stop_idle_workers()

    def _dispatch(self, worker: Worker) -> None:
        if not self._send_call(worker, worker.tasks.popleft()):
            worker.stopping = True
            worker.process.stop()

    def _on_connected(self, worker: Worker) -> None:
        if worker.tasks:
            self._dispatch(worker)

    def _on_ready(self, worker: Worker) -> None:
        """Workers of this scheduler get no init_function."""

    def _on_task_done(self, worker: Worker) -> None:
        worker.stopping = True
        self._send(worker, protocol.STOP)

    def _on_worker_gone(self, worker: Worker) -> None:
        self._used -= worker.resources.slots
        if worker in self._spares:
            self._spares.remove(worker)
