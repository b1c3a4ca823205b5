"""Results in HDF5 files that outlive the Python process: one file per call.

The file name is the key: ``<function name>_<hash>.h5``, the hash taken over the
function (module, name, bytecode, defaults, closure), the arguments and the keyword
arguments, so a lookup is one ``stat`` and one open, never a walk of the directory.
``resource_dict={"cache_key": "name"}`` names the file ``name.h5`` instead.

The hash is stable across processes: a function is hashed by what it is (its code),
not by its cloudpickle bytes, which differ between interpreters; sets are hashed in a
sorted order; and pickle's memo is off, so which equal objects happen to be shared
does not matter. A function's globals are not hashed: change a constant it reads and
use a new ``cache_key`` (or clear the directory).

A file holds the pickled function, args, kwargs and resources, and either ``result``
or ``error`` (error files are written only by submission jobs and are never served
as hits: errors are not cached), the ``name`` and the ``runtime`` in seconds. Small
blobs are HDF5 attributes, large ones datasets (attributes are limited to 64 kB). A
file is written under a temporary name and ``os.replace``d, so one that exists is
complete; one that cannot be read anyway is reported in a warning and recomputed.

This is the only module that imports h5py (``pip install 'executorlib[cache]'``).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import io
import os
import pickle
import re
import time
import types
import warnings
from concurrent.futures import Future
from typing import Any

from executorlib.dependencies import settle
from executorlib.errors import with_remote_traceback
from executorlib.resources import Resources
from executorlib.serialize import to_bytes
from executorlib.task import Task

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
_CODE_DIGESTS: dict[types.CodeType, bytes] = {}
# No HDF5 file locks: files are never changed in place (written aside, then replaced).
_ACCESS = h5p.create(h5p.FILE_ACCESS)
_ACCESS.set_file_locking(False, True)


# ------------------------------------------------------------------ the key
def task_key(task: Task) -> str:
    """The file name (without ``.h5``) of ``task``'s result: its ``cache_key``, or
    ``<function name>_<hash of the call>``."""
    key = task.resources.cache_key
    if key is not None:
        if not key or os.sep in key or key.startswith("."):
            raise ValueError(
                f"cache_key {key!r} of {task.name} must be a plain file name (no '{os.sep}', "
                "not starting with '.')"
            )
        return key
    call = (task.fn, task.args, task.kwargs)
    if task.resources.cores != 1:  # an MPI call returns one value per rank
        call += (task.resources.cores,)
    name = re.sub(r"[^\w.-]", "_", task.name)[:80]
    return f"{name}_{call_digest(call)}"


def call_digest(value: Any) -> str:
    """A hex digest of ``value`` that is the same in every process for equal values."""
    buffer = io.BytesIO()
    _StablePickler(buffer).dump(value)
    return hashlib.blake2b(buffer.getbuffer(), digest_size=16).hexdigest()


class _StablePickler(pickle.Pickler):
    """Pickles for hashing only: functions by their code, sets in sorted order."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=5)
        self.fast = True  # no memo: sharing of equal objects must not change the bytes
        self._open: set[int] = set()

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, types.FunctionType):
            return self._function(obj)
        if isinstance(obj, (set, frozenset)):
            return (type(obj).__name__, sorted(call_digest(item) for item in obj))
        stable = getattr(obj, "__stable_key__", None)  # e.g. an upstream result in a job
        return stable() if callable(stable) and not isinstance(obj, type) else None

    def _function(self, fn: types.FunctionType) -> tuple:
        if id(fn) in self._open:  # a closure that refers to itself
            return ("function", fn.__module__, fn.__qualname__)
        self._open.add(id(fn))
        cells = tuple(_cell_value(cell) for cell in fn.__closure__ or ())
        return ("function", fn.__module__, fn.__qualname__, _code_digest(fn.__code__),
                fn.__defaults__, fn.__kwdefaults__, cells)


