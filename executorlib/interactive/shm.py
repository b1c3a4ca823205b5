"""Large buffers through shared memory when executor and worker share the machine.

A ZeroMQ message over loopback TCP moves well under 1 GB/s; a copy into a tmpfs file
moves about twice that. So on a connection whose two ends see the same ``/dev/shm``
(same kernel boot, same tmpfs, same user: decided in the authenticated handshake, see
channel.py), every frame of at least ``MIN_BYTES`` (an out-of-band buffer, or a pickle
grown large by ``bytes`` in it) is written into a fresh file there and only a small
descriptor frame travels::

    sender   export():  frame >= MIN_BYTES -> /dev/shm/<prefix><random> (O_EXCL, 0600)
                                            -> descriptor frame (magic, offset, length, name)
    receiver attach():  descriptor -> open, mmap MAP_PRIVATE (copy-on-write), unlink

The receiver's mapping is an ordinary writable buffer whose lifetime follows the
unpickled object (NumPy keeps its buffer alive), and nothing stays in ``/dev/shm`` once
it is attached. Every name of a connection starts with that connection's prefix, so
whichever side outlives the other removes what is left with one :meth:`SharedMemory.sweep`
(the executor when a worker ends or at shutdown, a worker when its executor vanishes).
Prefixes name the executor's pid namespace and pid, so a new executor also removes what
executors that died together with their workers (SIGKILL to both) left behind.
A worker may also *hold* what it attached (``attach(hold=True)``) until it has replied:
a result that is (a slice of) an argument it received, with no page of it written to
(the kernel's page map shows every page still the file's own, not a private copy), goes
back by naming the same file, with no copy at all; ``release()`` removes the rest.

A frame is a descriptor exactly when it is short and starts with the magic: the first
frame of a message is a pickle (it starts with the PROTO opcode) and the out-of-band
buffers after it are never smaller than 64 KiB (see protocol.dumps). Set
``EXECUTORLIB_NO_SHM=1`` (in the executor's environment, which workers inherit) to send
everything through ZeroMQ. Standard library only: workers import this at start-up.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from collections.abc import Iterable

from executorlib.processes import pid_alive

SHM_DIR = "/dev/shm"
NO_SHM_ENV = "EXECUTORLIB_NO_SHM"
NAME_PREFIX = "executorlib-"
MIN_BYTES = 1 << 20  # below this a ZeroMQ frame is as fast as the file round trip
_MAGIC = b"\0executorlib-shm\0"
_DESCRIPTOR_MAX = 256
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


class SharedMemoryError(OSError):
    """A buffer announced in shared memory could not be attached."""


def fingerprint() -> bytes:
    """What identifies the ``/dev/shm`` this process sees, for this user; ``b""`` if
    there is none to share (no tmpfs there, or ``EXECUTORLIB_NO_SHM`` is set)."""
    if os.environ.get(NO_SHM_ENV, "") not in ("", "0"):
        return b""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as file:
            boot_id = file.read().strip()
        status = os.stat(SHM_DIR)
    except OSError:
        return b""
    return b"%s:%d:%d:%d" % (boot_id, status.st_dev, status.st_ino, os.getuid())


def owner_prefix(pid: int | None = None) -> str:
    """The start of every file name used by the executor in process ``pid`` (default: this
    process), qualified by the pid namespace so that no other namespace's pid matches."""
    return f"{NAME_PREFIX}{_pid_namespace()}-{os.getpid() if pid is None else pid}-"


