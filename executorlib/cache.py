"""Results in HDF5 files that outlive the Python process: one file per call.

The file name is the key (executorlib.hashing): ``<function name>_<hash>.h5``, or
``<cache_key>.h5``; a lookup is one open, never a walk of the directory. Where a call's
other files live (task file, job script, output) is executorlib.taskfiles.

A file holds the pickled function, args, kwargs and resources, and either ``result``
or ``error`` (error files are written only by submission jobs and are never served
as hits: errors are not cached), the ``name`` and the ``runtime`` in seconds. Small
blobs are HDF5 attributes, large ones datasets (attributes are limited to 64 kB). A
file is written under a random temporary name created exclusively and ``os.replace``d
(executorlib.files), so one that exists is complete; one that cannot be read anyway is
reported in a warning and recomputed.

Nothing is unpickled from a file or directory another user owns or can write
(executorlib.files.open_trusted); in a shared cache (``EXECUTORLIB_SHARED_CACHE_KEY_FILE``)
every blob carries an HMAC (``mac.<blob>``) and is unpickled only when it verifies.

This is the only module that imports h5py (``pip install 'executorlib[cache]'``).
"""

from __future__ import annotations

import functools
import glob
import hmac
import os
import pickle
import time
import warnings
from concurrent.futures import Future
from typing import Any

from executorlib.dependencies import settle
from executorlib.errors import with_remote_traceback
from executorlib.files import (
    KEY_FILE_VARIABLE,
    UntrustedFileError,
    check_directory,
    descriptor_path,
    entry_mac,
    open_trusted,
    private_directory,
    read_small_text,
    replacing,
    shared_key,
)
from executorlib.hashing import task_key
from executorlib.resources import Resources
from executorlib.serialize import to_bytes
from executorlib.task import Task
from executorlib.taskfiles import TaskFiles

try:
    import numpy as np
    from h5py import h5a, h5d, h5f, h5p, h5s, h5t
except ImportError as _error:  # pragma: no cover - depends on the installation
    raise ImportError(
        "cache_directory and submission mode store results in HDF5 files, which needs h5py: "
        "pip install 'executorlib[cache]'"
    ) from _error

BLOBS = ("function", "args", "kwargs", "resources", "result", "error", "traceback")
_ATTRIBUTE_MAX = 32 * 1024  # bigger blobs go to datasets (attribute limit: 64 kB)
# No HDF5 file locks: files are never changed in place (written aside, then replaced).
_ACCESS = h5p.create(h5p.FILE_ACCESS)
_ACCESS.set_file_locking(False, True)


# ------------------------------------------------------------ file format
def write_file(path: str, blobs: dict[str, bytes], name: str, runtime: float = 0.0) -> None:
    """Write ``blobs`` (pickles) plus ``name`` and ``runtime`` to ``path`` atomically,
    private, through a temporary file of our own (never a planted link)."""
    key, entry = shared_key(), _entry(path)
    with replacing(path) as descriptor:
        fid = h5f.create(descriptor_path(descriptor).encode(), h5f.ACC_TRUNC, fapl=_ACCESS)
        try:
            for blob_name, blob in blobs.items():
                _write_blob(fid, blob_name, blob)
                if key is not None:
                    _write_blob(fid, f"mac.{blob_name}", entry_mac(key, entry, blob_name, blob))
            _write_blob(fid, "name", name.encode())
            runtime_attribute = h5a.create(fid, b"runtime", h5t.IEEE_F64LE, h5s.create(h5s.SCALAR))
            runtime_attribute.write(np.array(runtime, dtype=np.float64))
            runtime_attribute.close()
        finally:
            fid.close()


def _entry(path: str) -> str:
    """What an entry's HMAC binds it to: its file name (so it cannot be moved to another)."""
    return os.path.basename(path)


def _write_blob(fid: Any, key: str, blob: bytes) -> None:
    data = np.frombuffer(blob, dtype=np.uint8)
    space = h5s.create_simple((max(data.size, 1),))
    data = data if data.size else np.zeros(1, dtype=np.uint8)  # HDF5 has no empty extents
    if data.size <= _ATTRIBUTE_MAX:
        target = h5a.create(fid, key.encode(), h5t.STD_U8LE, space)
        target.write(data)
    else:
        target = h5d.create(fid, key.encode(), h5t.STD_U8LE, space)
        target.write(h5s.ALL, h5s.ALL, data)
    target.close()


