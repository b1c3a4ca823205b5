"""ZeroMQ sockets with authentication: the executor's ROUTER and each worker's DEALER.

The executor binds one ROUTER on a single interface (loopback, or the address of its
host inside an allocation; never ``tcp://*``). A worker connects a DEALER whose routing
id is 16 random bytes and opens with HELLO carrying an HMAC of that id under the
per-executor secret; the secret reaches workers through the environment only. The
executor answers with its own HMAC over the worker's nonce. Until a peer has proven the
secret, none of its frames is unpickled, on either side; frames from an unknown routing
id are dropped. The worker never reconnects, so the proven connection cannot be swapped.
"""

from __future__ import annotations

import hmac
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from executorlib.interactive import protocol

_HEARTBEAT_MS = 5_000
_HEARTBEAT_TIMEOUT_MS = 60_000


@dataclass(slots=True)
class Peer:
    """A worker that proved the secret: its routing id and who it says it is."""

    routing_id: bytes
    worker_id: int
    host: str
    pid: int


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

    def receive(self) -> tuple[Peer, bytes, list] | None:
        """One message without blocking: (peer, kind, frames), or None when none waits.

        A valid HELLO is answered here and returned with kind HELLO; anything from a
        peer that has not proven the secret is dropped unread.
        """
        while True:
            try:
                routing_id, kind, *frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return None
            routing_id, kind = routing_id.bytes, kind.bytes
            peer = self.peers.get(routing_id)
            if peer is not None:
                return peer, kind, frames
            if kind == protocol.HELLO and (peer := self._admit(routing_id, frames)):
                return peer, kind, []

    def _admit(self, routing_id: bytes, frames: list) -> Peer | None:
        if len(frames) != 5:
            return None
        nonce, mac, worker_id, host, pid = (frame.bytes for frame in frames)
        expected = protocol.hello_mac(self._secret, routing_id, nonce)
        if not hmac.compare_digest(mac, expected):
            return None
        peer = Peer(routing_id, int(worker_id), host.decode(errors="replace"), int(pid))
        self.peers[routing_id] = peer
        self.send(peer, protocol.WELCOME, [protocol.welcome_mac(self._secret, nonce)])
        return peer

    def send(self, peer: Peer, kind: bytes, frames: list = ()) -> None:
        """Send one message; large frames go without a copy."""
        self.socket.send_multipart([peer.routing_id, kind, *frames], copy=False)

    def forget(self, peer: Peer) -> None:
        """Stop accepting messages from a peer whose process has ended."""
        self.peers.pop(peer.routing_id, None)

    def close(self) -> None:
        self.socket.close(linger=0)
        self._context.term()


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
        self._handshake(secret, routing_id, worker_id, timeout_s)

    def _handshake(self, secret: bytes, routing_id: bytes, worker_id: int, timeout_s: float) -> None:
        nonce = os.urandom(16)
        host, pid = socket.gethostname().encode(), str(os.getpid()).encode()
        mac = protocol.hello_mac(secret, routing_id, nonce)
        self.socket.send_multipart([protocol.HELLO, nonce, mac, str(worker_id).encode(), host, pid])
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        if self._monitor in dict(poller.poll(timeout_s * 1000)):
            raise ConnectionError(f"the connection to the executor at {self.address} was refused or closed")
        if not poller.poll(0):
            raise TimeoutError(f"no answer from the executor at {self.address} within {timeout_s:g} s")
        kind, *frames = self.socket.recv_multipart()
        if kind != protocol.WELCOME or not hmac.compare_digest(frames[0], protocol.welcome_mac(secret, nonce)):
            raise ConnectionError(f"the peer at {self.address} could not prove the executor's secret")

    def watch_executor(self, on_lost: Callable[[], None]) -> None:
        """Call ``on_lost`` from a daemon thread when the executor's connection drops."""

        def watch() -> None:
            self._monitor.recv_multipart()  # any event we subscribed to means: gone
            on_lost()

        threading.Thread(target=watch, name="executorlib-watchdog", daemon=True).start()

    def receive(self) -> tuple[bytes, list]:
        kind, *frames = self.socket.recv_multipart(copy=False)
        return kind.bytes, frames

    def send(self, kind: bytes, frames: list = ()) -> None:
        self.socket.send_multipart([kind, *frames], copy=False)


def _bind_address(host: str) -> str:
    """The interface to bind for ``host``: a literal address, or what the name resolves to."""
    try:
        return socket.gethostbyname(host)
    except OSError as error:
        raise OSError(
            f"cannot resolve the executor's host name {host!r} ({error}); "
            "pass hostname_localhost=True if every worker runs on this node"
        ) from error