def _cell_value(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _code_digest(code: types.CodeType) -> bytes:
    """Bytecode, names and constants (nested code included); not file or line numbers."""
    if code not in _CODE_DIGESTS:
        digest = hashlib.blake2b(digest_size=16)
        for part in (code.co_code, repr(code.co_names), repr(code.co_varnames),
                     repr((code.co_argcount, code.co_kwonlyargcount, code.co_flags))):
            digest.update(part if isinstance(part, bytes) else part.encode())
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                digest.update(_code_digest(const))
            elif isinstance(const, frozenset):
                digest.update(repr(sorted(map(repr, const))).encode())
            else:
                digest.update(f"{type(const).__name__}:{const!r}".encode())
        _CODE_DIGESTS[code] = digest.digest()
    return _CODE_DIGESTS[code]


# ------------------------------------------------------------ file format
def write_file(path: str, blobs: dict[str, bytes], name: str, runtime: float = 0.0) -> None:
    """Write ``blobs`` (pickles) plus ``name`` and ``runtime`` to ``path`` atomically."""
    temporary = f"{path}.{os.getpid()}.tmp"
    fid = h5f.create(temporary.encode(), h5f.ACC_TRUNC, fapl=_ACCESS)
    try:
        for key, blob in blobs.items():
            _write_blob(fid, key, blob)
        _write_blob(fid, "name", name.encode())
        runtime_attribute = h5a.create(fid, b"runtime", h5t.IEEE_F64LE, h5s.create(h5s.SCALAR))
        runtime_attribute.write(np.array(runtime, dtype=np.float64))
        runtime_attribute.close()
    finally:
        fid.close()
    os.replace(temporary, path)


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


def read_file(path: str, keys: tuple[str, ...] = BLOBS) -> dict[str, Any]:
    """The blobs of ``keys`` present in ``path`` (bytes), plus ``name`` and ``runtime``.

    Raises ``OSError`` (missing, truncated or not HDF5) or ``KeyError`` (not ours)."""
    fid = h5f.open(path.encode(), h5f.ACC_RDONLY, fapl=_ACCESS)
    try:
        found = {key: _read_blob(fid, key) for key in keys if _has(fid, key)}
        found["name"] = _read_blob(fid, "name").decode()
        runtime = np.empty((), dtype=np.float64)
        runtime_attribute = h5a.open(fid, b"runtime")
        runtime_attribute.read(runtime)
        runtime_attribute.close()
        found["runtime"] = float(runtime)
    finally:
        fid.close()
    return found


def _has(fid: Any, key: str) -> bool:
    if h5a.exists(fid, key.encode()):
        return True
    try:
        h5d.open(fid, key.encode()).close()
    except KeyError:  # h5py's "no such object"
        return False
    return True


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


def read_outcome(path: str, warn: bool = True) -> tuple[str, Any] | None:
    """``("result", value)`` or ``("error", exception)`` stored in ``path``; None if the
    file is missing or (with a warning) unreadable. One open, one read: the hot path."""
    if not os.path.exists(path):
        return None
    try:
        fid = h5f.open(path.encode(), h5f.ACC_RDONLY, fapl=_ACCESS)
        try:
            if _has(fid, "result"):
                return "result", pickle.loads(_read_blob(fid, "result"))
            error = pickle.loads(_read_blob(fid, "error"))
            if _has(fid, "traceback"):
                error = with_remote_traceback(error, _read_blob(fid, "traceback").decode())
            return "error", error
        finally:
            fid.close()
    except Exception as error:
        if warn:
            warnings.warn(
                f"executorlib cache file {path} cannot be read ({type(error).__name__}: {error}); "
                "the call runs again and the file is overwritten",
                RuntimeWarning, stacklevel=2,
            )
        return None


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
    outcome = read_outcome(path, warn=False)
    if outcome is None or outcome[0] != "result":
        raise RuntimeError(f"the input of this call should be in {path}, but {_missing(outcome)}")
    return outcome[1]


def _missing(outcome: tuple | None) -> str:
    return "that file is missing or unreadable" if outcome is None else f"it holds an error: {outcome[1]!r}"


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
        self.directory = os.path.abspath(cache_directory)
        os.makedirs(self.directory, exist_ok=True)
        self._started: dict[Task, tuple[str, float]] = {}

    def path(self, key: str) -> str:
        """The result file of ``key``."""
        return os.path.join(self.directory, f"{key}.h5")

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
    ``function`` (name), ``args``, ``kwargs``, ``result``, ``error``, ``traceback``, ``runtime``
    (seconds), ``resources`` and ``filename``. Unreadable files are skipped with a
    warning."""
    rows = []
    for path in sorted(glob.glob(os.path.join(glob.escape(os.path.abspath(cache_directory)), "*.h5"))):
        try:
            found = read_file(path)
            loaded = {key: pickle.loads(found[key]) for key in BLOBS[:-1] if key in found}
        except Exception as error:
            warnings.warn(f"skipping unreadable cache file {path}: {error}", RuntimeWarning, stacklevel=2)
            continue
        rows.append({
            "function": found["name"], "args": loaded.get("args"), "kwargs": loaded.get("kwargs"),
            "result": loaded.get("result"), "error": loaded.get("error"),
            "traceback": found.get("traceback", b"").decode() or None,
            "runtime": found["runtime"], "resources": loaded.get("resources"), "filename": path,
        })
    return rows


def get_future_from_cache(cache_directory: str, cache_key: str) -> Future:
    """A done future holding the result (or error) stored under ``cache_key`` (the file
    name without ``.h5``, e.g. the ``cache_key`` given in ``resource_dict``)."""
    path = os.path.join(os.path.abspath(cache_directory), f"{cache_key}.h5")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no cached result {cache_key!r} in {cache_directory}: {path} does not exist; "
            "get_cache_data(cache_directory) lists what is there"
        )
    outcome = read_outcome(path, warn=False)
    if outcome is None:
        raise OSError(f"the cache file {path} cannot be read; delete it and run the call again")
    future: Future = Future()
    if outcome[0] == "result":
        future.set_result(outcome[1])
    else:
        future.set_exception(outcome[1])
    return future
