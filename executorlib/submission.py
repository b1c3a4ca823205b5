"""Submission mode: one queue job per call, that survives the Python process.

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

Files, in ``cache_directory``: ``<key>.h5`` (the result, as in executorlib.cache) and
``jobs/<key>.{task.h5,sh,job,out}`` (call, job script, job id, job output). Futures in
the arguments that belong to this executor become ``afterok`` dependencies and are read
by the job from the upstream result file; the key hashes the upstream's key, so a
second run of the same script computes the same keys and finds results and jobs.
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

from executorlib.cache import Upstream, read_outcome, resources_blob, task_key, write_file
from executorlib.dependencies import settle, substitute, when_resolved
from executorlib.errors import WorkerDiedError
from executorlib.executor import BaseExecutor
from executorlib.options import parse_options, pmi_option, shared_options
from executorlib.processes import tail_lines
from executorlib.queue import (
    FluxQueue,
    JobSpec,
    JobState,
    LocalQueue,
    PysqaQueue,
    SlurmQueue,
    SubmissionError,
)
from executorlib.resources import Resources
from executorlib.task import Task

_POLL_MIN_S, _POLL_MAX_S = 0.05, 2.0
_TAIL_BYTES = 4096
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
    key: str | None = None
    job_id: str | None = None
    reattached: bool = False  # job id from an earlier process, not yet seen in the queue
    finished: bool = False
    spec: JobSpec | None = field(default=None, repr=False)


class Submitter:
    """Submits calls as jobs and resolves their futures from one watcher thread."""

    def __init__(self, queue: Queue, cache_directory: str, max_jobs: int | None) -> None:
        self._queue = queue
        self._directory = os.path.abspath(cache_directory)
        self._jobs_directory = os.path.join(self._directory, "jobs")
        os.makedirs(self._jobs_directory, exist_ok=True)
        self._cwd = os.getcwd()
        self._max_jobs = max_jobs
        self._records: dict[Future, _Record] = {}
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
        """Queue ``task``; futures of this executor in its arguments become dependencies,
        other futures are waited for (by callback) before the job is submitted."""
        inputs = inputs or []
        with self._cond:
            upstream = [self._records[f] for f in inputs if f in self._records]
            record = self._records[task.future] = _Record(task, upstream)
        task.future.add_done_callback(self._on_done)
        if upstream:  # a failed or cancelled upstream fails or cancels this call at once
            when_resolved([r.task.future for r in upstream], task.future, lambda: None)
        foreign = [f for f in inputs if f not in self._records]
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
        record = self._records.get(future)
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
            busy = self._cancel_jobs() + self._admit()
            if leaving:  # the interpreter exits: what is submitted stays in the queue
                return
            busy += self._watch()
            interval = _POLL_MIN_S if busy else min(2 * interval, _POLL_MAX_S)

    def _all_done(self) -> bool:
        if self._active or self._waiting or self._to_cancel:
            return False
        return all(future.done() for future in self._records)  # none waits for an input

    def _admit(self) -> int:
        """Prepare waiting calls in order, while the cap on queued jobs allows."""
        admitted = 0
        with self._cond:
            candidates = list(self._waiting)
        for record in candidates:
            if record.task.future.done():
                self._waiting.remove(record)
            elif all(up.key for up in record.upstream):
                if self._max_jobs is not None and len(self._active) >= self._max_jobs:
                    break
                self._waiting.remove(record)
                self._prepare(record)
                admitted += 1
        return admitted

    def _prepare(self, record: _Record) -> None:
        task = record.task
        try:
            task.args, task.kwargs = self._placeholders(task.args), self._placeholders(task.kwargs)
            record.key = task_key(task)
        except Exception as error:
            self._finish(record, exception=_unpicklable(task, error))
            return
        outcome = read_outcome(self._result_path(record.key))
        if outcome is not None and outcome[0] == "result":
            self._finish(record, result=outcome[1])  # errors are not cached: run again
            return
        job_id = self._read_job_file(record.key) if outcome is None else None
        if job_id is not None:
            record.job_id, record.reattached = job_id, True
            self._active[job_id] = record
        else:
            self._submit_job(record)

    def _placeholders(self, value: Any) -> Any:
        """Futures of this executor -> their result file; other (done) futures -> value."""

        def resolve(future: Future) -> Any:
            upstream = self._records.get(future)
            if upstream is None:
                return future.result()
            return Upstream(self._result_path(upstream.key), upstream.key)

        return substitute(value, resolve)

    def _submit_job(self, record: _Record) -> None:
        task, key = record.task, record.key
        files = os.path.join(self._jobs_directory, key)
        record.spec = spec = JobSpec(
            job_name=key, task_file=f"{files}.task.h5", script_file=f"{files}.sh",
            output_file=f"{files}.out", working_directory=task.resources.cwd or self._cwd,
            resources=task.resources, dependency=tuple(
                up.job_id for up in record.upstream
                if up.job_id in self._active and not os.path.exists(self._result_path(up.key))
            ),
        )
        try:
            self._write_task_file(record)
        except Exception as error:
            self._finish(record, exception=_unpicklable(task, error))
            return
        try:
            job_id = self._queue.submit(spec)
        except SubmissionError as error:
            self._finish(record, exception=error)
            return
        _write_atomically(f"{files}.job", job_id)
        record.job_id = job_id
        self._active[job_id] = record
        if task.future.done():  # cancelled while it was being submitted
            self._kick(self._to_cancel.append, record)

    def _write_task_file(self, record: _Record) -> None:
        import cloudpickle

        task = record.task
        blobs = {
            "function": cloudpickle.dumps(task.fn, protocol=5),
            "args": cloudpickle.dumps(task.args, protocol=5),
            "kwargs": cloudpickle.dumps(task.kwargs, protocol=5),
            "resources": resources_blob(task.resources),
            "result_path": self._result_path(record.key).encode(),
        }
        write_file(record.spec.task_file, blobs, task.name)

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
            if state is not None and not state.final and not state.never_starts:
                record.reattached = False
            else:
                done += 1
                self._collect(record) or self._on_job_gone(record, state)
        return done

    def _collect(self, record: _Record) -> bool:
        outcome = read_outcome(self._result_path(record.key))
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
        self._finish(record, exception=self._death_error(record, state))

    def _death_error(self, record: _Record, state: JobState | None) -> WorkerDiedError:
        how = "is no longer known to the queue" if state is None else f"ended in state {state.state}"
        how += f" ({state.reason})" if state is not None and state.reason not in ("", "None") else ""
        output = os.path.join(self._jobs_directory, f"{record.key}.out")
        return WorkerDiedError(
            f"{self._queue.name} job {record.job_id} running {record.task.name} {how} without "
            f"writing its result {self._result_path(record.key)}; {_tail(output)}"
        )

    def _cancel_jobs(self) -> int:
        with self._cond:
            records, self._to_cancel = self._to_cancel, []
        job_ids = [r.job_id for r in records if r.job_id is not None and not r.finished]
        for record in records:
            self._active.pop(record.job_id, None)
            record.finished = True
        if job_ids:
            try:
                self._queue.cancel(job_ids)
            except SubmissionError as error:
                warnings.warn(str(error), RuntimeWarning, stacklevel=1)
        return len(records)

    def _finish(self, record: _Record, result: Any = None, exception: BaseException | None = None) -> None:
        record.finished = True
        self._active.pop(record.job_id, None)
        record.task.args, record.task.kwargs = (), {}  # the job has them; free the memory
        settle(record.task.future, result, exception)

    def _result_path(self, key: str) -> str:
        return os.path.join(self._directory, f"{key}.h5")

    def _read_job_file(self, key: str) -> str | None:
        try:
            with open(os.path.join(self._jobs_directory, f"{key}.job")) as file:
                return file.read().strip() or None
        except FileNotFoundError:
            return None


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


def _write_atomically(path: str, text: str) -> None:
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as file:
        file.write(text)
    os.replace(temporary, path)


def _tail(path: str) -> str:
    lines = tail_lines(path, max_bytes=_TAIL_BYTES)
    if lines is None:
        return f"its output {path} cannot be read"
    if not lines:
        return f"its output {path} is empty"
    return f"last lines of its output {path}:\n    " + "\n    ".join(lines)


# ---------------------------------------------------------------- executors
_CLUSTER_OPTIONS = (
    "max_workers", "cache_directory", "resource_dict", "init_function", "disable_dependencies",
    "plot_dependency_graph", "plot_dependency_graph_filename", "export_workflow_filename",
    "log_obj_size",
)


@shared_options(_CLUSTER_OPTIONS)
class _ClusterExecutor(BaseExecutor):
    """One queue job per call (see the module docstring).

    max_workers: how many jobs this executor keeps in the queue at once (the rest wait
        in order; default: no cap). cache_directory: where results, task files, job
        scripts and job output go (default ``./executorlib_cache``); a later run of the
        same script finds its results and jobs there. resource_dict: default resources
        of every call (``submission_template`` is a Jinja2 job script). pysqa_config_directory:
        submit through a pysqa configuration instead. pmi_mode (alias
        flux_executor_pmi_mode): ``srun --mpi=`` of calls with ``cores > 1`` (default
        pmix). block_allocation: only False for now (pilot pools are not there yet).
        refresh_rate: accepted for compatibility; job states are polled with back-off.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        cache_directory: str | None = "executorlib_cache",
        pysqa_config_directory: str | None = None,
        pmi_mode: str | None = None,
        flux_executor_pmi_mode: str | None = None,
        block_allocation: bool = False,
        **options: Any,
    ) -> None:
        if block_allocation:
            raise NotImplementedError(
                f"{type(self).__name__}(block_allocation=True) would keep long-lived worker jobs "
                "in the queue (pilot pools), which executorlib does not offer yet; use "
                "block_allocation=False for one queue job per call, or run a "
                "SlurmJobExecutor/FluxJobExecutor(block_allocation=True) inside an allocation"
            )
        directory = os.fspath(cache_directory if cache_directory is not None else "executorlib_cache")
        options = parse_options(
            type(self).__name__, {**options, "max_workers": max_workers, "cache_directory": directory},
            accepted=_CLUSTER_OPTIONS,
        )
        pmi = pmi_option(pmi_mode, flux_executor_pmi_mode) or "pmix"
        queue = PysqaQueue(pysqa_config_directory) if pysqa_config_directory else self._queue(pmi)
        self._queue_name = queue.name
        self._setup(options, lambda: Submitter(queue, options.cache_directory, max_workers))

    def _queue(self, pmi_mode: str) -> Queue:
        raise NotImplementedError

    def _check_fits(self, resources: Resources) -> None:
        """The queue decides what fits; its refusal fails the call's future."""

    def _backend_info(self) -> dict[str, Any]:
        return {"queue": self._queue_name}


class SlurmClusterExecutor(_ClusterExecutor):
    __doc__ = "Each call is one Slurm job (``sbatch``).\n\n    " + (_ClusterExecutor.__doc__ or "")
    backend = "slurm_submission"

    def _queue(self, pmi_mode: str) -> Queue:
        return SlurmQueue(pmi_mode)


class FluxClusterExecutor(_ClusterExecutor):
    __doc__ = "Each call is one Flux job (``flux batch``).\n\n    " + (_ClusterExecutor.__doc__ or "")
    backend = "flux_submission"

    def _queue(self, pmi_mode: str) -> Queue:
        return FluxQueue()


class LocalClusterExecutor(_ClusterExecutor):
    __doc__ = (
        "Each call is a local process running the same job script and files, for machines "
        "without a queue.\n\n    " + (_ClusterExecutor.__doc__ or "")
    )
    backend = "local_submission"

    def _queue(self, pmi_mode: str) -> Queue:
        return LocalQueue()
