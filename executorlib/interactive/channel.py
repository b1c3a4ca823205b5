"""ZeroMQ sockets, encrypted and authenticated: the executor's ROUTER and each worker's DEALER
(for every worker but a local serial one, which has a socket pair: pipe.py, endpoints.py).

The executor binds one ROUTER on a single interface (loopback, or the address of its
host inside an allocation; never ``tcp://*``). It is a CurveZMQ server: every worker
launch gets its own client key pair (auth.py), which admits one connection, once, and
that connection one HELLO (worker id, host, pid, shm fingerprint). The worker knows the
executor's public key, so it talks to nobody else; a stranger's connection fails the
handshake, and frames from a routing id without a HELLO are dropped unread. The worker
never reconnects. Traffic is encrypted on loopback too: one code path, and a local
user who can sniff loopback (root in a container, a capture tool) reads nothing.

A message's first frame is its kind byte, followed by its first frame's content when
that is small (one frame less to encrypt and send). Frames above ``auth.CHUNK_BYTES``
travel as several frames (the kind byte is then followed by ``CHUNKED``, and a frame of
chunk counts comes first), because both sockets refuse any frame larger than
``auth.MAX_FRAME``: that bounds what a stranger can make us buffer.

Where the HELLO shows that the worker sees the executor's ``/dev/shm`` (shm.fingerprint),
the WELCOME names a file prefix for that worker and both ends move large buffers through
files there (shm.py): ``send`` exports them, ``receive`` attaches them. When a worker
ends, the executor sweeps its prefix; a worker whose executor vanished sweeps it too.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from array import array
from collections.abc import Callable

import zmq

from executorlib import serialize
from executorlib.interactive import protocol
from executorlib.interactive.auth import CHUNK_BYTES, Gatekeeper, LaunchKeys, raise_fd_limit
from executorlib.interactive.endpoints import outcome_frames
from executorlib.interactive.shm import SharedMemory, fingerprint, valid_prefix

CHUNKED = b"+"  # second byte of a kind frame: the frames that follow are chunked
_ZERO_COPY_MIN = 64 * 1024
_EVENTS, _POLLIN, _SNDMORE = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.SNDMORE)
_HEARTBEAT_MS = 5_000
_HEARTBEAT_TIMEOUT_MS = 60_000
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class Peer:
    """A worker that connected with its launch's key: its routing id and who it is."""

    __slots__ = ("routing_id", "worker_id", "host", "pid", "shm", "seconds")

    def __init__(self, routing_id: bytes, worker_id: int, host: str, pid: int) -> None:
        self.routing_id, self.worker_id, self.host, self.pid = routing_id, worker_id, host, pid
        self.shm: SharedMemory | None = None  # large buffers through /dev/shm (same machine)
        self.seconds: float | None = None  # how long its last call ran, as it reported


