"""The manager thread's ends of every worker's channel, and the one poll that watches them.

Local serial workers talk over socket pairs (pipe.py); srun steps and Flux jobs on this
machine over a Unix socket in a private directory (host_socket.py), read the same way;
every other worker (local MPI ranks, steps and jobs on other nodes, pilot jobs,
containers) over the executor's ZeroMQ ROUTER (channel.py), which is bound, and ZeroMQ
imported, only when the first such worker is launched: an executor of local serial
workers opens no port and never loads ZeroMQ.

:class:`Poller` is ``epoll`` plus that ROUTER, polled through its ``ZMQ_FD``. That
descriptor only says "the socket's state may have changed": the ROUTER counts as
readable while ``ZMQ_EVENTS`` says so, which is checked after every wake-up and before
every wait (a send or receive on the socket may have taken the signal with it).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
from typing import TYPE_CHECKING, Any

from executorlib.interactive import pipe, protocol
from executorlib.interactive.host_socket import UNIDENTIFIED, HostListener
from executorlib.interactive.pipe import PipePeer
from executorlib.interactive.shm import SharedMemory, fingerprint, owner_prefix, sweep_stale

if TYPE_CHECKING:
    from executorlib.interactive.auth import LaunchKeys
    from executorlib.interactive.channel import Peer, Router

POLLIN, POLLOUT = select.EPOLLIN, select.EPOLLOUT


class Poller:
    """``epoll`` over descriptors (one wait costs the same for 6 or 200 of them, as with
    64 workers), plus at most one ZeroMQ socket. The manager thread's alone."""

    def __init__(self) -> None:
        self._poll = select.epoll()
        self._zmq: Any = None  # the ROUTER's zmq.Socket, once there is one
        self._zmq_fd = -1
        self._dropped: set[int] = set()  # unregistered since the last wait

    def register(self, fd: int, events: int = POLLIN) -> None:
        """Watch ``fd`` for ``events`` (again: change them)."""
        try:
            self._poll.register(fd, events)
        except FileExistsError:
            self._poll.modify(fd, events)

    def unregister(self, fd: int) -> None:
        """Stop watching ``fd``; closing it may have done so already."""
        self._dropped.add(fd)
        with contextlib.suppress(OSError):
            self._poll.unregister(fd)

    def stale(self, fd: int) -> bool:
        """Whether an event of the last wait on ``fd`` is about a descriptor unregistered
        since (and closed: its number may be a new descriptor's by now)."""
        return fd in self._dropped

    def close(self) -> None:
        self._poll.close()

    def add_zmq(self, zmq_socket: Any) -> None:
        """Watch ``zmq_socket`` for input; it is reported as itself, not as a number."""
        import zmq

        self._zmq, self._zmq_fd = zmq_socket, zmq_socket.getsockopt(zmq.FD)
        self._events, self._pollin = zmq.EVENTS, zmq.POLLIN
        self._poll.register(self._zmq_fd, POLLIN)

    def poll(self, timeout_ms: int | None) -> list[tuple[Any, int]]:
        """(source, events) ready within ``timeout_ms`` (None: no limit)."""
        router_ready = self._zmq is not None and self._zmq.getsockopt(self._events) & self._pollin
        self._dropped.clear()
        wait_s = 0 if router_ready else -1 if timeout_ms is None else timeout_ms / 1000
        ready = self._poll.poll(wait_s)
        events = [(fd, mask) for fd, mask in ready if fd != self._zmq_fd]
        if len(events) < len(ready) and not router_ready:  # its descriptor fired: look
            router_ready = self._zmq.getsockopt(self._events) & self._pollin
        if router_ready:
            events.insert(0, (self._zmq, POLLIN))
        return events


