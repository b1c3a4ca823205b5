"""An MPI submission job: ``srun --mpi=pmix python -m executorlib.backend.cache_parallel TASK_FILE``.

Every rank loads and runs the call; rank 0 gathers the per-rank results (a list, as in
interactive mode) or the first failing rank's error, and writes the result file.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from mpi4py import MPI

from executorlib.backend.cache_serial import run_task_file

COMM = MPI.COMM_WORLD


class RankFailed(Exception):
    """Raised on rank 0 with the first failing rank's error as ``__cause__``."""


def run_on_every_rank(fn: Callable[..., Any], args: tuple, kwargs: dict) -> list:
    """Run here, gather on rank 0; any rank's failure fails the call on every rank."""
    try:
        outcome: tuple = (True, fn(*args, **kwargs))
    except BaseException as error:
        where = f"MPI rank {COMM.Get_rank()} of {COMM.Get_size()} on {MPI.Get_processor_name()}"
        outcome = (False, f"{type(error).__name__}: {error} (raised on {where})")
    outcomes = COMM.gather(outcome)
    failed = COMM.bcast([text for ok, text in outcomes if not ok] if outcomes else None)
    if failed:
        raise RankFailed(failed[0])
    return [value for _, value in outcomes] if outcomes else []


def main() -> None:
    ok = run_task_file(sys.argv[1], run_on_every_rank, write=COMM.Get_rank() == 0)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
