"""What a cache directory holds: one record per call, with its state and its files.

The files of a call are those of executorlib.taskfiles (``<key>.h5`` and ``jobs/<key>.*``).
A call without an outcome file asks the queue about its job (one ``squeue`` for all
Slurm jobs, one ``flux jobs`` for all Flux jobs): ``queued``, ``running``, ``failed``
(the job ended without writing its result) or ``lost`` (no job, a job id file that
holds no job id, or a job the queue has forgotten). Nothing is ever unpickled here (an
error is summarised from its stored traceback text), no file is followed through a
link, and a FIFO or other special file is never opened for reading: such entries are
reported in one line. Used by the ``executorlib`` command (``status``, ``cancel``, ``clean``).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
from dataclasses import dataclass
from typing import Protocol

from executorlib.files import check_directory, read_small_text
from executorlib.h5file import read_file
from executorlib.processes import pid_alive, tail_lines
from executorlib.queue import FluxQueue, JobState, SlurmQueue, SubmissionError
from executorlib.taskfiles import TaskFiles, files_by_key

STATES = ("done", "failed", "queued", "running", "lost")
_RUNNING = frozenset({"RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "STAGE_OUT", "RESIZING"})
_SLURM_ID = re.compile(r"\d+(_\d+)?")
_FLUX_ID = re.compile(r"[ƒf][1-9A-HJ-NP-Za-km-z]+")
_LOCAL_ID = re.compile(r"local-\d+-\d+")


@dataclass(frozen=True)
class CallInfo:
    """One call found in a cache directory."""

    key: str
    function: str
    state: str  # one of STATES
    job_id: str | None
    runtime: float | None  # seconds, for calls with an outcome file
    error: str  # one-line summary; "" when there is none
    files: tuple[str, ...]

    def as_dict(self) -> dict:
        """A JSON-ready dict (``files`` as a list)."""
        return {**self.__dict__, "files": list(self.files)}


def list_calls(directory: str) -> list[CallInfo]:
    """Every call in ``directory`` (sorted by key); asks the queue about unfinished jobs."""
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} is not a directory: give the cache_directory of an executor")
    check_directory(directory)
    files = files_by_key(directory)
    jobs = {key: _job_id(TaskFiles(directory, key), paths) for key, paths in files.items()}
    pending = {key for key, paths in files.items() if TaskFiles(directory, key).result not in paths}
    states = job_states([jobs[key][0] for key in pending if jobs[key][0]])
    calls = []
    for key, paths in sorted(files.items()):
        job_id, problem = jobs[key]
        outcome = TaskFiles(directory, key).result
        if key in pending and not os.path.exists(outcome):
            calls.append(_unfinished(TaskFiles(directory, key), paths, job_id, states, problem))
        else:  # it has an outcome file (perhaps written since we looked)
            calls.append(_finished(TaskFiles(directory, key), sorted({*paths, outcome}), job_id))
    return calls


def _job_id(files: TaskFiles, paths: set[str]) -> tuple[str | None, str]:
    """The job id recorded for a call, or None and why there is none usable."""
    if files.job_id not in paths:
        return None, ""
    try:
        text = read_small_text(files.job_id).strip()
    except (OSError, ValueError) as error:
        return None, f"malformed job id file: {error}"
    if not any(pattern.fullmatch(text) for pattern in (_SLURM_ID, _FLUX_ID, _LOCAL_ID)):
        return None, f"malformed job id {text[:40]!r} in {files.job_id}"
    return text, ""


def _finished(files: TaskFiles, paths: list[str], job_id: str | None) -> CallInfo:
    key, path = files.key, files.result
    try:
        found = read_file(path, ("error", "traceback"))
    except Exception as error:
        return CallInfo(key, key, "failed", job_id, None, f"unreadable {path}: {error}", tuple(paths))
    state = "failed" if "error" in found else "done"
    return CallInfo(key, found["name"], state, job_id, found["runtime"], _error_summary(found), tuple(paths))


def _error_summary(found: dict) -> str:
    """The exception line of the stored traceback (text: nothing is unpickled)."""
    if "traceback" in found:
        lines = [line for line in found["traceback"].decode(errors="replace").splitlines() if line.strip()]
        lines = [line for line in lines if not line.startswith("(raised on ")] or lines
        return lines[-1].strip() if lines else ""
    return "an error without a traceback (not unpickled here)" if "error" in found else ""


def _unfinished(
    files: TaskFiles, paths: set[str], job_id: str | None, states: dict[str, JobState | None], problem: str
) -> CallInfo:
    key = files.key
    name = _task_name(files, paths) or key
    if job_id is None:
        why = problem or "no job id was recorded: the submission did not complete"
        return CallInfo(key, name, "lost", None, None, why, tuple(sorted(paths)))
    state = _local_state(job_id, files, paths) if job_id.startswith("local-") else states.get(job_id)
    if state is not None and not state.belongs_to(key):
        state = None  # the id names another job (a new Flux instance): ours is gone
    output = files.output if files.output in paths else None
    if state is None:
        text, where = "lost", f"job {job_id} is unknown to the queue and wrote no result"
    elif state.never_starts:
        text, where = "failed", f"job {job_id} will never start: an input failed ({state.reason})"
    elif state.state == "PENDING":
        text, where = "queued", "" if state.reason in ("", "None") else f"pending: {state.reason}"
    elif state.state in _RUNNING:
        text, where = "running", ""
    else:
        text, where = "failed", f"job {job_id} ended in state {state.state} without a result"
    if text in ("failed", "lost") and output:
        where += _last_line(output)
    return CallInfo(key, name, text, job_id, None, where, tuple(sorted(paths)))


def _task_name(files: TaskFiles, paths: set[str]) -> str | None:
    try:
        return read_file(files.task, ())["name"] if files.task in paths else None
    except Exception:
        return None


def _last_line(path: str) -> str:
    lines = tail_lines(path, lines=1, max_bytes=2048)
    return f"; its output ends: {lines[-1].strip()}" if lines else ""


# ------------------------------------------------------------------ the queues
def job_states(job_ids: list[str]) -> dict[str, JobState | None]:
    """What the queue says about each job id; None where it knows nothing (any more)."""
    found: dict[str, JobState | None] = dict.fromkeys(job_ids)
    for ids, queue in _by_queue(job_ids):
        try:
            found.update(queue.states(ids))
        except SubmissionError as error:
            if "Invalid job id" not in str(error):  # squeue: none of them is known any more
                raise
    return found


def cancel_jobs(job_ids: list[str]) -> None:
    """Cancel ``job_ids`` with ``scancel`` / ``flux cancel`` (SubmissionError if refused)."""
    for ids, queue in _by_queue(job_ids):
        queue.cancel(ids)


def terminate_tasks_in_cache(
    cache_directory: str, config_directory: str | None = None, backend: str | None = None
) -> list[str]:
    """Cancel the queue jobs of the calls in ``cache_directory`` still queued or running,
    from any process (the executor that submitted them may be gone); the job ids cancelled.

    ``config_directory``: a pysqa configuration to cancel through (for queues other than
    Slurm and Flux). ``backend`` (``"slurm"``, ``"flux"``) is accepted for compatibility:
    the queue is known from each job id.
    """
    calls = [c for c in list_calls(cache_directory) if c.state in ("queued", "running") and c.job_id]
    return _terminate([call.job_id for call in calls], config_directory, backend)


def terminate_task_in_cache(
    cache_directory: str, cache_key: str, config_directory: str | None = None, backend: str | None = None
) -> str | None:
    """Cancel the queue job of the call ``cache_key`` (its file name without ``.h5``, e.g.
    the ``cache_key`` of its ``resource_dict``) if it is still queued or running; its job
    id, or None when there was nothing to cancel. Arguments as for
    :func:`terminate_tasks_in_cache`."""
    calls = [c for c in list_calls(cache_directory) if c.key == cache_key]
    if not calls:
        raise FileNotFoundError(f"no call {cache_key!r} in {cache_directory}; `executorlib status "
                                f"{cache_directory}` lists them")
    active = [c.job_id for c in calls if c.state in ("queued", "running") and c.job_id]
    return (_terminate(active, config_directory, backend) or [None])[0]


def _terminate(job_ids: list[str], config_directory: str | None, backend: str | None) -> list[str]:
    if backend not in (None, "slurm", "flux"):
        raise ValueError(f"backend must be 'slurm', 'flux' or None, got {backend!r}")
    if config_directory is not None and job_ids:
        from executorlib.queue import PysqaQueue

        PysqaQueue(config_directory).cancel(job_ids)
    else:
        cancel_jobs(job_ids)
    return job_ids


class _Queue(Protocol):
    def states(self, job_ids: list[str]) -> dict[str, JobState]: ...

    def cancel(self, job_ids: list[str]) -> None: ...


def _by_queue(job_ids: list[str]) -> list[tuple[list[str], _Queue]]:
    """Job ids grouped by the queue that owns them: Slurm ids are numbers, Flux ids
    f58 (``ƒ...``), and ``local-PID-N`` jobs belong to the process PID."""
    slurm = [job_id for job_id in job_ids if job_id.split("_")[0].isdigit()]
    flux = [job_id for job_id in job_ids if job_id[:1] in ("ƒ", "f")]
    local = [job_id for job_id in job_ids if job_id.startswith("local-")]
    groups: list[tuple[list[str], _Queue]] = []
    if slurm:
        _need("squeue", "Slurm job ids", slurm)
        groups.append((slurm, SlurmQueue()))
    if flux:
        _need("flux", "Flux job ids", flux)
        groups.append((flux, FluxQueue()))
    if local:
        groups.append((local, _LocalJobs()))
    return groups


def _need(command: str, what: str, ids: list[str]) -> None:
    if shutil.which(command) is None:
        raise FileNotFoundError(
            f"the directory holds {what} ({', '.join(ids[:3])}...) but '{command}' is not on PATH; "
            "run this on a node of the cluster that ran them"
        )


class _LocalJobs:
    """Jobs of LocalClusterExecutor: processes of the Python process that started them."""

    def states(self, job_ids: list[str]) -> dict[str, JobState]:
        return {}  # no queue to ask: see _local_state

    def cancel(self, job_ids: list[str]) -> None:
        owners = sorted({_owner(job_id) for job_id in job_ids})
        raise SubmissionError(
            f"local jobs {', '.join(job_ids)} are run by process {', '.join(map(str, owners))}, "
            "not by a queue: stop that process (its executor's shutdown(cancel_futures=True))"
        )


def _local_state(job_id: str, files: TaskFiles, paths: set[str]) -> JobState | None:
    """Running while a process runs its job script; it ran (and wrote no result) if it
    has output; held for its inputs while the process that submitted it lives."""
    if files.script in paths and _runs(files.script):
        return JobState("RUNNING")
    if files.output in paths:
        return JobState("FAILED")
    return JobState("PENDING", f"held by process {_owner(job_id)}") if pid_alive(_owner(job_id)) else None


def _runs(path: str) -> bool:
    """Whether any process has ``path`` on its command line (Linux /proc)."""
    needle = path.encode()
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(cmdline, "rb") as file:
                if needle in file.read().split(b"\0"):
                    return True
        except OSError:  # it ended while we looked
            continue
    return False


def _owner(job_id: str) -> int:
    return int(job_id.split("-")[1])