class Router:
    """The executor's ROUTER (endpoints.py makes it on first need): bind, issue launch
    keys, admit HELLOs, send and receive."""

    def __init__(self, host: str, shm_for: Callable[[int, bytes], SharedMemory | None]) -> None:
        raise_fd_limit()
        self._context = zmq.Context()
        self.gate = Gatekeeper(self._context)
        self.socket = self._context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.gate.configure(self.socket)
        port = self.socket.bind_to_random_port(f"tcp://{_bind_address(host)}")
        self.address = f"tcp://{host}:{port}"
        self.peers: dict[bytes, Peer] = {}
        self._shm_for = shm_for  # files in /dev/shm for a worker whose HELLO shows ours

    def launch_keys(self, worker_id: int) -> LaunchKeys:
        """Keys for the worker about to be launched as ``worker_id`` (one connection)."""
        return self.gate.issue(worker_id)

    def receive(self) -> tuple[Peer, bytes, list] | None:
        """One message without blocking: (peer, kind, frames), or None when none waits.

        A worker's first HELLO is answered here and returned with kind HELLO; anything
        else from a connection that has not said HELLO, and any later HELLO, is dropped;
        so is a WELCOME that cannot reach a worker which vanished right after its HELLO
        (that worker's process end is reported as any other's).
        """
        while self.socket.getsockopt(_EVENTS) & _POLLIN:  # cheaper than catching zmq.Again
            routing_id, first, *frames = self.socket.recv_multipart(copy=False)
            peer = self.peers.get(routing_id.bytes)
            if peer is None:
                try:
                    peer = self._admit(routing_id.bytes, first, frames)
                except zmq.ZMQError:
                    continue
                if peer is not None:
                    return peer, protocol.HELLO, []
                _dropped(first.bytes[:8])
                continue
            kind, frames = _unpack(first, *frames)
            if kind != protocol.HELLO:
                return peer, kind, outcome_frames(peer, kind, frames)
        return None

    def _admit(self, routing_id: bytes, first: zmq.Frame, frames: list) -> Peer | None:
        """A Peer for the first HELLO of a launch, answered with WELCOME; else None."""
        if first.bytes != protocol.HELLO or len(frames) != 4:
            return None
        worker_id, host, pid, shm_fingerprint = (frame.bytes for frame in frames)
        if not (worker_id.isdigit() and pid.isdigit()):
            return None
        user_id = first.get("User-Id") if self.gate.encrypted else None
        if not self.gate.admit(user_id, int(worker_id)):
            return None
        peer = Peer(routing_id, int(worker_id), host.decode(errors="replace"), int(pid))
        peer.shm = self._shm_for(peer.worker_id, shm_fingerprint)
        self.peers[routing_id] = peer
        _send(self.socket, protocol.WELCOME, [peer.shm.prefix.encode() if peer.shm else b""], routing_id)
        return peer

    def send(self, peer: Peer, kind: bytes, frames: list) -> None:
        """Send one message (frames already exported to /dev/shm where they go there);
        ``ConnectionError`` if the worker's connection is gone."""
        try:
            _send(self.socket, kind, frames, peer.routing_id)
        except zmq.ZMQError as error:
            raise ConnectionError(f"{peer.worker_id}: {error}") from error

    def forget(self, worker_id: int, peer: object) -> None:
        """A worker's process has ended: its key admits nothing any more, messages from
        it are dropped."""
        self.gate.revoke(worker_id)
        if isinstance(peer, Peer):
            self.peers.pop(peer.routing_id, None)

    def close(self) -> None:
        self.socket.close(linger=0)
        self._context.term()  # also ends the ZAP handler


class WorkerConnection:
    """The worker's end: connect with the launch's keys, say HELLO, await WELCOME."""

    def __init__(self, address: str, keys: LaunchKeys, worker_id: int, timeout_s: float) -> None:
        self._context = zmq.Context()
        self.socket = self._context.socket(zmq.DEALER)
        for option, value in (
            (zmq.ROUTING_ID, os.urandom(16)),
            (zmq.LINGER, 2_000),
            (zmq.RECONNECT_IVL, -1),  # never reconnect: the launch's key admits one connection
            (zmq.HANDSHAKE_IVL, int(timeout_s * 1000)),
            (zmq.HEARTBEAT_IVL, _HEARTBEAT_MS),
            (zmq.HEARTBEAT_TIMEOUT, _HEARTBEAT_TIMEOUT_MS),
        ):
            self.socket.setsockopt(option, value)
        keys.configure(self.socket)
        events = zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED | _HANDSHAKE_FAILED
        self._monitor = self.socket.get_monitor_socket(events)
        self.socket.connect(address)
        self.address = address
        self.shm: SharedMemory | None = None
        self._handshake(worker_id, timeout_s)

    def close(self) -> None:
        """Hang up."""
        self.socket.close(linger=0)

    def _handshake(self, worker_id: int, timeout_s: float) -> None:
        fields = [str(worker_id).encode(), os.uname().nodename.encode(), str(os.getpid()).encode()]
        self.socket.send_multipart([protocol.HELLO, *fields, fingerprint()])
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        if self._monitor in dict(poller.poll(timeout_s * 1000)):
            raise ConnectionError(_refusal(self._monitor, self.address))
        if not poller.poll(0):
            raise TimeoutError(f"no answer from the executor at {self.address} within {timeout_s:g} s")
        kind, frames = _unpack(*self.socket.recv_multipart(copy=False))
        if kind != protocol.WELCOME or len(frames) != 1:
            raise ConnectionError(f"the executor at {self.address} answered HELLO with {kind!r}, not WELCOME")
        prefix = bytes(serialize.buffer_of(frames[0])).decode(errors="replace")
        if prefix and valid_prefix(prefix):
            self.shm = SharedMemory(prefix)

    def poll(self, timeout_ms: int) -> bool:
        """Whether a message is waiting, within ``timeout_ms``."""
        return bool(self.socket.poll(timeout_ms))

    def watch_executor(self, on_lost: Callable[[], None]) -> None:
        """Call ``on_lost`` from a daemon thread when the executor's connection drops."""

        def watch() -> None:
            self._monitor.recv_multipart()  # any event we subscribed to means: gone
            if self.shm is not None:
                self.shm.sweep()  # what we sent, or the executor sent us, unread
            on_lost()

        threading.Thread(target=watch, name="executorlib-watchdog", daemon=True).start()

    def receive(self) -> tuple[bytes, list]:
        """The next message; large buffers from /dev/shm stay there until the reply,
        so an unchanged one can go back without a copy."""
        kind, frames = _unpack(*self.socket.recv_multipart(copy=False))
        return kind, self.shm.attach(frames, hold=True) if self.shm and frames else frames

    def send(self, kind: bytes, frames: list = ()) -> None:
        """Send the reply to the last message received."""
        if self.shm is None:
            _send(self.socket, kind, frames)
            return
        _send(self.socket, kind, self.shm.export(list(frames)))
        self.shm.release()


