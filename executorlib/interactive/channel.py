"""ZeroMQ sockets with authentication: the executor's ROUTER and each worker's DEALER.

The executor binds one ROUTER on a single interface (loopback, or the address of its
host inside an allocation; never ``tcp://*``). A worker connects a DEALER whose routing
id is 16 random bytes and opens with HELLO carrying an HMAC of that id under the
per-executor secret; the secret reaches workers through the environment only. The
executor answers with its own HMAC over the worker's nonce. Until a peer has proven the
secret, none of its frames is unpickled, on either side; frames from an unknown routing
id are dropped. The worker never reconnects, so the proven connection cannot be swapped.

Where the HELLO shows that the worker sees the executor's ``/dev/shm`` (shm.fingerprint),
the WELCOME names a file prefix for that worker and both ends move large buffers through
files there (shm.py): ``send`` exports them, ``receive`` attaches them. When a worker
ends, the executor sweeps its prefix; a worker whose executor vanished sweeps it too.
"""

from __future__ import annotations

import hmac
import os
import socket
import threading
from collections.abc import Callable

import zmq

from executorlib.interactive import protocol
from executorlib.interactive.shm import SharedMemory, fingerprint, owner_prefix, sweep_stale, valid_prefix

_ZERO_COPY_MIN = 64 * 1024
_EVENTS, _POLLIN, _SNDMORE = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.SNDMORE)
_HEARTBEAT_MS = 5_000
_HEARTBEAT_TIMEOUT_MS = 60_000


class Peer:
    """A worker that proved the secret: its routing id and who it says it is."""

    __slots__ = ("routing_id", "worker_id", "host", "pid", "shm")

    def __init__(self, routing_id: bytes, worker_id: int, host: str, pid: int) -> None:
        self.routing_id, self.worker_id, self.host, self.pid = routing_id, worker_id, host, pid
        self.shm: SharedMemory | None = None  # large buffers through /dev/shm (same machine)


class ExecutorSocket:
    """The executor's end: bind, authenticate HELLOs, send to and receive from peers."""

    def __init__(self, host: str, secret: bytes) -> None:
        self._secret = secret
        self._context = zmq.Context()
        self.socket = self._context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        port = self.socket.bind_to_random_port(f"tcp://{_bind_address(host)}")
        self.address = f"tcp://{host}:{port}"
        self.peers: dict[bytes, Peer] = {}
        self._fingerprint = fingerprint()
        self._shm_prefix = f"{owner_prefix()}{os.urandom(6).hex()}-"
        if self._fingerprint:
            sweep_stale()

    def receive(self) -> tuple[Peer, bytes, list] | None:
        """One message without blocking: (peer, kind, frames), or None when none waits.

        A valid HELLO is answered here and returned with kind HELLO; anything from a
        peer that has not proven the secret is dropped unread.
        """
        while self.socket.getsockopt(_EVENTS) & _POLLIN:  # cheaper than catching zmq.Again
            routing_id, kind, *frames = self.socket.recv_multipart(copy=False)
            routing_id, kind = routing_id.bytes, kind.bytes
            peer = self.peers.get(routing_id)
            if peer is not None:
                return peer, kind, peer.shm.attach(frames) if peer.shm and frames else frames
            if kind == protocol.HELLO and (peer := self._admit(routing_id, frames)):
                return peer, kind, []
        return None

    def _admit(self, routing_id: bytes, frames: list) -> Peer | None:
        if len(frames) != 6:
            return None
        nonce, mac, *fields = (frame.bytes for frame in frames)
        expected = protocol.hello_mac(self._secret, routing_id, nonce, fields)
        if not hmac.compare_digest(mac, expected):
            return None
        worker_id, host, pid, shm_fingerprint = fields
        peer = Peer(routing_id, int(worker_id), host.decode(errors="replace"), int(pid))
        if shm_fingerprint and shm_fingerprint == self._fingerprint:
            peer.shm = SharedMemory(f"{self._shm_prefix}{peer.worker_id}-")
        prefix = peer.shm.prefix.encode() if peer.shm else b""
        self.peers[routing_id] = peer
        self.send(peer, protocol.WELCOME, [protocol.welcome_mac(self._secret, nonce, prefix), prefix])
        return peer

    def send(self, peer: Peer, kind: bytes, frames: list = ()) -> None:
        """Send one message; large frames go without a copy (or through /dev/shm)."""
        if peer.shm is not None and frames:
            frames = peer.shm.export(frames)
        _send(self.socket, [peer.routing_id, kind, *frames])

    def forget(self, peer: Peer) -> None:
        """Stop accepting messages from a peer whose process has ended, and remove
        the shared-memory files it or we left unread."""
        self.peers.pop(peer.routing_id, None)
        if peer.shm is not None:
            peer.shm.sweep()

    def close(self) -> None:
        self.socket.close(linger=0)
        self._context.term()
        SharedMemory(self._shm_prefix).sweep()  # workers that never said goodbye


