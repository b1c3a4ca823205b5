"""A same-host channel for workers that may or may not run on the executor's machine.

An srun step or a Flux job may land on the executor's own node (every step or job of a
one-node allocation does) or on another. Such a worker gets both ways back, in one
argument::

    unix:PATH@NODE|tcp://HOST:PORT

If its node name is NODE and it can connect to the Unix socket PATH, it talks over that
socket exactly as a local worker over its socket pair (pipe.py: no ZeroMQ imported, no
handshake, large buffers through /dev/shm); otherwise it connects to the ROUTER with its
CurveZMQ keys (channel.py), as every such worker did before. The executor binds PATH
only when the first such worker is launched.

Who can get in:

- PATH is in a directory that ``mkdtemp`` made for this executor (mode 0700): no other
  user can reach the socket at all;
- the executor reads each connecting process's uid from the kernel (``SO_PEERCRED``)
  and closes any connection that is not from its own user;
- the first message must be the HELLO of a launched worker, with the launch's proof:
  a hash of the keys that reach that worker through its environment only (as for
  ZeroMQ; the worker removes them from ``os.environ``). Each proof admits one
  connection, once; anything else closes the connection unread (endpoints.py).

Standard library only, and ``_socket`` rather than ``socket``: workers import this on
their start-up path.
"""

from __future__ import annotations

import _socket
import contextlib
import os
import struct

from executorlib.interactive.pipe import PipeConnection
from executorlib.interactive.protocol import KEYS_ENV

PREFIX = "unix:"
UNIDENTIFIED = -1  # the worker id of an accepted connection before its HELLO
_MAX_PATH = 100  # sun_path holds 108 bytes
_PEERCRED = struct.Struct("3i")  # pid, uid, gid


def hello_proof(keys_value: str) -> bytes:
    """What a worker's HELLO carries on this socket: a hash of its launch's keys."""
    import hashlib  # here: local serial workers import this module but never need it

    return hashlib.sha256(b"executorlib same-host hello\0" + keys_value.encode()).hexdigest().encode()


def split_address(address: str) -> tuple[str, str, str]:
    """(socket path, node name, ROUTER address) of a ``unix:PATH@NODE|tcp://...``."""
    local, _, tcp = address[len(PREFIX):].partition("|")
    path, _, node = local.rpartition("@")
    return path, node, tcp


def connect(address: str, worker_id: int, timeout_s: float) -> tuple[PipeConnection | None, str]:
    """Worker side: (the connection over the Unix socket, or None where this is another
    node or the socket cannot be reached; the ROUTER's address)."""
    path, node, tcp = split_address(address)
    if node != os.uname().nodename:
        return None, tcp
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout_s)
        sock.connect(path)
        sock.settimeout(None)
    except OSError:  # not this machine's socket after all, or the executor is gone
        sock.close()
        return None, tcp
    proof = hello_proof(os.environ.pop(KEYS_ENV, ""))
    return PipeConnection(sock, address, worker_id, timeout_s, proof), tcp


class HostListener:
    """Executor side: the listening socket in a private directory, and the proofs of
    the launches that may connect to it."""

    def __init__(self, router_address: str) -> None:
        import tempfile

        self.directory = tempfile.mkdtemp(prefix="executorlib-")  # mode 0700
        self.path = os.path.join(self.directory, "workers")
        self._sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            if len(self.path) > _MAX_PATH:
                raise OSError(f"socket path too long for AF_UNIX: {self.path}")
            self._sock.bind(self.path)
            self._sock.listen(128)
        except OSError:
            self.close()
            raise
        self._sock.setblocking(False)
        self.address = f"{PREFIX}{self.path}@{os.uname().nodename}|{router_address}"
        self._proofs: dict[int, bytes] = {}

    def fileno(self) -> int:
        return self._sock.fileno()

    def expect(self, worker_id: int, keys_value: str) -> None:
        """Admit one connection of launch ``worker_id`` (whose keys are ``keys_value``)."""
        self._proofs[worker_id] = hello_proof(keys_value)

    def forget(self, worker_id: int) -> None:
        self._proofs.pop(worker_id, None)

    def accept(self) -> list[_socket.socket]:
        """The connections waiting, non-blocking, from processes of our own user."""
        accepted = []
        while True:
            try:
                fd, _ = self._sock._accept()
            except BlockingIOError:
                return accepted
            except OSError:  # e.g. out of descriptors: leave the rest queued
                return accepted
            conn = _socket.socket(fileno=fd)
            credentials = conn.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _PEERCRED.size)
            if _PEERCRED.unpack(credentials)[1] != os.getuid():
                conn.close()
                continue
            conn.setblocking(False)
            accepted.append(conn)

    def admit(self, worker_id: bytes, proof: bytes) -> int | None:
        """The worker id of a HELLO with its launch's proof (once), else None."""
        import hmac

        if not worker_id.isdigit():
            return None
        expected = self._proofs.get(int(worker_id))
        if expected is None or not hmac.compare_digest(expected, bytes(proof)):
            return None
        del self._proofs[int(worker_id)]
        return int(worker_id)

    def close(self) -> None:
        self._sock.close()
        for remove, name in ((os.unlink, self.path), (os.rmdir, self.directory)):
            with contextlib.suppress(OSError):
                remove(name)
