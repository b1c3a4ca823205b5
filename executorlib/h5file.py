"""The HDF5 file of one call: written atomically and privately, read only when trusted.

A file holds pickled blobs (``function``, ``args``, ``kwargs``, ``resources``, and
``result`` or ``error`` + ``traceback``; a task file also ``result_path``), the ``name``
and the ``runtime`` in seconds. Small blobs are HDF5 attributes, large ones datasets
(attributes are limited to 64 kB). Files up to 1 MiB are built and read as one image in
memory (one write, one read); larger ones through the descriptor we opened.

Writing goes through executorlib.files.replacing (a private temporary file under a
random name, then ``os.replace``); reading through executorlib.files.open_trusted (the
directory and the file are checked on the open handles). In a shared cache
(``EXECUTORLIB_SHARED_CACHE_KEY_FILE``) every blob carries an HMAC (``mac.<blob>``)
bound to the file name, and a blob is returned only when it verifies.

This is the only module that imports h5py (``pip install 'executorlib[cache]'``).
"""

from __future__ import annotations

import hmac
import os
import pickle
import warnings
from typing import Any

from executorlib.errors import with_remote_traceback
from executorlib.files import (
    KEY_FILE_VARIABLE,
    UntrustedFileError,
    descriptor_path,
    entry_mac,
    open_trusted,
    replacing,
    shared_key,
)

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
_IN_MEMORY_MAX = 1024 * 1024  # smaller files are written and read as one image
# No HDF5 file locks: files are never changed in place (written aside, then replaced).
_ACCESS = h5p.create(h5p.FILE_ACCESS)
_ACCESS.set_file_locking(False, True)


# ------------------------------------------------------------ file format
def write_file(path: str, blobs: dict[str, bytes], name: str, runtime: float = 0.0) -> None:
    """Write ``blobs`` (pickles) plus ``name`` and ``runtime`` to ``path`` atomically,
    private, through a temporary file of our own (never a planted link)."""
    small = sum(map(len, blobs.values())) <= _IN_MEMORY_MAX
    with replacing(path) as descriptor:
        if small:  # built in memory, one write: no second open of the file
            fid = h5f.create(b"in-memory", h5f.ACC_TRUNC, fapl=_IN_MEMORY)
        else:  # HDF5 writes the very file we created, through its descriptor
            fid = h5f.create(descriptor_path(descriptor).encode(), h5f.ACC_TRUNC, fapl=_ACCESS)
        try:
            _fill(fid, _entry(path), blobs, name, runtime)
            if small:
                h5f.flush(fid)
                os.write(descriptor, fid.get_file_image())
        finally:
            fid.close()


def _fill(fid: Any, entry: str, blobs: dict[str, bytes], name: str, runtime: float) -> None:
    key = shared_key()
    for blob_name, blob in blobs.items():
        _write_blob(fid, blob_name, blob)
        if key is not None:
            _write_blob(fid, f"mac.{blob_name}", entry_mac(key, entry, blob_name, blob))
    _write_blob(fid, "name", name.encode())
    runtime_attribute = h5a.create(fid, b"runtime", h5t.IEEE_F64LE, h5s.create(h5s.SCALAR))
    runtime_attribute.write(np.array(runtime, dtype=np.float64))
    runtime_attribute.close()


def _in_memory(image: bytes | None = None) -> Any:
    """File access through HDF5's core driver: a file image in memory, no file opened."""
    access = h5p.create(h5p.FILE_ACCESS)
    access.set_fapl_core(block_size=64 * 1024, backing_store=False)
    if image is not None:
        access.set_file_image(image)
    return access


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
        try:  # HDF5 reads the very file we checked: its bytes, or through its descriptor
            size = os.fstat(descriptor).st_size
            if size <= _IN_MEMORY_MAX:
                image = _read_all(descriptor, size)
                self._fid = h5f.open(b"in-memory", h5f.ACC_RDONLY, fapl=_in_memory(image))
            else:
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


_IN_MEMORY = _in_memory()


def _read_all(descriptor: int, size: int) -> bytes:
    chunks = []
    while size > 0 and (chunk := os.read(descriptor, size)):
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


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
