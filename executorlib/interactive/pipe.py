"""A private channel to a local worker: one end of a socket pair, inherited at start.

A serial worker on this machine, started by the executor's manager thread (directly,
or forked by the zygote), talks to the executor over an ``AF_UNIX`` socket pair instead
of ZeroMQ. The worker gets its end as an inherited descriptor (``fd:N`` in argv in place
of an address); nothing else can reach it: there is no address to connect to and no
key to steal, so there is no handshake to guard and nothing to encrypt. What travels
is what travels over ZeroMQ (protocol.py: a kind and frames; large frames through
``/dev/shm``, shm.py), framed as::

    kind (1 byte) | frame count (u32) | each frame's length (u64) | the frames' bytes

It is the cheapest channel there is between two local processes: no I/O threads, one
``sendmsg`` and one ``recv`` per message, and a worker that never imports ZeroMQ. The
executor's end never blocks: what the socket cannot take waits in the peer's outbox
until the manager's poll says it can (``POLLOUT``).
"""

from __future__ import annotations

import _socket  # not ``socket``: its enum set-up is ~2 ms of every worker's start-up
import contextlib
import os
import select
import struct
import threading
from collections import deque
from collections.abc import Callable

from executorlib.interactive import protocol
from executorlib.interactive.shm import SharedMemory, fingerprint, valid_prefix

ADDRESS_PREFIX = "fd:"
_HEAD = struct.Struct("<cI")
_LENGTH = struct.Struct("<Q")
_RECV_BYTES = 1 << 20  # one receive buffer, reused: recv() would map and unmap a new one each time
_MAX_IOV = 512  # frames per sendmsg (the kernel takes at most IOV_MAX = 1024 buffers)
_SOCKET_BUFFER = 4 << 20  # fewer partial writes to a worker busy with a long call
_MAX_HELLO_BYTES, _MAX_HELLO_FRAMES = 4096, 8  # a HELLO is far smaller


def receive_buffer() -> bytearray:
    """A buffer to receive into (a peer's messages are copied out of it at once)."""
    return bytearray(_RECV_BYTES)


def pair() -> tuple[_socket.socket, _socket.socket]:
    """(the executor's end, the worker's end); neither is inherited by any exec."""
    ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
    for end in (ours, theirs):
        end.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDBUF, _SOCKET_BUFFER)
    ours.setblocking(False)
    return ours, theirs


def message_buffers(kind: bytes, frames: list) -> list:
    """One message as buffers for ``sendmsg``: the header, then each frame that is not
    empty (a send loop counts on every buffer taking bytes), cast to bytes so that
    ``len`` of every buffer is its size."""
    views = [memoryview(getattr(frame, "buffer", frame)).cast("B") for frame in frames]
    lengths = struct.pack(f"<{len(views)}Q", *(view.nbytes for view in views))
    return [_HEAD.pack(kind, len(views)) + lengths, *(view for view in views if view)]  # none empty


def send_all(sock: _socket.socket, buffers: deque) -> None:
    """``sendmsg`` the queued ``buffers`` (dropping what was sent, a partly sent one
    trimmed) until none is left; a non-blocking socket that is full raises
    ``BlockingIOError`` with the rest still queued."""
    while buffers:
        sent = sock.sendmsg([buffers[i] for i in range(min(len(buffers), _MAX_IOV))])
        while sent:
            if sent < len(buffers[0]):
                buffers[0] = memoryview(buffers[0])[sent:]
                break
            sent -= len(buffers.popleft())


