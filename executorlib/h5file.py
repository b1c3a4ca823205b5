"""The HDF5 file of one call: written atomically and privately, read only when trusted.

A file holds pickled blobs (``function``, ``args``, ``kwargs``, ``resources``, and
``result`` or ``error`` + ``traceback``; a task file also ``result_path``), the ``name``
and the ``runtime`` in seconds. Two layouts, both plain HDF5 that h5py opens:

- **packed** (files up to 1 MiB, nearly every call): the blobs one after the other in
  one uint8 attribute (a dataset above 32 kB) ``blobs``, and ``index``, a JSON text
  ``{"format": 2, "name", "runtime", "blobs": {name: [start, length]}}``. The file is
  built in memory and written with one ``write``. Its HDF5 user block (the bytes HDF5
  leaves to applications before the superblock) repeats the index, plus where
  ``blobs`` lies in the file and its BLAKE2b digest, so a lookup reads the file once
  and slices the blob out without opening it as HDF5: HDF5's own open costs more
  than the rest of a cache hit (benchmarks/bench_cache.py). A file whose digest does
  not match (changed in place with h5py, say) is read through HDF5 instead.
- **one object per blob** (bigger files, and files of earlier versions): each blob an
  attribute (up to 32 kB; attributes are limited to 64 kB) or a dataset of its own
  name, plus ``name`` and a ``runtime`` attribute; written through the descriptor we
  created, so a large result is never copied into one more buffer.

Writing goes through executorlib.files.replacing (a private temporary file under a
random name, then ``os.replace``); reading through executorlib.files.open_trusted (the
directory and the file are checked on the open handles). In a shared cache
(``EXECUTORLIB_SHARED_CACHE_KEY_FILE``) every blob carries an HMAC (``mac.<blob>``)
bound to the file name, and a blob is returned only when it verifies.

This is the only module that imports h5py (``pip install 'executorlib[cache]'``).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import pickle
import warnings
from typing import Any

from executorlib.errors import with_remote_traceback
from executorlib.files import (
    KEY_FILE_VARIABLE,
    TrustedDirectory,
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
_IN_MEMORY_MAX = 1024 * 1024  # blobs up to this size are packed, written as one image
_READ_WHOLE_MAX = 2 * _IN_MEMORY_MAX  # files up to this size are read as one image
_MAGIC = b"executorlib cache file\n"  # first line of a packed file's user block
_FORMAT = 2
# No HDF5 file locks: files are never changed in place (written aside, then replaced).
_ACCESS = h5p.create(h5p.FILE_ACCESS)
_ACCESS.set_file_locking(False, True)


# ------------------------------------------------------------ file format
def write_file(path: str, blobs: dict[str, bytes], name: str, runtime: float = 0.0,
               directory: TrustedDirectory | None = None) -> None:
    """Write ``blobs`` (pickles) plus ``name`` and ``runtime`` to ``path`` atomically,
    private, through a temporary file of our own (never a planted link); ``directory``:
    the already opened cache directory ``path`` lies in, if any."""
    blobs = _with_macs(_entry(path), blobs)
    with (directory.replacing(path) if directory else replacing(path)) as descriptor:
        if sum(map(len, blobs.values())) <= _IN_MEMORY_MAX:
            _write_all(descriptor, _packed_image(blobs, name, runtime))
        else:  # HDF5 writes the very file we created, through its descriptor
            fid = h5f.create(descriptor_path(descriptor).encode(), h5f.ACC_TRUNC, fapl=_ACCESS)
            try:
                _fill(fid, blobs, name, runtime)
            finally:
                fid.close()


def _with_macs(entry: str, blobs: dict[str, bytes]) -> dict[str, bytes]:
    """``blobs`` plus, in a shared cache, the HMAC of each (``mac.<blob>``)."""
    key = shared_key()
    if key is None:
        return blobs
    return {**blobs, **{f"mac.{n}": entry_mac(key, entry, n, blob) for n, blob in blobs.items()}}


def _packed_image(blobs: dict[str, bytes], name: str, runtime: float) -> bytes:
    """The bytes of a packed file: user block (index, place, digest), then the HDF5 image."""
    packed, starts, start = b"".join(blobs.values()), {}, 0
    for blob_name, blob in blobs.items():
        starts[blob_name], start = [start, len(blob)], start + len(blob)
    index = {"format": _FORMAT, "name": name, "runtime": runtime, "blobs": starts}
    digest = hashlib.blake2b(packed, digest_size=16).hexdigest()
    text = json.dumps({**index, "digest": digest})[:-1]  # "base" follows, once known
    size = _user_block_size(len(_MAGIC) + len(text) + 32)
    fid = h5f.create(b"in-memory", h5f.ACC_TRUNC, _with_user_block(size), fapl=_IN_MEMORY)
    try:
        _write_blob(fid, "blobs", packed)
        h5f.flush(fid)
        image = fid.get_file_image()  # starts at the superblock: the user block is ours
    finally:
        fid.close()
    found = image.find(packed)  # the raw bytes of "blobs" (or an identical run before them)
    if found < 0:  # HDF5 keeps an attribute's or a contiguous dataset's bytes in one run
        raise RuntimeError("HDF5 did not store the blobs as one run of bytes; nothing was written")
    return (_MAGIC + f'{text}, "base": {size + found}}}\n'.encode()).ljust(size, b"\0") + image


def _user_block_size(needed: int) -> int:
    size = 512  # HDF5: a power of two, at least 512
    while size < needed:
        size *= 2
    return size


@functools.lru_cache(maxsize=8)
def _with_user_block(size: int) -> Any:
    """File creation properties: a user block of ``size`` bytes."""
    creation = h5p.create(h5p.FILE_CREATE)
    creation.set_userblock(size)
    return creation


def _write_all(descriptor: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(descriptor, view):]


def _fill(fid: Any, blobs: dict[str, bytes], name: str, runtime: float) -> None:
    """The layout of one object per blob (large files)."""
    for blob_name, blob in blobs.items():
        _write_blob(fid, blob_name, blob)
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
    ``open_trusted`` (or the cache's open ``directory``); in a shared directory every
    blob's HMAC is checked on reading."""

    def __init__(self, path: str, directory: TrustedDirectory | None = None) -> None:
        descriptor, shared = directory.open(path) if directory else open_trusted(path)
        self._fid, self._blobs, self._index = None, None, {}
        try:  # HDF5 reads the very file we checked: its bytes, or through its descriptor
            size = os.fstat(descriptor).st_size
            if size <= _READ_WHOLE_MAX:  # every packed file: blobs, index, HDF5's own bytes
                image = _read_all(descriptor, size)
                self._blobs, self._index = _unpacked(image)
                if self._blobs is None:
                    self._fid = h5f.open(b"in-memory", h5f.ACC_RDONLY, fapl=_in_memory(image))
            else:
                self._fid = h5f.open(descriptor_path(descriptor).encode(), h5f.ACC_RDONLY, fapl=_ACCESS)
        finally:
            os.close(descriptor)
        self.path, self._key = path, shared_key() if shared else None

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fid is not None:
            self._fid.close()

    def has(self, name: str) -> bool:
        if self._blobs is not None:
            return name in self._blobs
        if h5a.exists(self._fid, name.encode()):
            return True
        try:
            h5d.open(self._fid, name.encode()).close()
        except KeyError:  # h5py's "no such object"
            return False
        return True

    def blob(self, name: str) -> bytes:
        data = self._raw(name)
        if self._key is not None:
            mac = self._raw(f"mac.{name}") if self.has(f"mac.{name}") else b""
            if not hmac.compare_digest(mac, entry_mac(self._key, _entry(self.path), name, data)):
                raise UntrustedFileError(
                    f"refusing {self.path}: its {name!r} is not authenticated with the shared-cache "
                    f"key of {KEY_FILE_VARIABLE}; it was written without that key or changed since"
                )
        return data

    def name(self) -> str:
        return self._index["name"] if self._blobs is not None else self._raw("name").decode()

    def runtime(self) -> float:
        if self._blobs is not None:
            return float(self._index["runtime"])
        runtime = np.empty((), dtype=np.float64)
        runtime_attribute = h5a.open(self._fid, b"runtime")
        runtime_attribute.read(runtime)
        runtime_attribute.close()
        return float(runtime)

    def _raw(self, name: str) -> bytes:
        return bytes(self._blobs[name]) if self._blobs is not None else _read_blob(self._fid, name)


