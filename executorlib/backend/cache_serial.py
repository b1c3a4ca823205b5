"""A submission job: ``python -m executorlib.backend.cache_serial TASK_FILE``.

Reads the call from the task file (inputs from earlier calls are read from their
result files as the arguments are unpickled), runs it, and writes the result file
named in the task file atomically: the result, or the error with its traceback. Exits
1 when the call failed, so the queue shows the job as failed.
"""

from __future__ import annotations

import pickle
import sys
import time
from collections.abc import Callable
from typing import Any

from executorlib.h5file import read_file, write_file
from executorlib.serialize import failure_blobs, to_bytes

TASK_BLOBS = ("function", "args", "kwargs", "resources", "result_path")
# What runs the loaded call here: the function itself, or every MPI rank.
Runner = Callable[[Callable[..., Any], tuple, dict], Any]


def run_task_file(task_file: str, run: Runner, write: bool = True) -> bool:
    """Load, run and (if ``write``) store the call in ``task_file``; True on success."""
    task = read_file(task_file, TASK_BLOBS)
    start = time.perf_counter()
    try:
        fn, args, kwargs = (pickle.loads(task[key]) for key in ("function", "args", "kwargs"))
        outcome = {"result": to_bytes(run(fn, args, kwargs))}
    except BaseException as error:  # the job's whole purpose is to report it
        outcome = failure_blobs(error)
    if write:
        blobs = {key: task[key] for key in TASK_BLOBS[:-1]}
        write_file(task["result_path"].decode(), {**blobs, **outcome}, task["name"],
                   time.perf_counter() - start)
    return "result" in outcome


def main() -> None:
    ok = run_task_file(sys.argv[1], lambda fn, args, kwargs: fn(*args, **kwargs))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
