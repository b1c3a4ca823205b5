"""One thread per process asks ``squeue`` about every pilot job, with back-off.

    PilotJob ── track(job_id) ──> JobWatcher ── ONE ``squeue --jobs=a,b,c`` ──> JobStatus
                                      │ state, node or end time changed, or the job left
                                      └──> that job's eventfds (the manager's poll wakes)

The queue cannot notify us, so it is the one thing polled: every 0.2 s after a change
or a ``kick()`` (a job submitted, a worker told to stop), doubling to every 2 s while
nothing changes, and not at all while no job is tracked.
"""

from __future__ import annotations

import os
import subprocess
import threading
from dataclasses import dataclass, replace
from datetime import datetime

from executorlib.queue import FINAL_STATES

GONE = "GONE"  # squeue no longer knows the job (purged after MinJobAge)
# COMPLETING: the job's processes have ended; Slurm is still cleaning up after them.
REFUSED = "REFUSED"  # sbatch refused the job: it never existed
ENDED_STATES = FINAL_STATES | {"COMPLETING", GONE, REFUSED}
_POLL_MIN_S, _POLL_MAX_S = 0.2, 2.0
_MISSES_BEFORE_GONE = 2  # a job missing from two answers in a row has left the queue
_FORMAT = "%i|%T|%r|%N|%e|%P"


@dataclass(frozen=True)
class JobStatus:
    """What ``squeue`` last said about one job."""

    state: str = "PENDING"
    reason: str = ""
    node: str = ""
    end_time: float | None = None  # seconds since the epoch, once Slurm knows it
    partition: str = ""

    @property
    def final(self) -> bool:
        """The job has ended (or left the queue): it will never run a call again."""
        return self.state in ENDED_STATES


class _Entry:
    __slots__ = ("status", "fds", "misses")

    def __init__(self, fds: list[int]) -> None:
        self.status = JobStatus()
        self.fds = fds
        self.misses = 0


class JobWatcher:
    """Tracks Slurm jobs for every pilot pool of this process (``JobWatcher.shared()``)."""

    _shared: JobWatcher | None = None
    _shared_lock = threading.Lock()

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._entries: dict[str, _Entry] = {}
        self._kicked = False
        self._thread: threading.Thread | None = None

    @classmethod
    def shared(cls) -> JobWatcher:
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def track(self, job_id: str, fds: list[int]) -> None:
        """Start watching ``job_id``; the eventfds ``fds`` (the caller's: one per worker of
        the job) are written on each change."""
        with self._cond:
            self._entries[job_id] = _Entry(list(fds))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="executorlib-squeue", daemon=True)
                self._thread.start()
            self._kicked = True
            self._cond.notify()

    def status(self, job_id: str) -> JobStatus:
        with self._cond:
            entry = self._entries.get(job_id)
            return entry.status if entry else JobStatus(GONE)

    def forget(self, job_id: str) -> None:
        """Stop watching ``job_id``: its eventfds are not written any more (the caller may close them)."""
        with self._cond:
            self._entries.pop(job_id, None)

    def kick(self) -> None:
        """Ask ``squeue`` soon: something is expected to change (a worker was stopped)."""
        with self._cond:
            self._kicked = True
            self._cond.notify()

    # ------------------------------------------------------------ watcher thread
    def _run(self) -> None:
        interval = _POLL_MIN_S
        while True:
            with self._cond:
                while not self._entries:
                    self._cond.wait()
                if not self._kicked:
                    self._cond.wait(interval)
                kicked, self._kicked = self._kicked, False
                job_ids = list(self._entries)
            answer = query_jobs(job_ids)
            changed = answer is not None and self._update(job_ids, answer)
            interval = _POLL_MIN_S if changed or kicked else min(2 * interval, _POLL_MAX_S)

    def _update(self, job_ids: list[str], answer: dict[str, JobStatus]) -> bool:
        changed = False
        with self._cond:
            for job_id in job_ids:
                entry = self._entries.get(job_id)
                if entry is None:
                    continue
                status = answer.get(job_id)
                if status is None:
                    entry.misses += 1
                    if entry.misses < _MISSES_BEFORE_GONE:
                        continue
                    status = replace(entry.status, state=GONE)
                entry.misses = 0
                if status != entry.status:
                    entry.status = status
                    for fd in entry.fds:
                        os.eventfd_write(fd, 1)
                    changed = True
        return changed


def query_jobs(job_ids: list[str]) -> dict[str, JobStatus] | None:
    """One ``squeue`` for all ``job_ids``; None when squeue could not answer."""
    argv = ["squeue", "--noheader", "--states=all", f"--format={_FORMAT}", "--jobs=" + ",".join(job_ids)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        # Every id unknown (all purged) is an error to squeue; anything else is a hiccup.
        return {} if "Invalid job id" in done.stderr else None
    return dict(parse_line(line) for line in done.stdout.splitlines() if line.count("|") == 5)


def parse_line(line: str) -> tuple[str, JobStatus]:
    """``"12|RUNNING|None|n1|2026-11-30T22:01:18|multi"`` -> ("12", JobStatus(...))."""
    job_id, state, reason, node, end, partition = (part.strip() for part in line.split("|"))
    reason = "" if reason == "None" else reason
    return job_id, JobStatus(state.split()[0], reason, node, _epoch(end), partition)


def _epoch(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text).timestamp()  # squeue prints local time
    except ValueError:  # N/A, NONE, Unknown
        return None
