"""What a cache directory holds: one record per call, with its state and its files.

Built on the file layout of executorlib.cache and executorlib.submission::

    DIR/<key>.h5                       the outcome: a result (done) or an error (failed)
    DIR/jobs/<key>.task.h5 .sh .job .out   submission mode: call, job script, job id, output

A call without an outcome file asks the queue about its job (one ``squeue`` for all
Slurm jobs, one ``flux jobs`` for all Flux jobs): ``queued``, ``running``, ``failed``
(the job ended without writing its result) or ``lost`` (no job, or one the queue has
forgotten). Results are never unpickled here, so no user module needs to be importable.
Used by the ``executorlib`` command (``status``, ``cancel``, ``clean``).
"""

from __future__ import annotations

import glob
import os
import pickle
import shutil
from dataclasses import dataclass
from typing import Protocol

from executorlib.cache import read_file
from executorlib.processes import pid_alive, tail_lines
from executorlib.queue import FluxQueue, JobState, SlurmQueue, SubmissionError

JOB_SUFFIXES = (".task.h5", ".sh", ".job", ".out")
STATES = ("done", "failed", "queued", "running", "lost")
_RUNNING = frozenset({"RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "STAGE_OUT", "RESIZING"})


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
    files = _files_by_key(directory)
    pending = {key: _job_id(paths) for key, paths in files.items()
               if _outcome_path(directory, key) not in paths}
    states = job_states([job_id for job_id in pending.values() if job_id])
    calls = []
    for key, paths in sorted(files.items()):
        outcome = _outcome_path(directory, key)
        if key in pending and not os.path.exists(outcome):
            calls.append(_unfinished(key, paths, pending[key], states))
        else:  # it has an outcome file (perhaps written since we looked)
            calls.append(_finished(key, sorted({*paths, outcome}), pending.get(key) or _job_id(paths)))
    return calls


def _files_by_key(directory: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in glob.glob(os.path.join(glob.escape(directory), "*.h5")):
        found.setdefault(os.path.basename(path)[: -len(".h5")], set()).add(path)
    for path in glob.glob(os.path.join(glob.escape(directory), "jobs", "*")):
        name = os.path.basename(path)
        suffix = next((s for s in JOB_SUFFIXES if name.endswith(s)), None)
        if suffix is not None:
            found.setdefault(name[: -len(suffix)], set()).add(path)
    return found


def _outcome_path(directory: str, key: str) -> str:
    return os.path.join(directory, f"{key}.h5")


def _job_id(paths: set[str]) -> str | None:
    job_file = next((p for p in paths if p.endswith(".job")), None)
    if job_file is None:
        return None
    with open(job_file) as file:
        return file.read().strip() or None


def _finished(key: str, paths: list[str], job_id: str | None) -> CallInfo:
    path = next(p for p in paths if p.endswith(f"{os.sep}{key}.h5"))
    try:
        found = read_file(path, ("error", "traceback"))
    except Exception as error:
        return CallInfo(key, key, "failed", job_id, None, f"unreadable {path}: {error}", tuple(paths))
    state = "failed" if "error" in found else "done"
    return CallInfo(key, found["name"], state, job_id, found["runtime"], _error_summary(found), tuple(paths))


def _error_summary(found: dict) -> str:
    """The exception line of the traceback (no unpickling), else the unpickled error."""
    if "traceback" in found:
        lines = [line for line in found["traceback"].decode(errors="replace").splitlines() if line.strip()]
        lines = [line for line in lines if not line.startswith("(raised on ")] or lines
        return lines[-1].strip() if lines else ""
    if "error" not in found:
        return ""
    try:
        error = pickle.loads(found["error"])
    except Exception as problem:  # its class lives in a module we cannot import here
        return f"(error cannot be unpickled here: {problem})"
    return f"{type(error).__name__}: {error}".splitlines()[0]


def _unfinished(
    key: str, paths: set[str], job_id: str | None, states: dict[str, JobState | None]
) -> CallInfo:
    name = _task_name(paths) or key
    if job_id is None:
        return CallInfo(key, name, "lost", None, None, "no job id was recorded: the submission did not "
                        "complete", tuple(sorted(paths)))
    state = _local_state(job_id, paths) if job_id.startswith("local-") else states.get(job_id)
    if state is not None and not state.belongs_to(key):
        state = None  # the id names another job (a new Flux instance): ours is gone
    output = next((p for p in paths if p.endswith(".out")), None)
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


def _task_name(paths: set[str]) -> str | None:
    task_file = next((p for p in paths if p.endswith(".task.h5")), None)
    try:
        return read_file(task_file, ())["name"] if task_file else None
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


def _local_state(job_id: str, paths: set[str]) -> JobState | None:
    """Running while a process runs its job script; it ran (and wrote no result) if it
    has output; held for its inputs while the process that submitted it lives."""
    script = next((p for p in paths if p.endswith(".sh")), None)
    if script is not None and _runs(script):
        return JobState("RUNNING")
    if any(p.endswith(".out") for p in paths):
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
