"""The result cache: one HDF5 file per call, found again by a later run.

The file name is the key (executorlib.hashing): ``<function name>_<hash>.h5``, or
``<cache_key>.h5``; a lookup is one open, never a walk of the directory. Where a call's
other files live (task file, job script, output) is executorlib.taskfiles; the file
format, and how it is written and read safely, executorlib.h5file. Errors are stored
only by submission jobs and are never served as hits: errors are not cached. A file that
cannot be read, or that another user could have written, is reported in a warning and
computed again; a cache directory another user owns or can write is refused.
"""

from __future__ import annotations

import functools
import os
import pickle
import time
import warnings
from concurrent.futures import Future
from typing import Any

from executorlib.dependencies import settle
from executorlib.files import TrustedDirectory, UntrustedFileError, check_directory, read_small_text
from executorlib.h5file import outcome_of, read_file, read_outcome, write_file
from executorlib.hashing import task_key
from executorlib.resources import Resources
from executorlib.serialize import to_bytes
from executorlib.task import Task
from executorlib.taskfiles import TaskFiles, files_by_key


class Upstream:
    """In a submission job's arguments: the result of an earlier call, read from its
    file when the job unpickles its arguments; hashed as the earlier call's key."""

    def __init__(self, path: str, key: str) -> None:
        self.path, self.key = path, key

    def __reduce__(self) -> tuple:
        return load_result, (self.path,)

    def __stable_key__(self) -> tuple:
        return ("upstream", self.key)


def load_result(path: str) -> Any:
    """The result stored in ``path``; an error naming the file if there is none."""
    try:
        kind, value = outcome_of(path)
    except Exception as error:
        raise RuntimeError(f"the input of this call should be in {path}, but it cannot be read: "
                           f"{type(error).__name__}: {error}") from error
    if kind != "result":
        raise RuntimeError(f"the input of this call should be in {path}, but it holds an error: {value!r}")
    return value


def call_blobs(task: Task) -> dict[str, bytes]:
    """The pickled function (by value, so another process can load it), args, kwargs
    and resources of ``task``."""
    import cloudpickle

    return {
        "function": cloudpickle.dumps(task.fn, protocol=5),
        "args": to_bytes(task.args),
        "kwargs": to_bytes(task.kwargs),
        "resources": resources_blob(task.resources),
    }


@functools.lru_cache(maxsize=64)
def resources_blob(resources: Resources) -> bytes:
    """The pickled ``as_dict()`` of ``resources`` (computed once per distinct value)."""
    return pickle.dumps(resources.as_dict(), protocol=5)


# ----------------------------------------------------------- the cache
class FileCache:
    """The scheduler's result cache (``ResultCache`` in interactive/scheduler.py).

    ``load`` runs in the manager thread once the task's inputs are resolved: on a hit
    it resolves the future and no worker is touched. ``store`` writes the result.
    """

    def __init__(self, cache_directory: str) -> None:
        self._directory = TrustedDirectory(cache_directory)  # opened and checked once
        self.directory = self._directory.path
        self._started: dict[Task, tuple[str, float]] = {}

    def path(self, key: str) -> str:
        """The result file of ``key``."""
        return TaskFiles(self.directory, key).result

    def load(self, task: Task) -> bool:
        """True if ``task`` is done: served from its file, or failed to be hashed."""
        try:
            path = self.path(task_key(task))
        except Exception as error:
            settle(task.future, exception=_unhashable(task, error))
            return True
        outcome = read_outcome(path, directory=self._directory)
        if outcome is not None and outcome[0] == "result":
            settle(task.future, result=outcome[1])
            return True
        self._started[task] = (path, time.perf_counter())
        task.future.add_done_callback(lambda _: self._started.pop(task, None))
        return False

    def store(self, task: Task, value: Any) -> None:
        """Write ``value`` as the result of ``task`` (a warning if that fails)."""
        path, start = self._started.pop(task, (None, 0.0))
        if path is None:
            return
        try:
            blobs = {**call_blobs(task), "result": to_bytes(value)}
            write_file(path, blobs, task.name, time.perf_counter() - start, self._directory)
        except Exception as error:
            warnings.warn(
                f"the result of {task.name} could not be cached in {path} "
                f"({type(error).__name__}: {error}); it is returned but not stored",
                RuntimeWarning, stacklevel=2,
            )


def _unhashable(task: Task, error: Exception) -> Exception:
    if isinstance(error, ValueError):
        return error
    return TypeError(
        f"cannot cache {task.name}: its function or arguments cannot be pickled for the "
        f"cache key ({type(error).__name__}: {error}); pass resource_dict={{'cache_key': ...}} "
        "or run it without cache_directory"
    )


# ------------------------------------------------------ public functions
def get_cache_data(cache_directory: str) -> list[dict]:
    """One dict per cached call in ``cache_directory``, ready for ``pandas.DataFrame``:
    ``function`` (name), ``input_args``, ``input_kwargs``, ``output`` (the result),
    ``error``, ``traceback``, ``runtime`` (seconds), ``queue_id`` (submission mode's job
    id, else None), ``resources`` and ``filename``; ``args``, ``kwargs`` and ``result``
    are the same values under their older names. This unpickles the stored values, so
    a directory or file that another user owns or can write is refused (see
    executorlib.files); unreadable files are skipped with a warning."""
    directory = os.path.abspath(cache_directory)
    check_directory(directory)
    rows = []
    for key, paths in sorted(files_by_key(directory).items()):
        files = TaskFiles(directory, key)
        if files.result not in paths:
            continue
        try:
            found = read_file(files.result, _DATA_BLOBS)
            loaded = {name: pickle.loads(found[name]) for name in _DATA_BLOBS[:-1] if name in found}
        except Exception as error:
            warnings.warn(f"skipping unreadable cache file {files.result}: {error}", RuntimeWarning,
                          stacklevel=2)
            continue
        rows.append(_row(files, found, loaded))
    return rows


_DATA_BLOBS = ("args", "kwargs", "result", "error", "resources", "traceback")


def _row(files: TaskFiles, found: dict[str, Any], loaded: dict[str, Any]) -> dict[str, Any]:
    args, kwargs, result = loaded.get("args"), loaded.get("kwargs"), loaded.get("result")
    return {
        "function": found["name"], "input_args": args, "input_kwargs": kwargs, "output": result,
        "error": loaded.get("error"), "traceback": found.get("traceback", b"").decode() or None,
        "runtime": found["runtime"], "queue_id": _queue_id(files), "resources": loaded.get("resources"),
        "filename": files.result, "args": args, "kwargs": kwargs, "result": result,
    }


def _queue_id(files: TaskFiles) -> str | None:
    try:
        return read_small_text(files.job_id).strip() or None
    except (OSError, ValueError):  # not submitted as a job, or no usable id
        return None


def get_future_from_cache(cache_directory: str, cache_key: str) -> Future:
    """A done future holding the result (or error) stored under ``cache_key`` (the file
    name without ``.h5``, e.g. the ``cache_key`` given in ``resource_dict``)."""
    path = TaskFiles(os.path.abspath(cache_directory), cache_key).result
    try:
        outcome = outcome_of(path)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"no cached result {cache_key!r} in {cache_directory}: {path} does not exist; "
            "get_cache_data(cache_directory) lists what is there"
        ) from error
    except UntrustedFileError:
        raise
    except Exception as error:
        raise OSError(f"the cache file {path} cannot be read ({type(error).__name__}: {error}); "
                      "delete it and run the call again") from error
    future: Future = Future()
    if outcome[0] == "result":
        future.set_result(outcome[1])
    else:
        future.set_exception(outcome[1])
    return future
