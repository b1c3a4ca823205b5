"""Files executorlib writes and reads back, on a machine shared with other users.

- Directories we create are 0700 and files 0600: arguments and results are the user's data.
- A file is written under a random name created exclusively (``O_CREAT | O_EXCL |
  O_NOFOLLOW``) in its target directory, then ``os.replace``d over the final name: a file
  that exists is complete, and a symlink planted at any name is never followed.
- A file whose content will be unpickled is opened with ``O_NOFOLLOW | O_NONBLOCK`` (a FIFO
  never blocks us) relative to its directory, and both are checked on the open handles:
  the directory must be ours and writable by nobody else, the file a regular file of ours
  that nobody else can write. Otherwise :class:`UntrustedFileError` says which path, which
  owner or mode is wrong, and how to fix it. A cache keeps its directory open
  (:class:`TrustedDirectory`): one ``open`` relative to it and three ``fstat`` per lookup.
- **Shared caches** are the one exception, and only as an explicit opt-in: with
  ``EXECUTORLIB_SHARED_CACHE_KEY_FILE`` pointing at a key file (a private file of the user,
  outside the cache), every entry we write carries an HMAC under that key, and an entry in
  a directory others can write is accepted only when its HMAC verifies (see cache.py).
  Write access to the directory is then not enough to make code run.

Only the standard library is used: submission jobs import this on their start-up path.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import hmac
import os
import pwd
import secrets
import stat
import threading
import weakref
from collections.abc import Iterator

KEY_FILE_VARIABLE = "EXECUTORLIB_SHARED_CACHE_KEY_FILE"
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_TEXT_MAX = 4096  # job id files and the like: anything longer is not ours


class UntrustedFileError(PermissionError):
    """A file or directory that another user owns or can write: never read from it."""


# ------------------------------------------------------------------ directories
def private_directory(path: str) -> str:
    """``path`` as an absolute path, created 0700 if missing (parents too); an
    ``UntrustedFileError`` if it exists and may be written by another user (unless a
    shared-cache key is configured)."""
    path = os.path.abspath(path)
    os.makedirs(path, mode=0o700, exist_ok=True)
    check_directory(path)
    return path


def check_directory(path: str) -> bool:
    """Whether the existing directory ``path`` is a shared cache (see
    :func:`directory_is_shared`); ``UntrustedFileError`` if it may not be used."""
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return directory_is_shared(os.fstat(descriptor), path)
    finally:
        os.close(descriptor)


def directory_is_shared(status: os.stat_result, path: str) -> bool:
    """False for a directory of ours that nobody else can write; True for any other
    directory when a shared-cache key is configured (its entries must then carry a
    valid HMAC); otherwise an ``UntrustedFileError`` that says what to change."""
    problem = _foreign(status)
    if problem is None:
        return False
    if shared_key() is not None:
        return True
    raise UntrustedFileError(
        f"refusing the cache directory {path}: it {problem}, so another user could plant "
        f"a result that would run code as you. Use a directory of your own (chmod go-w {path}, "
        f"or a new one), or, for a cache shared by a team on purpose, set {KEY_FILE_VARIABLE} "
        "to a private key file the team shares (see README, 'what a shared cache requires')"
    )


def _foreign(status: os.stat_result) -> str | None:
    """Why another user could change this file or directory; None when nobody can
    (root can change anything anyway, so what root owns counts as ours, as for ssh)."""
    if status.st_uid not in (os.geteuid(), 0):
        return f"is owned by {_user(status.st_uid)}, not by you ({_user(os.geteuid())})"
    if status.st_mode & 0o022:
        return f"has mode {stat.filemode(status.st_mode)} (writable by group or others)"
    return None


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


# ---------------------------------------------------------------------- reading
def open_trusted(path: str) -> tuple[int, bool]:
    """An open descriptor of the regular file ``path`` and whether its entries must be
    authenticated (a shared directory). Raises ``FileNotFoundError``, or
    ``UntrustedFileError`` for a link, a FIFO or another non-regular file, or a file or
    directory another user could have written."""
    directory, name = os.path.split(os.path.abspath(path))
    parent = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return _open_in(parent, directory, name)
    finally:
        os.close(parent)


def _open_in(parent: int, directory: str, name: str) -> tuple[int, bool]:
    """:func:`open_trusted` of ``name`` in the open directory ``parent`` (``directory``)."""
    path = os.path.join(directory, name)
    try:  # a miss (the common case of a cache lookup) costs this one system call
        descriptor = os.open(name, _READ, dir_fd=parent)
    except OSError as error:
        if error.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
            raise UntrustedFileError(f"refusing {path}: it is a symbolic link") from error
        raise
    try:  # both checked on the handles, before a byte of the file is used
        shared = directory_is_shared(os.fstat(parent), directory)
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise UntrustedFileError(f"refusing {path}: it is not a regular file")
        problem = None if shared else _foreign(status)
        if problem is not None:
            raise UntrustedFileError(
                f"refusing {path}: it {problem}; remove it (executorlib computes it again)"
            )
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor, shared


def descriptor_path(descriptor: int) -> str:
    """A path that opens exactly the file behind ``descriptor`` (for libraries such as
    HDF5 that open files by name)."""
    return f"/proc/self/fd/{descriptor}"


def read_small_text(path: str) -> str:
    """The text of a small regular file (a job id), without following links or blocking
    on a FIFO; ``ValueError`` if it is no such file or not short UTF-8 text."""
    try:
        descriptor = os.open(path, _READ)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ValueError(f"{path} is a symbolic link") from error
        raise
    with os.fdopen(descriptor, "rb") as stream:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise ValueError(f"{path} is not a regular file")
        data = stream.read(_TEXT_MAX + 1)
    if len(data) > _TEXT_MAX:
        raise ValueError(f"{path} is longer than {_TEXT_MAX} bytes")
    try:
        return data.decode()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not text ({error})") from error


# ---------------------------------------------------------------------- writing
@contextlib.contextmanager
def replacing(path: str) -> Iterator[int]:
    """Yield the descriptor of a new, empty temporary file, created exclusively under a
    random name next to ``path``; when the block succeeds it replaces ``path``, otherwise
    it is removed. Mode 0600 (0640 in a shared cache directory, for the team to read);
    a directory another user can write is refused unless a shared-cache key is set."""
    directory, name = os.path.split(os.path.abspath(path))
    try:
        parent = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:  # a sub-directory of a cache_key such as "run1/step3"
        os.makedirs(directory, mode=0o700, exist_ok=True)
        parent = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with _replacing_in(parent, directory, name) as descriptor:
            yield descriptor
    finally:
        os.close(parent)


@contextlib.contextmanager
def _replacing_in(parent: int, directory: str, name: str) -> Iterator[int]:
    """:func:`replacing` of ``name`` in the open directory ``parent`` (``directory``)."""
    mode = 0o640 if directory_is_shared(os.fstat(parent), directory) else 0o600
    temporary = f".{name}.{secrets.token_hex(8)}.tmp"
    descriptor = os.open(temporary, _CREATE, mode, dir_fd=parent)
    try:
        yield descriptor
        os.replace(temporary, name, src_dir_fd=parent, dst_dir_fd=parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary, dir_fd=parent)
        raise
    finally:
        os.close(descriptor)


class TrustedDirectory:
    """A cache directory opened once (``O_DIRECTORY``) and checked on that handle at
    every use (one ``fstat``); the files directly in it are opened and replaced relative
    to it (``dir_fd``), so a lookup walks no path and opens no directory. Files in
    sub-directories (a ``cache_key`` such as ``run1/step3``) take the path functions,
    which check their own directory. A directory removed while open is made again."""

    def __init__(self, path: str) -> None:
        self.path = private_directory(path)
        self._lock = threading.Lock()
        self._handles: list[int] = []  # the current one last; all closed with the object
        self._open_handle()
        weakref.finalize(self, _close_all, self._handles)

    def open(self, path: str) -> tuple[int, bool]:
        """:func:`open_trusted` of ``path``."""
        directory, name = os.path.split(path)
        return _open_in(self._handle(), directory, name) if directory == self.path else open_trusted(path)

    def replacing(self, path: str) -> contextlib.AbstractContextManager[int]:
        """:func:`replacing` of ``path``."""
        directory, name = os.path.split(path)
        return _replacing_in(self._handle(), directory, name) if directory == self.path else replacing(path)

    def _handle(self) -> int:
        with self._lock:
            if os.fstat(self._handles[-1]).st_nlink == 0:  # removed (rm -r) while we run
                private_directory(self.path)
                self._open_handle()
            return self._handles[-1]  # older ones stay open: another thread may use them

    def _open_handle(self) -> None:
        handle = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            directory_is_shared(os.fstat(handle), self.path)
        except BaseException:
            os.close(handle)
            raise
        self._handles.append(handle)


def _close_all(handles: list[int]) -> None:
    for handle in handles:
        os.close(handle)


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically, private (0600), never through a link."""
    with replacing(path) as descriptor:
        os.write(descriptor, text.encode())


