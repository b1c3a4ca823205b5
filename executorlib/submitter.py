"""Submission mode's engine: one queue job per call, resolved by ONE watcher thread.

Data flow::

    submit() ─ Task ─> _Record ─(inputs from elsewhere: callback)─> waiting (FIFO)
                                                                      │ kick
    ONE watcher thread per executor, woken by a Condition or its back-off timeout:
      admit:  waiting -> key -> result file?   done (cache hit, no job)
                              -> job file?      re-attach to the job of an earlier run
                              -> task file + job script + submit (afterok: upstream ids)
      watch:  result files of the active jobs; then ONE queue call (squeue) for all
              of them: a job that ended without a result file fails its future with
              job id, state and the tail of its output
      cancel: ONE scancel for every future cancelled or failed (by its input) meanwhile

Only calls still pending are held: a finished call leaves behind nothing but its key
(weakly, by its future), so results live as long as the caller keeps their futures.
Any error while handling one call fails that call's future; an unexpected error in a
step that concerns every active job fails those jobs' futures; the watcher goes on.
Files: executorlib.taskfiles (paths), executorlib.jobfiles (task file, job id, output).
"""

from __future__ import annotations

import os
import threading
import warnings
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from executorlib.cache import Upstream
from executorlib.dependencies import settle, substitute, when_resolved
from executorlib.files import KEY_FILE_VARIABLE, check_directory, private_directory
from executorlib.h5file import read_outcome
from executorlib.hashing import task_key
from executorlib.jobfiles import death_error, read_job_id, write_job_id, write_task_file
from executorlib.queue import JobSpec, JobState, SubmissionError
from executorlib.task import Task
from executorlib.taskfiles import TaskFiles, jobs_directory

_POLL_MIN_S, _POLL_MAX_S = 0.05, 2.0
_LIVE: weakref.WeakSet[Submitter] = weakref.WeakSet()


class Queue(Protocol):
    """What the watcher needs from a queue system (see executorlib.queue)."""

    name: str

    def submit(self, spec: JobSpec) -> str: ...

    def states(self, job_ids: list[str]) -> dict[str, JobState]: ...

    def cancel(self, job_ids: list[str]) -> None: ...


@dataclass(eq=False)
class _Record:
    """One call on its way through the queue."""

    task: Task
    upstream: list[_Record]
    files: TaskFiles | None = None
    job_id: str | None = None
    reattached: bool = False  # job id from an earlier process, not yet seen in the queue
    finished: bool = False
    twins: list[_Record] = field(default_factory=list)  # the same call, submitted again meanwhile