_IN_MEMORY = _in_memory()


def _unpacked(image: bytes) -> tuple[dict[str, memoryview] | None, dict]:
    """The blobs and index of a packed file, from its user block, without HDF5 (None
    and no index for a file of the other layout); ``ValueError`` if its blobs are not
    where and what the index says (truncated, or changed after it was written)."""
    if not image.startswith(_MAGIC):
        return None, {}
    try:
        header = json.loads(image[len(_MAGIC):image.index(b"\n", len(_MAGIC))])
        total = sum(length for _, length in header["blobs"].values())
        packed = memoryview(image)[header["base"]:header["base"] + total]
        digest = hashlib.blake2b(packed, digest_size=16).hexdigest()
        blobs = {name: packed[start:start + length] for name, (start, length) in header["blobs"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"its index (HDF5 user block) is damaged: {error!r}") from error
    if header.get("format") != _FORMAT or not hmac.compare_digest(digest, str(header.get("digest"))):
        raise ValueError("its blobs do not match the digest in its index (HDF5 user block): "
                         "truncated, or changed after it was written")
    return blobs, header


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
        found: dict[str, Any] = {key: reader.blob(key) for key in keys if reader.has(key)}
        found["name"] = reader.name()
        found["runtime"] = reader.runtime()
    return found


def read_outcome(path: str, warn: bool = True, directory: TrustedDirectory | None = None,
                 ) -> tuple[str, Any] | None:
    """``("result", value)`` or ``("error", exception)`` stored in ``path``; None if the
    file is missing or (with a warning) unreadable or untrusted. One open, one read;
    ``directory``: the already opened cache directory ``path`` lies in, if any."""
    try:
        return outcome_of(path, directory)
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


def outcome_of(path: str, directory: TrustedDirectory | None = None) -> tuple[str, Any]:
    """Like :func:`read_outcome`, but every problem is raised."""
    with _Reader(path, directory) as reader:
        if reader.has("result"):
            return "result", pickle.loads(reader.blob("result"))
        error = pickle.loads(reader.blob("error"))
        if reader.has("traceback"):
            error = with_remote_traceback(error, reader.blob("traceback").decode())
        return "error", error