class _Reader:
    """An open result or task file whose blobs may be unpickled: opened through
    ``open_trusted``; in a shared directory every blob's HMAC is checked on reading."""

    def __init__(self, path: str) -> None:
        descriptor, shared = open_trusted(path)
        try:  # HDF5 opens the very file we checked, through its descriptor
            self._fid = h5f.open(descriptor_path(descriptor).encode(), h5f.ACC_RDONLY, fapl=_ACCESS)
        finally:
            os.close(descriptor)
        self.path, self._key = path, shared_key() if shared else None

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fid.close()

    def has(self, name: str) -> bool:
        if h5a.exists(self._fid, name.encode()):
            return True
        try:
            h5d.open(self._fid, name.encode()).close()
        except KeyError:  # h5py's "no such object"
            return False
        return True

    def blob(self, name: str) -> bytes:
        data = _read_blob(self._fid, name)
        if self._key is not None and name not in ("name",):
            mac = _read_blob(self._fid, f"mac.{name}") if self.has(f"mac.{name}") else b""
            if not hmac.compare_digest(mac, entry_mac(self._key, _entry(self.path), name, data)):
                raise UntrustedFileError(
                    f"refusing {self.path}: its {name!r} is not authenticated with the shared-cache "
                    f"key of {KEY_FILE_VARIABLE}; it was written without that key or changed since"
                )
        return data

    def runtime(self) -> float:
        runtime = np.empty((), dtype=np.float64)
        runtime_attribute = h5a.open(self._fid, b"runtime")
        runtime_attribute.read(runtime)
        runtime_attribute.close()
        return float(runtime)


def _read_blob(fid: Any, key: str) -> bytes:
    # Handles are closed at once: an open attribute keeps the file open after close().
    if h5a.exists(fid, key.encode()):
        source = h5a.open(fid, key.encode())
        data = np.empty(source.shape, dtype=np.uint8)
        source.read(data)
    else:
        source = h5d.open(fid, key.encode())
        data = np.empty(source.shape, dtype=np.uint8)
        source.read(h5s.ALL, h5s.ALL, data)
    source.close()
    return data.tobytes()


def read_file(path: str, keys: tuple[str, ...] = BLOBS) -> dict[str, Any]:
    """The blobs of ``keys`` present in ``path`` (bytes, authenticated where the cache
    is shared), plus ``name`` and ``runtime``. Raises ``OSError`` (missing, truncated,
    not HDF5; ``UntrustedFileError`` when another user could have written it) or
    ``KeyError`` (not ours)."""
    with _Reader(path) as reader:
        found = {key: reader.blob(key) for key in keys if reader.has(key)}
        found["name"] = reader.blob("name").decode()
        found["runtime"] = reader.runtime()
    return found


def read_outcome(path: str, warn: bool = True) -> tuple[str, Any] | None:
    """``("result", value)`` or ``("error", exception)`` stored in ``path``; None if the
    file is missing or (with a warning) unreadable or untrusted. One open, one read."""
    try:
        return outcome_of(path)
    except FileNotFoundError:
        return None
    except Exception as error:
        if warn:
            warnings.warn(
                f"executorlib cache file {path} cannot be read ({type(error).__name__}: {error}); "
                "the call runs again and the file is overwritten",
                RuntimeWarning, stacklevel=2,
            )
        return None


def outcome_of(path: str) -> tuple[str, Any]:
    """Like :func:`read_outcome`, but every problem is raised."""
    with _Reader(path) as reader:
        if reader.has("result"):
            return "result", pickle.loads(reader.blob("result"))
        error = pickle.loads(reader.blob("error"))
        if reader.has("traceback"):
            error = with_remote_traceback(error, reader.blob("traceback").decode())
        return "error", error


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
        self.directory = private_directory(cache_directory)
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
        outcome = read_outcome(path)
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
            write_file(path, blobs, task.name, time.perf_counter() - start)
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
    for path in sorted(glob.glob(os.path.join(glob.escape(directory), "*.h5"))):
        try:
            found = read_file(path, _DATA_BLOBS)
            loaded = {key: pickle.loads(found[key]) for key in _DATA_BLOBS[:-1] if key in found}
        except Exception as error:
            warnings.warn(f"skipping unreadable cache file {path}: {error}", RuntimeWarning, stacklevel=2)
            continue
        rows.append(_row(TaskFiles(directory, os.path.basename(path)[: -len(".h5")]), found, loaded))
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