class WorkerConnection:
    """The worker's end: connect, prove the secret, check the executor's proof."""

    def __init__(self, address: str, secret: bytes, worker_id: int, timeout_s: float) -> None:
        self._context = zmq.Context()
        self.socket = self._context.socket(zmq.DEALER)
        routing_id = os.urandom(16)
        for option, value in (
            (zmq.ROUTING_ID, routing_id),
            (zmq.LINGER, 2_000),
            (zmq.RECONNECT_IVL, -1),  # never reconnect: a new peer would skip the proof
            (zmq.HEARTBEAT_IVL, _HEARTBEAT_MS),
            (zmq.HEARTBEAT_TIMEOUT, _HEARTBEAT_TIMEOUT_MS),
        ):
            self.socket.setsockopt(option, value)
        self._monitor = self.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED)
        self.socket.connect(address)
        self.address = address
        self.shm: SharedMemory | None = None
        self._handshake(secret, routing_id, worker_id, timeout_s)

    def _handshake(self, secret: bytes, routing_id: bytes, worker_id: int, timeout_s: float) -> None:
        nonce = os.urandom(16)
        fields = [str(worker_id).encode(), socket.gethostname().encode(), str(os.getpid()).encode()]
        fields.append(fingerprint())
        mac = protocol.hello_mac(secret, routing_id, nonce, fields)
        self.socket.send_multipart([protocol.HELLO, nonce, mac, *fields])
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        if self._monitor in dict(poller.poll(timeout_s * 1000)):
            raise ConnectionError(f"the connection to the executor at {self.address} was refused or closed")
        if not poller.poll(0):
            raise TimeoutError(f"no answer from the executor at {self.address} within {timeout_s:g} s")
        kind, *frames = self.socket.recv_multipart()
        if kind != protocol.WELCOME or len(frames) != 2 or not hmac.compare_digest(
            frames[0], protocol.welcome_mac(secret, nonce, frames[1])
        ):
            raise ConnectionError(f"the peer at {self.address} could not prove the executor's secret")
        prefix = frames[1].decode(errors="replace")
        if prefix and valid_prefix(prefix):
            self.shm = SharedMemory(prefix)

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
        kind, *frames = self.socket.recv_multipart(copy=False)
        return kind.bytes, self.shm.attach(frames, hold=True) if self.shm and frames else frames

    def send(self, kind: bytes, frames: list = ()) -> None:
        """Send the reply to the last message received."""
        if self.shm is None:
            _send(self.socket, [kind, *frames])
            return
        _send(self.socket, [kind, *self.shm.export(list(frames))])
        self.shm.release()


def _send(socket: zmq.Socket, frames: list) -> None:
    """Send one multipart message. Large frames go without a copy; small ones are
    copied, which is cheaper than a zero-copy send's bookkeeping. (Frame by frame:
    ``send_multipart`` adds several microseconds of Python per message.)"""
    last = len(frames) - 1
    for index, frame in enumerate(frames):
        flags = 0 if index == last else _SNDMORE
        socket.send(frame, flags, copy=len(frame) < _ZERO_COPY_MIN)


def _bind_address(host: str) -> str:
    """The interface to bind for ``host``: a literal address, or what the name resolves to."""
    try:
        return socket.gethostbyname(host)
    except OSError as error:
        raise OSError(
            f"cannot resolve the executor's host name {host!r} ({error}); "
            "pass hostname_localhost=True if every worker runs on this node"
        ) from error