def create_private(path: str) -> None:
    """Make ``path`` a new, empty file of mode 0600 (replacing whatever was there), so
    that a program that later appends to it (a queue writing job output) keeps it private."""
    with replacing(path):
        pass


# ----------------------------------------------------------- shared-cache key
@functools.lru_cache(maxsize=4)
def _load_key(path: str) -> bytes:
    try:
        descriptor = os.open(path, _READ)
    except OSError as error:
        raise UntrustedFileError(
            f"{KEY_FILE_VARIABLE}={path} cannot be opened ({error.strerror}); create it with "
            f"`umask 077; head -c 32 /dev/urandom > {path}` and share it with your team privately"
        ) from error
    with os.fdopen(descriptor, "rb") as stream:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode) or status.st_uid != os.geteuid() or status.st_mode & 0o077:
            raise UntrustedFileError(
                f"the shared-cache key file {path} must be a regular file of yours that only you "
                f"can read (mode {stat.filemode(status.st_mode)}, owner {_user(status.st_uid)}): "
                f"chmod 600 {path}"
            )
        key = stream.read(1024)
    if len(key) < 16:
        raise UntrustedFileError(f"the shared-cache key file {path} holds {len(key)} bytes; use at "
                                 "least 16 random bytes")
    return key


def shared_key() -> bytes | None:
    """The shared-cache key named by ``$EXECUTORLIB_SHARED_CACHE_KEY_FILE``, or None."""
    path = os.environ.get(KEY_FILE_VARIABLE)
    return _load_key(path) if path else None


def entry_mac(key: bytes, entry: str, blob_name: str, blob: bytes) -> bytes:
    """The HMAC-SHA256 of one blob of the cache entry ``entry`` (its file name)."""
    tag = hmac.new(key, f"{entry}\0{blob_name}\0".encode(), hashlib.sha256)
    tag.update(blob)
    return tag.digest()