class ExecutorSocket:
    """The executor's ends: socket pairs to local serial workers, and the ROUTER (made
    on first need: :attr:`address`); issue launch keys, admit HELLOs, send, receive.
    Every descriptor is (un)registered in the manager's ``poller`` here."""

    def __init__(self, host: str, poller: Poller) -> None:
        self._host, self._poller = host, poller
        self._router: Router | None = None
        self._listener: HostListener | None = None  # the same-host socket (host_socket.py)
        self._listener_failed = False
        self.pipes: dict[int, PipePeer] = {}  # fd -> worker on a socket pair or the same-host socket
        self._scratch = pipe.receive_buffer()  # every peer's, read by the manager thread only
        self._fingerprint = fingerprint()
        self._shm_prefix = f"{owner_prefix()}{os.urandom(6).hex()}-"
        if self._fingerprint:
            sweep_stale()

    @property
    def socket(self) -> Any:
        """The ROUTER's ZeroMQ socket, or None while no worker needed it."""
        return None if self._router is None else self._router.socket

    @property
    def address(self) -> str:
        """``tcp://HOST:PORT`` of the ROUTER, bound (on one interface) on first use."""
        if self._router is None:
            from executorlib.interactive.channel import Router

            self._router = Router(self._host, self.shm_for)
            self._poller.add_zmq(self._router.socket)
        return self._router.address

    def shm_for(self, worker_id: int, shm_fingerprint: bytes) -> SharedMemory | None:
        """Files in /dev/shm for the large buffers of a worker that sees ours (its
        HELLO's fingerprint is ours), else None."""
        if shm_fingerprint and shm_fingerprint == self._fingerprint:
            return SharedMemory(f"{self._shm_prefix}{worker_id}-")
        return None

    def launch_keys(self, worker_id: int) -> LaunchKeys:
        """Keys for the worker about to be launched as ``worker_id`` (one connection)."""
        self.address  # noqa: B018  (binds the ROUTER and starts its gatekeeper)
        return self._router.launch_keys(worker_id)

    def host_address(self, worker_id: int) -> tuple[str, LaunchKeys]:
        """(address, keys) for a worker that may run on this machine or another
        (host_socket.py): the same-host socket, else the ROUTER."""
        keys = self.launch_keys(worker_id)
        if self._listener is None and not self._listener_failed:
            try:
                self._listener = HostListener(self.address)
                self._poller.register(self._listener.fileno(), POLLIN)
            except OSError:  # e.g. a temporary directory whose path is too long
                self._listener_failed = True
        if self._listener is None:
            return self.address, keys
        self._listener.expect(worker_id, keys.to_env())
        return self._listener.address, keys

    @property
    def listener_fd(self) -> int:
        """The same-host socket's descriptor (-1: none)."""
        return -1 if self._listener is None else self._listener.fileno()

    def accept(self) -> None:
        """Connections on the same-host socket: polled as socket pairs, unidentified
        until their HELLO (:meth:`read_pipe`)."""
        for conn in self._listener.accept():
            peer = PipePeer(UNIDENTIFIED, conn, self._scratch)
            self.pipes[peer.fileno()] = peer
            self._poller.register(peer.fileno(), POLLIN)

    def receive(self) -> tuple[Peer, bytes, list] | None:
        """One message of the ROUTER without blocking (channel.Router.receive)."""
        return self._router.receive()

    def open_pipe(self, worker_id: int) -> tuple[PipePeer, socket.socket]:
        """A socket pair for the local worker about to be launched as ``worker_id``:
        (our peer, polled from now on; the end the worker inherits, to close once started)."""
        ours, theirs = pipe.pair()
        peer = PipePeer(worker_id, ours, self._scratch)
        self.pipes[peer.fileno()] = peer
        self._poller.register(peer.fileno(), POLLIN)
        return peer, theirs

    def read_pipe(self, peer: PipePeer) -> tuple[list[tuple[PipePeer, bytes, list]], bool]:
        """(messages from a socket-pair worker, whether its end closed); its HELLO is
        answered with WELCOME and returned with no frames, anything before it closes."""
        messages, closed = peer.read()
        out = []
        for kind, frames in messages:
            if not peer.hello:
                try:
                    welcome = kind == protocol.HELLO and self._welcome(peer, frames)
                except OSError:  # it hung up right after its HELLO
                    welcome = False
                if not welcome:
                    return out, True
                out.append((peer, protocol.HELLO, []))
            elif kind != protocol.HELLO:
                out.append((peer, kind, outcome_frames(peer, kind, frames)))
        return out, closed

    def _welcome(self, peer: PipePeer, frames: list) -> bool:
        if peer.worker_id == UNIDENTIFIED:  # on the same-host socket: the launch's proof
            admitted = self._listener.admit(frames[0], frames[4]) if len(frames) == 5 else None
            if admitted is None:
                return False
            peer.worker_id = admitted
        elif len(frames) != 4:
            return False
        worker_id, host, pid, shm_fingerprint = frames[:4]
        if worker_id != str(peer.worker_id).encode() or not pid.isdigit():
            return False
        peer.hello, peer.host, peer.pid = True, host.decode(errors="replace"), int(pid)
        peer.shm = self.shm_for(peer.worker_id, shm_fingerprint)
        self.send(peer, protocol.WELCOME, [peer.shm.prefix.encode() if peer.shm else b""])
        return True

    def on_writable(self, peer: PipePeer) -> None:
        """The socket of ``peer`` takes more: send what waits (``OSError``: it is gone)."""
        if not peer.flush():
            self._poller.register(peer.fileno(), POLLIN)

    def send(self, peer: Peer | PipePeer, kind: bytes, frames: list = ()) -> None:
        """Send one message; large frames go without a copy (or through /dev/shm).
        ``OSError`` (``ConnectionError`` from the ROUTER) if the worker's end is gone."""
        if peer.shm is not None and frames:
            frames = peer.shm.export(frames)
        if peer.routing_id is not None:
            self._router.send(peer, kind, frames)
        elif peer.write(kind, frames):  # the rest waits for POLLOUT
            self._poller.register(peer.fileno(), POLLIN | POLLOUT)

    def forget(self, worker_id: int, peer: Peer | PipePeer | None) -> None:
        """A worker's process has ended: its key admits nothing any more, messages from
        it are dropped, and the shared-memory files it or we left unread are removed."""
        if self._router is not None:
            self._router.forget(worker_id, peer)
        if self._listener is not None:
            self._listener.forget(worker_id)
        for pipe_peer in [p for p in self.pipes.values() if p.worker_id == worker_id]:
            self.close_pipe(pipe_peer)
        if peer is not None and peer.shm is not None:
            peer.shm.sweep()

    def close_pipe(self, peer: PipePeer) -> None:
        """Stop polling ``peer``'s socket and close it (its worker's end then reads EOF)."""
        if self.pipes.pop(peer.fileno(), None) is not None:
            self._poller.unregister(peer.fileno())
            peer.close()

    def close(self) -> None:
        for peer in list(self.pipes.values()):
            self.close_pipe(peer)
        if self._router is not None:
            self._router.close()
        if self._listener is not None:
            self._poller.unregister(self._listener.fileno())
            self._listener.close()
        SharedMemory(self._shm_prefix).sweep()  # workers that never said goodbye


def outcome_frames(peer: Peer | PipePeer, kind: bytes, frames: list) -> list:
    """A message's frames as the manager uses them: large buffers attached from
    /dev/shm, and a RESULT's or FAILURE's duration moved to ``peer.seconds``."""
    if kind in (protocol.RESULT, protocol.FAILURE):
        frames, peer.seconds = protocol.split_seconds(frames)
    return peer.shm.attach(frames) if peer.shm and frames else frames
