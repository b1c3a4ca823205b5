"""ZeroMQ sockets, encrypted and authenticated: the executor's ROUTER and each worker's DEALER.

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
from executorlib.interactive import pipe, protocol
from executorlib.interactive.auth import CHUNK_BYTES, Gatekeeper, LaunchKeys, raise_fd_limit
from executorlib.interactive.pipe import PipePeer
from executorlib.interactive.shm import SharedMemory, fingerprint, owner_prefix, sweep_stale, valid_prefix

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

    __slots__ = ("routing_id", "worker_id", "host", "pid", "shm")

    def __init__(self, routing_id: bytes, worker_id: int, host: str, pid: int) -> None:
        self.routing_id, self.worker_id, self.host, self.pid = routing_id, worker_id, host, pid
        self.shm: SharedMemory | None = None  # large buffers through /dev/shm (same machine)


class ExecutorSocket:
    """The executor's end: issue launch keys, admit HELLOs, send and receive; the
    ROUTER is bound on first need (:attr:`address`), and local serial workers talk over
    socket pairs instead (pipe.py), so an executor of only those opens no port at all.
    Every descriptor is (un)registered in the manager's ``poller`` here."""

    def __init__(self, host: str, poller: zmq.Poller) -> None:
        raise_fd_limit()
        self._host, self._poller = host, poller
        self._context: zmq.Context | None = None
        self.gate: Gatekeeper | None = None
        self.socket: zmq.Socket | None = None
        self._address: str | None = None
        self.peers: dict[bytes, Peer] = {}
        self.pipes: dict[int, PipePeer] = {}  # fd -> worker on a socket pair
        self._fingerprint = fingerprint()
        self._shm_prefix = f"{owner_prefix()}{os.urandom(6).hex()}-"
        if self._fingerprint:
            sweep_stale()

    @property
    def address(self) -> str:
        """``tcp://HOST:PORT`` of the ROUTER, bound (on one interface) on first use."""
        if self._address is None:
            self._context = zmq.Context()
            self.gate = Gatekeeper(self._context)
            router = self._context.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self.gate.configure(router)
            port = router.bind_to_random_port(f"tcp://{_bind_address(self._host)}")
            self.socket, self._address = router, f"tcp://{self._host}:{port}"
            self._poller.register(router, zmq.POLLIN)
        return self._address

    def open_pipe(self, worker_id: int) -> tuple[PipePeer, socket.socket]:
        """A socket pair for the local worker about to be launched as ``worker_id``:
        (our peer, polled from now on; the end the worker inherits, to close once started)."""
        ours, theirs = pipe.pair()
        peer = PipePeer(worker_id, ours)
        self.pipes[peer.fileno()] = peer
        self._poller.register(peer.fileno(), zmq.POLLIN)
        return peer, theirs

    def read_pipe(self, peer: PipePeer) -> tuple[list[tuple[PipePeer, bytes, list]], bool]:
        """(messages from a socket-pair worker, whether its end closed); its HELLO is
        answered with WELCOME and returned with no frames, anything before it closes."""
        messages, closed = peer.read()
        out = []
        for kind, frames in messages:
            if not peer.hello:
                try:
                    welcome = kind == protocol.HELLO and len(frames) == 4 and self._welcome(peer, frames)
                except OSError:  # it hung up right after its HELLO
                    welcome = False
                if not welcome:
                    return out, True
                out.append((peer, protocol.HELLO, []))
            elif kind != protocol.HELLO:
                out.append((peer, kind, peer.shm.attach(frames) if peer.shm and frames else frames))
        return out, closed

    def _welcome(self, peer: PipePeer, frames: list) -> bool:
        worker_id, host, pid, shm_fingerprint = frames
        if worker_id != str(peer.worker_id).encode() or not pid.isdigit():
            return False
        peer.hello, peer.host, peer.pid = True, host.decode(errors="replace"), int(pid)
        if shm_fingerprint and shm_fingerprint == self._fingerprint:
            peer.shm = SharedMemory(f"{self._shm_prefix}{peer.worker_id}-")
        self.send(peer, protocol.WELCOME, [peer.shm.prefix.encode() if peer.shm else b""])
        return True

    def on_writable(self, peer: PipePeer) -> None:
        """The socket of ``peer`` takes more: send what waits (``OSError``: it is gone)."""
        if not peer.flush():
            self._poller.register(peer.fileno(), zmq.POLLIN)

    def launch_keys(self, worker_id: int) -> LaunchKeys:
        """Keys for the worker about to be launched as ``worker_id`` (one connection)."""
        self.address  # noqa: B018  (binds the ROUTER and starts the gatekeeper)
        return self.gate.issue(worker_id)

    def receive(self) -> tuple[Peer, bytes, list] | None:
        """One message of the ROUTER without blocking: (peer, kind, frames), or None.

        A worker's first HELLO is answered here and returned with kind HELLO; anything
        else from a connection that has not said HELLO, and any later HELLO, is dropped.
        """
        while self.socket.getsockopt(_EVENTS) & _POLLIN:  # cheaper than catching zmq.Again
            routing_id, first, *frames = self.socket.recv_multipart(copy=False)
            peer = self.peers.get(routing_id.bytes)
            if peer is None:
                if peer := self._admit(routing_id.bytes, first, frames):
                    return peer, protocol.HELLO, []
                _dropped(first.bytes[:8])
                continue
            kind, frames = _unpack(first, *frames)
            if kind != protocol.HELLO:
                return peer, kind, peer.shm.attach(frames) if peer.shm and frames else frames
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
        if shm_fingerprint and shm_fingerprint == self._fingerprint:
            peer.shm = SharedMemory(f"{self._shm_prefix}{peer.worker_id}-")
        self.peers[routing_id] = peer
        self.send(peer, protocol.WELCOME, [peer.shm.prefix.encode() if peer.shm else b""])
        return peer

    def send(self, peer: Peer | PipePeer, kind: bytes, frames: list = ()) -> None:
        """Send one message; large frames go without a copy (or through /dev/shm).
        ``zmq.ZMQError`` or ``OSError`` if the worker's connection is gone."""
        if peer.shm is not None and frames:
            frames = peer.shm.export(frames)
        if peer.routing_id is not None:
            _send(self.socket, kind, frames, peer.routing_id)
        elif peer.write(kind, frames):  # the rest waits for POLLOUT
            self._poller.register(peer.fileno(), zmq.POLLIN | zmq.POLLOUT)

    def forget(self, worker_id: int, peer: Peer | None) -> None:
        """A worker's process has ended: its key admits nothing any more, messages from
        it are dropped, and the shared-memory files it or we left unread are removed."""
        if self.gate is not None:
            self.gate.revoke(worker_id)
        for pipe_peer in [p for p in self.pipes.values() if p.worker_id == worker_id]:
            self.close_pipe(pipe_peer)
        if peer is None:
            return
        if peer.routing_id is not None:
            self.peers.pop(peer.routing_id, None)
        if peer.shm is not None:
            peer.shm.sweep()

    def close_pipe(self, peer: PipePeer) -> None:
        """Stop polling ``peer``'s socket and close it (its worker's end then reads EOF)."""
        if self.pipes.pop(peer.fileno(), None) is not None:
            self._poller.unregister(peer.fileno())
            peer.close()

    def close(self) -> None:
        for peer in list(self.pipes.values()):
            self.close_pipe(peer)
        if self.socket is not None:
            self.socket.close(linger=0)
            self._context.term()  # also ends the ZAP handler
        SharedMemory(self._shm_prefix).sweep()  # workers that never said goodbye


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