def _dropped(kind: bytes) -> None:
    """Log (debug) a message dropped unread, e.g. a late result of a lost worker; logging
    is imported here, not on the workers' start-up path."""
    import logging

    logging.getLogger("executorlib").debug(
        "executorlib: dropped a message (kind %r) from a connection that is not, or no longer, "
        "a worker's (e.g. a late result of a worker the executor counts as lost)", kind
    )


def _refusal(monitor: zmq.Socket, address: str) -> str:
    """Why the connection to the executor failed, from the monitor's first event."""
    # zmq.utils.monitor would parse this, but imports asyncio: 50 ms of worker start-up
    event = int.from_bytes(monitor.recv_multipart()[0][:2], sys.byteorder)
    if event & _HANDSHAKE_FAILED:
        return (
            f"the CurveZMQ handshake with {address} failed ({zmq.Event(event).name}): the peer "
            "there is not the executor that launched this worker, or refused this worker's key"
        )
    return f"the connection to the executor at {address} was refused or closed"


def _send(socket: zmq.Socket, kind: bytes, frames: list, routing_id: bytes | None = None) -> None:
    """Send one multipart message. Large frames go without a copy; small ones are
    copied, which is cheaper than a zero-copy send's bookkeeping. (Frame by frame:
    ``send_multipart`` adds several microseconds of Python per message.)"""
    if any(len(frame) > CHUNK_BYTES for frame in frames):
        kind, frames = kind + CHUNKED, split_chunks(frames)
    elif frames and 1 < len(frames[0]) < _ZERO_COPY_MIN:  # one frame less to encrypt
        kind, frames = kind + frames[0], frames[1:]
    if routing_id is not None:
        socket.send(routing_id, _SNDMORE)
    socket.send(kind, _SNDMORE if frames else 0)
    last = len(frames) - 1
    for index, frame in enumerate(frames):
        flags = 0 if index == last else _SNDMORE
        socket.send(frame, flags, copy=len(frame) < _ZERO_COPY_MIN)


def _unpack(first: zmq.Frame, *frames: zmq.Frame) -> tuple[bytes, list]:
    """(kind, frames) of a received message. Its first frame is the kind alone, the
    kind and ``CHUNKED`` (chunks follow), or the kind and the content of a first frame
    of 2 bytes or more (so neither of the other two forms can be mistaken for it)."""
    data = first.bytes
    if len(data) == 1:
        return data, list(frames)
    if len(data) == 2 and data[1:] == CHUNKED:
        return data[:1], join_chunks(frames)
    return data[:1], [memoryview(data)[1:], *frames]


def split_chunks(frames: list) -> list:
    """``frames`` as pieces of at most ``CHUNK_BYTES``, after a frame of piece counts."""
    counts, pieces = array("Q"), []
    for frame in frames:
        view = memoryview(frame).cast("B")
        counts.append(max(1, -(-len(view) // CHUNK_BYTES)))
        pieces += [view[start:start + CHUNK_BYTES] for start in range(0, len(view) or 1, CHUNK_BYTES)]
    return [counts.tobytes(), *pieces]


def join_chunks(frames: list) -> list:
    """Inverse of :func:`split_chunks`; a frame sent whole is passed on as it came."""
    counts = array("Q", bytes(serialize.buffer_of(frames[0])))
    if sum(counts) != len(frames) - 1:
        raise ValueError(f"a chunked message announced {sum(counts)} pieces and carried {len(frames) - 1}")
    joined, start = [], 1
    for count in counts:
        group = frames[start:start + count]
        joined.append(group[0] if count == 1 else bytearray().join(map(serialize.buffer_of, group)))
        start += count
    return joined


def _bind_address(host: str) -> str:
    """The interface to bind for ``host``: a literal address, or what the name resolves to."""
    try:
        return socket.gethostbyname(host)
    except OSError as error:
        raise OSError(
            f"cannot resolve the executor's host name {host!r} ({error}); "
            "pass hostname_localhost=True if every worker runs on this node"
        ) from error
