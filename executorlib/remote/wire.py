"""The laptop <-> agent protocol: small records in length-prefixed messages.

A message is a list of frames: the first is a pickled record (below), the rest carry
its payload (a call, or a result) as produced by ``executorlib.serialize.dumps``, so
large buffers travel out of band without an extra copy. On the byte stream (the ssh
channel, the agent's Unix socket) a message reads::

    u32 frame count | u64 length of each frame | the frames, back to back

Client -> agent: ``Hello`` (first), ``Submit``, ``Ack``, ``Resume``, ``Cancel``, ``Bye``.
Agent -> client: ``Welcome`` or ``Refused`` (answer to Hello), ``Outcome``, ``Missing``,
``Unresolved``, ``CancelAnswer``.

Only the standard library is imported here: the agent's bridge imports this module.
"""

from __future__ import annotations

import pickle
import struct
import threading
from dataclasses import dataclass
from typing import Any, BinaryIO

_COUNT = struct.Struct("<I")
_MAX_FRAMES = 1 << 16


@dataclass(frozen=True)
class Hello:
    """Open or re-open ``session`` on an agent running ``backend`` with ``options``."""

    session: str
    backend: str
    options: dict
    python: tuple[int, int]
    version: str  # executorlib's, on the laptop: the agent refuses another version


@dataclass(frozen=True)
class Welcome:
    """The agent took the session; ``known``: it had it from an earlier connection."""

    known: bool


@dataclass(frozen=True)
class Refused:
    """The agent cannot run this session (the executor's options were refused)."""

    message: str


@dataclass(frozen=True)
class Submit:
    """Call number ``id``; payload: ``(fn, args, kwargs, resource_dict)``."""

    id: int


@dataclass(frozen=True)
class Ref:
    """In the arguments of a Submit: the result of the session's call number ``id``."""

    id: int


@dataclass(frozen=True)
class Resume:
    """After a reconnect: the calls whose results the client still waits for."""

    pending: tuple[int, ...]


@dataclass(frozen=True)
class Missing:
    """Answer to Resume: calls the agent never got (send them again)."""

    ids: tuple[int, ...]


@dataclass(frozen=True)
class Unresolved:
    """Submit ``id`` refers to calls the agent no longer has: send their values."""

    id: int


@dataclass(frozen=True)
class Ack:
    """The client holds the outcomes of these calls: the agent forgets them."""

    ids: tuple[int, ...]


@dataclass(frozen=True)
class Cancel:
    """Cancel call ``id`` if it has not started; the agent answers with CancelAnswer."""

    id: int


@dataclass(frozen=True)
class CancelAnswer:
    """``cancelled``: call ``id`` will not run; False: it runs (or ran) to its end."""

    id: int
    cancelled: bool


@dataclass(frozen=True)
class Bye:
    """The client is done with the session (after ``shutdown``)."""

    cancel_futures: bool


@dataclass(frozen=True)
class Outcome:
    """Result of call ``id``: payload is the value, or a ``serialize.Failure``."""

    id: int
    failed: bool
    cancelled: bool = False


class Channel:
    """Writes and reads messages on a pair of binary streams (thread-safe writes)."""

    def __init__(self, reader: BinaryIO, writer: BinaryIO) -> None:
        self._reader, self._writer = reader, writer
        self._lock = threading.Lock()

    def send(self, record: Any, payload: list | tuple = ()) -> None:
        """Write ``record`` and its payload frames as one message."""
        frames = [pickle.dumps(record, protocol=5), *payload]
        sizes = [memoryview(frame).nbytes for frame in frames]
        header = _COUNT.pack(len(frames)) + struct.pack(f"<{len(frames)}Q", *sizes)
        with self._lock:
            self._writer.write(header)
            for frame in frames:
                self._writer.write(frame)
            self._writer.flush()

    def receive(self) -> tuple[Any, list[bytearray]] | None:
        """The next (record, payload frames); None at a clean end of the stream."""
        head = self._reader.read(_COUNT.size)
        if not head:
            return None
        (count,) = _COUNT.unpack(self._exactly(head, _COUNT.size))
        if not 0 < count <= _MAX_FRAMES:
            raise ConnectionError(f"corrupt message: {count} frames")
        sizes = struct.unpack(f"<{count}Q", self._exactly(b"", 8 * count))
        frames = [self._read_frame(size) for size in sizes]
        return pickle.loads(frames[0]), frames[1:]

    def _read_frame(self, size: int) -> bytearray:
        frame = bytearray(size)
        view, done = memoryview(frame), 0
        while done < size:
            got = self._reader.readinto(view[done:])
            if not got:
                raise ConnectionError(f"stream ended inside a message ({done} of {size} bytes)")
            done += got
        return frame

    def _exactly(self, start: bytes, size: int) -> bytes:
        data = bytes(start)
        while len(data) < size:
            more = self._reader.read(size - len(data))
            if not more:
                raise ConnectionError("stream ended inside a message header")
            data += more
        return data
