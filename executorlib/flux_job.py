"""The handle of one worker running as a Flux job, with the interface of ``WorkerProcess``.

The job's future (a ``flux.job.FluxExecutorFuture``; any ``concurrent.futures.Future``
works) writes an eventfd from its done-callback, so the manager's one poll wakes when
the job ends and no thread waits per job. How it ended comes from the future, the
``finish`` event's wait status, and the last lines of the job's stderr: from its log
file where ``flux_log_files`` asked for one, else from the job's output eventlog in
Flux's KVS (read through a callable, so this module never imports ``flux``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from executorlib.interactive import private_env
from executorlib.processes import describe_exit, tail_lines

_STDERR_TAIL_BYTES = 4096
_TAIL_LINES = 30


class FluxJob:
    """A submitted worker job. ``cancel`` stops it; ``read_stderr`` (called once it has
    ended) returns its stderr as Flux kept it; ``private_file`` is removed when it ends."""

    def __init__(
        self,
        future: Future,
        cancel: Callable[[], None],
        stderr_path: str | None = None,
        read_stderr: Callable[[str], str] | None = None,
        private_file: str | None = None,
    ) -> None:
        self._future = future
        self._cancel = cancel
        self._stderr_path = stderr_path
        self._read_stderr = read_stderr
        self._private_file = private_file
        self._lock = threading.Lock()
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.job_id: str | None = None
        self.wait_status: int | None = None
        future.add_done_callback(self._on_done)

    def note_job_id(self, job_id: Any) -> None:
        """Record the job id once Flux has assigned it (called from Flux's thread)."""
        if job_id is not None:
            self.job_id = str(job_id)  # a flux.job.JobID prints as its f58 form, e.g. ƒ2mGTx3

    def note_finish(self, wait_status: int) -> None:
        """Record the wait status of the job's ``finish`` event."""
        self.wait_status = wait_status

    def _on_done(self, _: Future) -> None:
        with self._lock:
            if self._fd >= 0:
                os.eventfd_write(self._fd, 1)

    def fds(self) -> list[int]:
        """The eventfd that becomes readable when the job has ended."""
        return [self._fd]

    def on_readable(self, fd: int) -> bool:
        """The job has ended: close the eventfd, drop an unread private file, say so."""
        with self._lock:
            os.close(self._fd)
            self._fd = -1
        private_env.discard(self._private_file)
        return True

    def how_it_ended(self) -> str:
        """The job id and its exception or exit status, plus the last lines of stderr."""
        name = f"Flux job {self.job_id}" if self.job_id else "Flux job (no id yet)"
        text = f"{name}: {describe_job_end(self._future, self.wait_status)}"
        if self._stderr_path is not None:
            lines, where = file_tail(self._stderr_path), self._stderr_path
        else:
            lines, where = self._eventlog_tail(), "its stderr (from Flux's output eventlog)"
        if lines:
            text += f"; last lines of {where}:\n    " + "\n    ".join(lines)
        return text

    def _eventlog_tail(self) -> list[str]:
        if self._read_stderr is None or self.job_id is None:
            return []
        try:
            text = self._read_stderr(self.job_id)
        except Exception as error:  # the instance is gone, or the job never started
            return [f"(its stderr could not be read from Flux: {type(error).__name__}: {error})"]
        return text.strip().splitlines()[-_TAIL_LINES:]

    def stop(self) -> None:
        """Cancel the job (Flux ends its tasks); a no-op once it has ended."""
        if not self._future.done():
            self._cancel()


def describe_job_end(future: Future, wait_status: int | None) -> str:
    """'exit code 3', 'signal SIGKILL (9)', 'cancelled before it ran', or the job's
    exception (a ``flux.job.JobException``: timeout, cancel, lost node; or why the
    submission failed), with the tasks' wait status where the ``finish`` event has one."""
    if future.cancelled():
        return "cancelled before it ran"
    if not future.done():
        return "still running"
    parts = []
    error = future.exception()
    if error is not None:
        parts.append(f"{type(error).__name__}: {error}")
    if wait_status is not None:
        parts.append(f"tasks ended with {describe_exit(os.waitstatus_to_exitcode(wait_status))}")
    elif error is None:
        parts.append(describe_exit(future.result()))
    return "; ".join(parts)


def file_tail(path: str | None, lines: int = _TAIL_LINES) -> list[str]:
    """The last ``lines`` lines of a log file, or [] when there is none."""
    return tail_lines(path, lines, _STDERR_TAIL_BYTES) or []
