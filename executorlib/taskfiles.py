"""Where the files of one call live in a cache directory: one object owns the paths.

    DIR/<key>.h5              the outcome: a result, or an error (submission jobs only)
    DIR/jobs/<key>.task.h5    submission mode: the call, as the job reads it
    DIR/jobs/<key>.sh         its job script
    DIR/jobs/<key>.job        its queue job id
    DIR/jobs/<key>.out        its output (the queue's ``--output``)

The key is the call's file name (executorlib.hashing.task_key). Paths only, no I/O:
reading and writing them safely is executorlib.files and executorlib.cache.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

JOB_SUFFIXES = (".task.h5", ".sh", ".job", ".out")


@dataclass(frozen=True)
class TaskFiles:
    """The files of the call ``key`` in the cache directory ``directory`` (absolute)."""

    directory: str
    key: str

    @property
    def result(self) -> str:
        """The outcome file: the result (or a submission job's error)."""
        return os.path.join(self.directory, f"{self.key}.h5")

    @property
    def jobs(self) -> str:
        """The folder of the job files (submission mode)."""
        return jobs_directory(self.directory)

    @property
    def task(self) -> str:
        """The call as a submission job reads it."""
        return self._job(".task.h5")

    @property
    def script(self) -> str:
        """The job script."""
        return self._job(".sh")

    @property
    def job_id(self) -> str:
        """The file that holds the queue's job id."""
        return self._job(".job")

    @property
    def output(self) -> str:
        """The job's output."""
        return self._job(".out")

    def _job(self, suffix: str) -> str:
        return os.path.join(self.jobs, f"{self.key}{suffix}")


def jobs_directory(directory: str) -> str:
    """The folder of the job files of the cache directory ``directory``."""
    return os.path.join(directory, "jobs")


def files_by_key(directory: str) -> dict[str, set[str]]:
    """Every file of ``directory``'s calls that exists, grouped by the call's key (keys
    with sub-directories included)."""
    found: dict[str, set[str]] = {}
    jobs = jobs_directory(directory)
    for path in glob.glob(os.path.join(glob.escape(directory), "**", "*.h5"), recursive=True):
        if not path.startswith(jobs + os.sep):
            found.setdefault(os.path.relpath(path, directory)[: -len(".h5")], set()).add(path)
    for path in glob.glob(os.path.join(glob.escape(jobs), "**", "*"), recursive=True):
        name = os.path.relpath(path, jobs)
        suffix = next((s for s in JOB_SUFFIXES if name.endswith(s)), None)
        if suffix is not None:
            found.setdefault(name[: -len(suffix)], set()).add(path)
    return found