class Parser:
    """Complete messages out of a byte stream fed in pieces."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, list]]:
        """Add ``data``; every message now complete, as (kind, frames), oldest first."""
        buffer = self._buffer
        buffer += data
        messages, start, size = [], 0, len(buffer)
        with memoryview(buffer) as view:
            while size - start >= _HEAD.size:
                kind, count = _HEAD.unpack_from(buffer, start)
                body = start + _HEAD.size + _LENGTH.size * count
                if size < body:
                    break
                lengths = struct.unpack_from(f"<{count}Q", buffer, start + _HEAD.size)
                if size < body + sum(lengths):
                    break
                frames = []
                for length in lengths:
                    frames.append(view[body:body + length].tobytes())
                    body += length
                messages.append((kind, frames))
                start = body
        del buffer[:start]
        return messages

    @property
    def pending(self) -> bool:
        """Whether part of a message is buffered."""
        return bool(self._buffer)

    def implausible_hello(self) -> bool:
        """Whether what is buffered cannot be the start of a HELLO (a few short frames):
        a connection that has not said HELLO gets no more of our memory than that."""
        if len(self._buffer) > _MAX_HELLO_BYTES:
            return True
        return len(self._buffer) >= _HEAD.size and _HEAD.unpack_from(self._buffer)[1] > _MAX_HELLO_FRAMES


class PipePeer:
    """The executor's view of a worker on a socket pair (the manager thread's only)."""

    __slots__ = (
        "routing_id", "worker_id", "host", "pid", "shm", "seconds", "sock", "parser", "outbox", "hello",
        "scratch",
    )

    def __init__(self, worker_id: int, sock: _socket.socket, scratch: bytearray) -> None:
        self.routing_id = None
        self.scratch = scratch  # the receive buffer, shared by the executor's peers (one thread reads)
        self.worker_id, self.host, self.pid = worker_id, "localhost", 0
        self.shm: SharedMemory | None = None
        self.seconds: float | None = None  # how long its last call ran, as it reported
        self.sock, self.parser, self.outbox = sock, Parser(), deque()
        self.hello = False  # its HELLO arrived (anything before it ends the connection)

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> tuple[list[tuple[bytes, list]], bool]:
        """(messages that arrived, whether the worker's end is closed); never blocks."""
        messages, closed = [], False
        while True:
            try:
                size = self.sock.recv_into(self.scratch)
            except BlockingIOError:
                break
            except OSError:
                closed = True
                break
            if not size:
                closed = True
                break
            with memoryview(self.scratch) as view:
                messages += self.parser.feed(view[:size])
            if not self.hello and not messages and self.parser.implausible_hello():
                return messages, True
        return messages, closed

    def write(self, kind: bytes, frames: list) -> bool:
        """Queue one message and send what the socket takes; True while some waits
        (then flush on POLLOUT). ``OSError`` if the worker's end is closed."""
        self.outbox.extend(message_buffers(kind, frames))
        return self.flush()

    def flush(self) -> bool:
        """Send queued buffers until the socket is full; True while some wait."""
        try:
            send_all(self.sock, self.outbox)
        except BlockingIOError:
            return True
        return False

    def close(self) -> None:
        self.outbox.clear()
        self.sock.close()


class PipeConnection:
    """The worker's end (what channel.WorkerConnection is over ZeroMQ): say HELLO on the
    inherited descriptor (or a same-host socket: host_socket.py, whose HELLO carries
    ``proof``), await WELCOME, then receive and send messages (blocking)."""

    def __init__(self, sock: _socket.socket, address: str, worker_id: int, timeout_s: float,
                 proof: bytes = b"") -> None:
        self.sock = sock
        self.address = address
        self.shm: SharedMemory | None = None
        self._parser = Parser()
        self._scratch = receive_buffer()
        self._inbox: deque[tuple[bytes, list]] = deque()
        self._send_lock = threading.Lock()
        fields = [str(worker_id).encode(), os.uname().nodename.encode(), str(os.getpid()).encode()]
        self._send(protocol.HELLO, [*fields, fingerprint(), *([proof] if proof else [])])
        if not self.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"no answer from the executor on {address} within {timeout_s:g} s")
        kind, frames = self._next()
        if kind != protocol.WELCOME or len(frames) != 1:
            raise ConnectionError(f"the executor on {address} answered HELLO with {kind!r}, not WELCOME")
        prefix = frames[0].decode(errors="replace")
        if prefix and valid_prefix(prefix):
            self.shm = SharedMemory(prefix)

    @classmethod
    def inherited(cls, address: str, worker_id: int, timeout_s: float) -> PipeConnection:
        """On the socket pair's end named by ``address`` (``fd:N``)."""
        fd = int(address[len(ADDRESS_PREFIX):])
        os.set_inheritable(fd, False)  # nothing a call starts may hold our channel
        return cls(_socket.socket(fileno=fd), address, worker_id, timeout_s)

    def poll(self, timeout_ms: int) -> bool:
        """Whether a message (or the executor's hang-up) is waiting, within ``timeout_ms``."""
        if self._inbox:
            return True
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(timeout_ms))

    def watch_executor(self, on_lost: Callable[[], None]) -> None:
        """Call ``on_lost`` from a daemon thread when the executor's end closes."""

        def watch() -> None:
            poller = select.poll()
            poller.register(self.sock, select.POLLRDHUP)  # HUP and ERR are always reported
            while not poller.poll():
                pass
            if self.shm is not None:
                self.shm.sweep()
            on_lost()

        threading.Thread(target=watch, name="executorlib-watchdog", daemon=True).start()

    def receive(self) -> tuple[bytes, list]:
        """The next message; large buffers from /dev/shm stay there until the reply."""
        kind, frames = self._next()
        return kind, self.shm.attach(frames, hold=True) if self.shm and frames else frames

    def send(self, kind: bytes, frames: list = ()) -> None:
        """Send the reply to the last message received."""
        if self.shm is None:
            self._send(kind, frames)
            return
        self._send(kind, self.shm.export(list(frames)))
        self.shm.release()

    def close(self) -> None:
        """Hang up (the executor reads EOF at once, whoever else holds the descriptor)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(_socket.SHUT_RDWR)
        self.sock.close()

    def _next(self) -> tuple[bytes, list]:
        while not self._inbox:
            try:
                size = self.sock.recv_into(self._scratch)
            except OSError as error:
                self._lost(error)
            if not size:
                self._lost("end of file")
            with memoryview(self._scratch) as view:
                self._inbox.extend(self._parser.feed(view[:size]))
        return self._inbox.popleft()

    def _lost(self, why: object) -> None:
        """The executor is gone: remove our files in /dev/shm, raise ConnectionError."""
        if self.shm is not None:
            self.shm.sweep()
        raise ConnectionError(f"the executor's end of {self.address} closed ({why})")

    def _send(self, kind: bytes, frames: list) -> None:
        try:
            self._send_all(message_buffers(kind, frames))
        except OSError as error:
            self._lost(error)

    def _send_all(self, buffers: list) -> None:
        with self._send_lock:
            send_all(self.sock, deque(buffers))
