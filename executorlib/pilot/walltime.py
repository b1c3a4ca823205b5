"""How long a Slurm job has left, and the rule that no call starts that Slurm will kill.

Used by pilot pools (each worker job's end comes from the squeue watcher) and by
``SlurmJobExecutor`` inside an allocation: a call whose ``run_time_max`` exceeds the time
the allocation has left fails at ``submit`` with a message that says so, instead of
being killed mid-way by the allocation's time limit.
"""

from __future__ import annotations

import time

from executorlib.pilot.watcher import query_jobs


class AllocationClock:
    """The end time of one Slurm job, asked of squeue once and again only when a call
    would not fit (the limit may have been raised with ``scontrol update``)."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self._end: float | None = None
        self._asked = False

    def check(self, run_time_max: int, what: str) -> None:
        """A ValueError if ``run_time_max`` seconds exceed what the job has left."""
        if self._fits(run_time_max):
            return
        self._ask()
        if self._fits(run_time_max):
            return
        left = max(0.0, self._end - time.time())
        raise ValueError(
            f"{what} declares run_time_max={run_time_max} s but the allocation (Slurm job "
            f"{self.job_id}) ends in {left:.0f} s, so Slurm would kill it before it ends; ask for "
            "a longer allocation (salloc/sbatch --time), or lower run_time_max"
        )

    def _fits(self, run_time_max: int) -> bool:
        if not self._asked:
            self._ask()
        return self._end is None or self._end - time.time() >= run_time_max

    def _ask(self) -> None:
        self._asked = True
        status = (query_jobs([self.job_id]) or {}).get(self.job_id)
        self._end = status.end_time if status is not None else None