def sweep_stale() -> None:
    """Remove this user's files of executors in our pid namespace that no longer run."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return
    start = f"{NAME_PREFIX}{_pid_namespace()}-"
    for name in names:
        pid = name[len(start):].split("-", 1)[0]
        if name.startswith(start) and pid.isdigit() and not pid_alive(int(pid)) and _mine(name):
            _unlink(name)


def valid_prefix(prefix: str) -> bool:
    """A prefix names files directly inside ``/dev/shm`` and nowhere else."""
    return prefix.startswith(NAME_PREFIX) and "/" not in prefix and "\0" not in prefix


class SharedMemory:
    """One connection's files in ``/dev/shm``: all of them start with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        if not valid_prefix(prefix):
            raise ValueError(f"shared-memory prefix {prefix!r} must start with {NAME_PREFIX!r}")
        self.prefix = prefix
        self._lock = threading.Lock()  # a sweep from another thread ends file creation
        self._swept = False
        self._held: dict[str, mmap.mmap] = {}  # attached with hold=True, still linked
        self._given: set[str] = set()  # held files named in what we sent since

    def export(self, frames: list) -> list:
        """``frames`` with every frame of at least ``MIN_BYTES`` (the pickle too: large
        ``bytes`` travel in it) moved to a file; one that cannot be written stays a frame."""
        return [self._export_one(frame) for frame in frames]

    def attach(self, frames: Iterable, hold: bool = False) -> list:
        """Inverse of :meth:`export`: descriptors become private writable mappings.

        The files are removed at once, or with ``hold=True`` kept until :meth:`release`
        so that an unchanged buffer can go back without a copy. A descriptor that cannot
        be attached becomes a frame whose ``buffer`` raises, so the error surfaces where
        the message is unpickled."""
        files: dict[str, mmap.mmap | None] = {}
        try:
            return [self._attach_one(frame, files) for frame in frames]
        finally:
            for name, mapping in files.items():
                if hold and mapping is not None:
                    self._held[name] = mapping
                else:
                    _unlink(name)

    def release(self) -> None:
        """Remove the held files that what we sent did not name (they are unread)."""
        for name in self._held:
            if name not in self._given:
                _unlink(name)
        self._held.clear()
        self._given.clear()

    def sweep(self) -> None:
        """Remove every file of this prefix (the peer is gone) and create no more."""
        with self._lock:
            self._swept = True
            try:
                names = os.listdir(SHM_DIR)
            except OSError:
                return
            for name in names:
                if name.startswith(self.prefix):
                    _unlink(name)

    def _export_one(self, frame: object) -> object:
        view = memoryview(getattr(frame, "buffer", frame))
        if view.nbytes < MIN_BYTES or not view.c_contiguous:
            return frame
        if self._held and (held := self._find_held(view)) is not None:
            self._given.add(held[0])
            return describe(held[0], held[1], view.nbytes)
        name = self.prefix + os.urandom(12).hex()
        try:
            if _free_bytes() < view.nbytes:
                return frame  # fail fast on a small /dev/shm (containers), not after writing
            _write_file(self._create(name), view.cast("B"))
        except OSError:  # /dev/shm full or gone: the frame still works, only slower
            _unlink(name)
            return frame
        return describe(name, 0, view.nbytes)

    def _create(self, name: str) -> int:
        with self._lock:
            if self._swept:
                raise SharedMemoryError(f"the connection using {SHM_DIR}/{self.prefix}* has ended")
            return os.open(os.path.join(SHM_DIR, name), _CREATE, 0o600)

    def _find_held(self, view: memoryview) -> tuple[str, int] | None:
        """(name, offset) of the held file whose mapping holds ``view`` unchanged."""
        import ctypes  # only here: this path runs only after large buffers arrived

        if view.readonly:
            return None
        start = ctypes.addressof(ctypes.c_char.from_buffer(view))
        for name, mapping in self._held.items():
            base = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
            if base <= start and start + view.nbytes <= base + len(mapping):
                return (name, start - base) if _unchanged(start, view.nbytes) else None
        return None

    def _attach_one(self, frame: object, files: dict[str, mmap.mmap | None]) -> object:
        descriptor = parse(frame)
        if descriptor is None:
            return frame
        name, offset, length = descriptor
        if not name.startswith(self.prefix) or "/" in name:
            return _Unattached(f"refused the shared-memory name {name!r} outside {self.prefix}*")
        files.setdefault(name, None)
        try:
            files[name] = mapping = _map(name)
            return _slice(mapping, offset, length)
        except (OSError, ValueError) as error:
            return _Unattached(f"could not attach {SHM_DIR}/{name} ({error})")


def describe(name: str, offset: int, length: int) -> bytes:
    """The frame that stands for ``length`` bytes at ``offset`` of file ``name``."""
    return _MAGIC + offset.to_bytes(8, "little") + length.to_bytes(8, "little") + name.encode()


def parse(frame: object) -> tuple[str, int, int] | None:
    """(name, offset, length) if ``frame`` is a descriptor, else None."""
    view = memoryview(getattr(frame, "buffer", frame))
    if view.nbytes > _DESCRIPTOR_MAX or bytes(view[: len(_MAGIC)]) != _MAGIC:
        return None
    data = bytes(view[len(_MAGIC):])
    offset, length = int.from_bytes(data[:8], "little"), int.from_bytes(data[8:16], "little")
    return data[16:].decode(errors="replace"), offset, length


class _Unattached:
    """Stands in for a buffer that could not be attached; unpickling it raises."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    @property
    def buffer(self) -> memoryview:
        raise SharedMemoryError(
            f"{self.reason}; the sender and this process must share {SHM_DIR} "
            f"(set {NO_SHM_ENV}=1 to send large buffers through ZeroMQ instead)"
        )


def _write_file(fd: int, view: memoryview) -> None:
    try:
        written = 0
        while written < view.nbytes:
            written += os.write(fd, view[written:])
    finally:
        os.close(fd)


def _map(name: str) -> mmap.mmap:
    """The whole file, mapped privately: writes stay in this process (copy-on-write)."""
    fd = os.open(os.path.join(SHM_DIR, name), _OPEN)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)


def _slice(mapping: mmap.mmap, offset: int, length: int) -> memoryview | mmap.mmap:
    if offset + length > len(mapping):
        raise SharedMemoryError(f"it holds {len(mapping)} bytes, not the {offset + length} announced")
    if offset == 0 and length == len(mapping):
        return mapping
    return memoryview(mapping)[offset : offset + length]


# Top byte of a /proc/self/pagemap entry: bit 63 present, 62 swapped, 61 file page.
# A private mapping's page differs from its file once it is an anonymous copy: present
# but not a file page, or swapped out.
_PRIVATE_COPY = bytes(int(bool((b & 0x80 and not b & 0x20) or b & 0x40)) for b in range(256))


def _unchanged(address: int, length: int) -> bool:
    """Whether no page of this private file mapping has been written to (copied)."""
    first, last = address // mmap.PAGESIZE, (address + length - 1) // mmap.PAGESIZE
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
            entries = os.pread(pagemap.fileno(), (last - first + 1) * 8, first * 8)
    except OSError:
        return False
    return len(entries) == (last - first + 1) * 8 and b"\x01" not in entries[7::8].translate(_PRIVATE_COPY)


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _mine(name: str) -> bool:
    try:
        return os.lstat(os.path.join(SHM_DIR, name)).st_uid == os.getuid()
    except OSError:
        return False


def _free_bytes() -> int:
    status = os.statvfs(SHM_DIR)
    return status.f_bavail * status.f_frsize


def _unlink(name: str) -> None:
    with contextlib.suppress(OSError):  # already removed by the peer, or never created
        os.unlink(os.path.join(SHM_DIR, name))
