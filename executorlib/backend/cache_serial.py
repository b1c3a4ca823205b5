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
import traceback
from collections.abc import Callable
from typing import Any

from executorlib.cache import read_file, write_file

TASK_BLOBS = ("function", "args", "kwargs", "resources", "result_path")
# What runs the loaded call here: the function itself, or every MPI rank.
Runner = Callable[[Callable[..., Any], tuple, dict], Any]


def run_task_file(task_file: str, run: Runner, write: bool = True) -> bool:
    """Load, run and (if ``write``) store the call in ``task_file``; True on success."""
    task = read_file(task_file, TASK_BLOBS)
    start = time.perf_counter()
    try:
        fn, args, kwargs = (pickle.loads(task[key]) for key in ("function", "args", "kwargs"))
        outcome = {"result": pickle_result(run(fn, args, kwargs))}
    except BaseException as error:  # the job's whole purpose is to report it
        outcome = failure_blobs(error)
    if write:
        blobs = {key: task[key] for key in TASK_BLOBS[:-1]}
        write_file(task["result_path"].decode(), {**blobs, **outcome}, task["name"],
                   time.perf_counter() - start)
    return "result" in outcome


def pickle_result(value: Any) -> bytes:
    try:
        return pickle.dumps(value, protocol=5)
    except Exception:
        import cloudpickle

        return cloudpickle.dumps(value, protocol=5)


def failure_blobs(error: BaseException, where: str = "") -> dict[str, bytes]:
    """The pickled exception (a RuntimeError if it will not pickle) and its traceback."""
    text = "".join(traceback.format_exception(error)) + (f"(raised on {where})\n" if where else "")
    try:
        blob = pickle.dumps(error, protocol=5)
        pickle.loads(blob)
    except Exception:
        blob = pickle.dumps(RuntimeError(f"{type(error).__qualname__}: {error}"), protocol=5)
    return {"error": blob, "traceback": text.encode()}


def main() -> None:
    ok = run_task_file(sys.argv[1], lambda fn, args, kwargs: fn(*args, **kwargs))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