class Submitter:
    """Submits calls as jobs and resolves their futures from one watcher thread."""

    def __init__(self, queue: Queue, cache_directory: str, max_jobs: int | None) -> None:
        self._queue = queue
        self._directory = private_directory(cache_directory)
        if check_directory(self._directory):
            raise ValueError(
                f"{self._directory} is a shared cache ({KEY_FILE_VARIABLE}); submission mode keeps "
                "each call's job files private to you, so give it a cache_directory of your own "
                "(a shared cache serves the executors that run calls inside an allocation)"
            )
        private_directory(jobs_directory(self._directory))
        self._cwd = os.getcwd()
        self._max_jobs = max_jobs
        self._records: dict[Future, _Record] = {}  # pending calls only
        self._keys: weakref.WeakKeyDictionary[Future, str] = weakref.WeakKeyDictionary()
        self._waiting: deque[_Record] = deque()
        self._active: dict[str, _Record] = {}
        self._to_cancel: list[_Record] = []
        self._cond = threading.Condition()
        self._kicked = False
        self._stopping = False
        self._leaving = False
        self._thread = threading.Thread(target=self._run, name="executorlib-watcher", daemon=True)
        _LIVE.add(self)

    # ----------------------------------------------------------------- any thread
    def start(self) -> None:
        self._thread.start()

    def submit(self, task: Task, inputs: list[Future] | None = None) -> None:
        """Queue ``task``; pending futures of this executor in its arguments become
        dependencies, other futures are waited for (by callback) before submitting."""
        inputs = inputs or []
        with self._cond:
            upstream = [self._records[f] for f in inputs if f in self._records]
            record = self._records[task.future] = _Record(task, upstream)
        task.future.add_done_callback(self._on_done)
        if upstream:  # a failed or cancelled upstream fails or cancels this call at once
            when_resolved([r.task.future for r in upstream], task.future, lambda: None)
        foreign = [f for f in inputs if all(f is not r.task.future for r in upstream)]
        if foreign:
            when_resolved(foreign, task.future, lambda: self._kick(self._waiting.append, record))
        else:
            self._kick(self._waiting.append, record)

    def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        """``wait``: until every job ended. ``cancel_futures``: cancel what has not ended
        (and ``scancel`` its job). Otherwise jobs stay in the queue for a later run."""
        if cancel_futures:
            with self._cond:
                records = list(self._records.values())
            for record in records:
                record.task.future.cancel()
            self._cancel_jobs()
        self._kick(setattr, self, "_stopping", True)
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    def leave(self) -> None:
        """At interpreter exit: submit what may be submitted, then stop watching (a
        thread stopped mid-way in h5py would deadlock h5py's own exit handler)."""
        self._kick(setattr, self, "_leaving", True)
        if self._thread.is_alive():
            self._thread.join()

    def _kick(self, action: Callable[..., Any], *args: Any) -> None:
        with self._cond:
            action(*args)
            self._kicked = True
            self._cond.notify()

    def _on_done(self, future: Future) -> None:
        with self._cond:
            record = self._records.pop(future, None)
            if record is not None and record.files is not None:
                self._keys[future] = record.files.key
        if record is not None and not record.finished:  # cancelled, or an input failed
            self._kick(self._to_cancel.append, record)

    # ----------------------------------------------------------- watcher thread
    def _run(self) -> None:
        interval = _POLL_MIN_S
        while True:
            with self._cond:
                if self._stopping and self._all_done():
                    return
                if not self._kicked:
                    self._cond.wait(interval if self._active or self._waiting else None)
                self._kicked, leaving = False, self._leaving
            busy = self._step(self._cancel_jobs) + self._step(self._admit)
            if leaving:  # the interpreter exits: what is submitted stays in the queue
                return
            busy += self._step(self._watch)
            interval = _POLL_MIN_S if busy else min(2 * interval, _POLL_MAX_S)

    def _step(self, step: Callable[[], int]) -> int:
        """Run one step; an unexpected error fails the futures of the active jobs (the
        ones it concerns) instead of ending the watcher, which would leave them hanging."""
        try:
            return step()
        except Exception as error:
            for record in list(self._active.values()):
                self._finish(record, exception=error)
            return 1

    def _all_done(self) -> bool:
        with self._cond:
            return not (self._active or self._waiting or self._to_cancel or self._records)

    def _admit(self) -> int:
        """Prepare waiting calls in order, while the cap on queued jobs allows."""
        admitted = 0
        with self._cond:
            candidates = list(self._waiting)
        for record in candidates:
            if record.task.future.done():
                self._waiting.remove(record)
            elif all(up.files for up in record.upstream):
                if self._max_jobs is not None and len(self._active) >= self._max_jobs:
                    break
                self._waiting.remove(record)
                admitted += 1
                try:
                    self._prepare(record)
                except Exception as error:  # this call's problem only
                    self._finish(record, exception=error)
        return admitted

    def _prepare(self, record: _Record) -> None:
        task = record.task
        try:
            task.args, task.kwargs = self._placeholders(task.args), self._placeholders(task.kwargs)
            record.files = TaskFiles(self._directory, task_key(task))
        except Exception as error:
            self._finish(record, exception=_unpicklable(task, error))
            return
        outcome = read_outcome(record.files.result)
        if outcome is not None and outcome[0] == "result":
            self._finish(record, result=outcome[1])  # errors are not cached: run again
            return
        job_id = read_job_id(record.files) if outcome is None else None
        if job_id is not None and (first := self._active.get(job_id)) is not None:
            record.job_id = job_id  # the same call is in the queue already: its job serves both
            first.twins.append(record)
        elif job_id is not None:
            record.job_id, record.reattached = job_id, True
            self._active[job_id] = record
        else:
            self._submit_job(record)

    def _placeholders(self, value: Any) -> Any:
        """Futures of this executor -> their result file; other (done) futures -> value."""

        def resolve(future: Future) -> Any:
            upstream = self._records.get(future)
            key = upstream.files.key if upstream is not None else self._keys.get(future)
            if key is None:
                return future.result()
            return Upstream(TaskFiles(self._directory, key).result, key)

        return substitute(value, resolve)

    def _submit_job(self, record: _Record) -> None:
        task, files = record.task, record.files
        spec = JobSpec(
            job_name=files.key, files=files, working_directory=task.resources.cwd or self._cwd,
            resources=task.resources, dependency=tuple(
                up.job_id for up in record.upstream
                if up.job_id in self._active and not os.path.exists(up.files.result)
            ),
        )
        try:
            write_task_file(files, task)
        except Exception as error:
            self._finish(record, exception=_unpicklable(task, error))
            return
        try:
            job_id = self._queue.submit(spec)
            write_job_id(files, job_id)
        except Exception as error:  # the queue's refusal, a missing folder...: this call fails
            self._finish(record, exception=error)
            return
        record.job_id = job_id
        for twin in record.twins:
            twin.job_id = job_id
        self._active[job_id] = record
        if task.future.done():  # cancelled while it was being submitted
            self._kick(self._to_cancel.append, record)

    def _watch(self) -> int:
        """Resolve the jobs that wrote their result; one queue call for the others."""
        done = sum(self._collect(record) for record in list(self._active.values()))
        if not self._active:
            return done
        try:
            states = self._queue.states(list(self._active))
        except SubmissionError as error:
            if "Invalid job id" not in str(error):  # squeue: none of them is known any more
                warnings.warn(f"cannot read job states, trying again: {error}", RuntimeWarning, stacklevel=1)
                return done
            states = {}
        for job_id, record in list(self._active.items()):
            state = states.get(job_id)
            if state is not None and not state.belongs_to(record.files.key):
                state = None  # the id names another job (a new Flux instance): ours is gone
            if state is not None and not state.final and not state.never_starts:
                record.reattached = False
            else:
                done += 1
                self._collect(record) or self._on_job_gone(record, state)
        return done

    def _collect(self, record: _Record) -> bool:
        outcome = read_outcome(record.files.result)
        if outcome is None:
            return False
        kind, value = outcome
        self._finish(record, **{"result" if kind == "result" else "exception": value})
        return True

    def _on_job_gone(self, record: _Record, state: JobState | None) -> None:
        if state is None and record.reattached:  # an earlier run's job that is gone: run again
            del self._active[record.job_id]
            record.job_id, record.reattached = None, False
            self._submit_job(record)
            return
        if state is not None and state.never_starts:
            self._queue.cancel([record.job_id])
        error = death_error(record.files, self._queue.name, record.job_id, record.task, state)
        self._finish(record, exception=error)

    def _cancel_jobs(self) -> int:
        with self._cond:
            records, self._to_cancel = self._to_cancel, []
        job_ids = [job_id for record in records if (job_id := self._release(record)) is not None]
        if job_ids:
            try:
                self._queue.cancel(job_ids)
            except SubmissionError as error:
                warnings.warn(str(error), RuntimeWarning, stacklevel=1)
        return len(records)

    def _release(self, record: _Record) -> str | None:
        """Mark a cancelled call finished; the job id to cancel, unless there is none or
        a twin of the call still waits for that job (it takes the call's place)."""
        if record.finished:
            return None
        record.finished = True
        if record.job_id is None or self._active.get(record.job_id) is not record:
            return None  # not submitted, or a twin riding on another record's job
        live = [twin for twin in record.twins if not twin.finished]
        if live:
            live[0].twins = live[1:]
            self._active[record.job_id] = live[0]
            return None
        del self._active[record.job_id]
        return record.job_id

    def _finish(self, record: _Record, result: Any = None, exception: BaseException | None = None) -> None:
        if self._active.get(record.job_id) is record:
            del self._active[record.job_id]
        for each in (record, *record.twins):
            if not each.finished:
                each.finished = True
                each.task.args, each.task.kwargs = (), {}  # the job has them; free the memory
                settle(each.task.future, result, exception)


def _leave_at_exit() -> None:
    for submitter in list(_LIVE):
        submitter.leave()


threading._register_atexit(_leave_at_exit)  # type: ignore[attr-defined]


def _unpicklable(task: Task, error: Exception) -> Exception:
    if isinstance(error, ValueError):
        return error
    return TypeError(
        f"cannot submit {task.name}: its function or arguments cannot be pickled "
        f"({type(error).__name__}: {error})"
    )
