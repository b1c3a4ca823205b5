"""Who may talk to the executor: one CurveZMQ key pair per worker launch.

The executor's ROUTER is a CURVE server (CurveZMQ: every frame encrypted and
authenticated with keys that never travel on the wire). For each worker it launches,
:meth:`Gatekeeper.issue` draws a fresh client key pair; the worker's secret key and the
server's public key reach that worker through its environment only (``KEYS_ENV``, never
argv), and the worker removes them from ``os.environ`` once read. A ZAP handler (a
thread answering libzmq's ``inproc://zeromq.zap.01`` requests) admits a client key only
while its launch is expected, and only once: a second connection with the same key, a
key of a launch that ended, or any other key is refused during the handshake, before a
single frame of data is accepted. The admitted connection carries its worker id as the
ZAP User-Id, and :meth:`Gatekeeper.admit` accepts one HELLO per launch, from that id.

Before a connection is authenticated, libzmq holds at most one frame of it, so
``MAX_FRAME`` (``ZMQ_MAXMSGSIZE``) bounds the memory a stranger can make us allocate per
connection, and ``HANDSHAKE_MS`` (``ZMQ_HANDSHAKE_IVL``) how long it may stay
unauthenticated. Larger frames of authenticated peers travel in chunks (channel.py).

Standard library and pyzmq only: workers import this module on their start-up path.
"""

from __future__ import annotations

import contextlib
import os
import threading

import zmq
from zmq.utils import z85

from executorlib.interactive.protocol import KEYS_ENV

HANDSHAKE_MS = 10_000  # an unauthenticated connection is dropped after this
CHUNK_BYTES = 64 * 1024  # data frames above this travel as several frames
MAX_FRAME = CHUNK_BYTES + 1024  # + CURVE's box and command header
_ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_KEY_CHARS = 40  # a Z85-encoded CURVE key
# Benchmarks only (benchmarks/bench_local.py): NULL mechanism, no encryption and no
# authentication beyond one HELLO per launched worker id. Never set it elsewhere.
_PLAINTEXT_FOR_BENCHMARKS = False
_PLAINTEXT = "plaintext"


class LaunchKeys:
    """What one worker needs to connect: the executor's public key and its own secret
    key (Z85), or neither for a plaintext benchmark run. ``repr`` hides the secret."""

    __slots__ = ("server_public", "secret")

    def __init__(self, server_public: bytes, secret: bytes) -> None:
        self.server_public, self.secret = server_public, secret

    def __repr__(self) -> str:
        return f"LaunchKeys(server_public={self.server_public!r}, secret=...)"

    def to_env(self) -> str:
        """The value of ``KEYS_ENV`` for the worker."""
        return (self.server_public + self.secret).decode() if self.secret else _PLAINTEXT

    @classmethod
    def pop_from_env(cls) -> LaunchKeys:
        """Read and remove ``KEYS_ENV``; a clear error if it is missing or malformed."""
        value = os.environ.pop(KEYS_ENV, "")
        if value == _PLAINTEXT:
            return cls(b"", b"")
        if len(value) != 2 * _KEY_CHARS:
            raise ConnectionError(
                f"{KEYS_ENV} is {'missing' if not value else 'malformed'} in this worker's "
                "environment; workers are started by an executorlib executor, which sets it"
            )
        return cls(value[:_KEY_CHARS].encode(), value[_KEY_CHARS:].encode())

    def configure(self, socket: zmq.Socket) -> None:
        """Make ``socket`` a CURVE client that accepts only the executor's key."""
        socket.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)
        if not self.secret:
            return
        socket.setsockopt(zmq.CURVE_SERVERKEY, self.server_public)
        socket.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        socket.setsockopt(zmq.CURVE_PUBLICKEY, zmq.curve_public(self.secret))


class Gatekeeper:
    """The executor's side: its key pair, the keys of launches not connected yet, the
    ZAP handler that admits each of them once, and one HELLO per launch."""

    def __init__(self, context: zmq.Context) -> None:
        self.encrypted = not _PLAINTEXT_FOR_BENCHMARKS
        self._public, self._secret = zmq.curve_keypair() if self.encrypted else (b"", b"")
        self._lock = threading.Lock()
        self._expected: dict[bytes, int] = {}  # client public key (Z85) -> worker id
        self._hello_due: set[int] = set()  # launched, HELLO not seen yet
        if self.encrypted:
            zap = context.socket(zmq.REP)
            zap.setsockopt(zmq.LINGER, 0)
            zap.bind(_ZAP_ENDPOINT)
            threading.Thread(target=self._serve, args=(zap,), name="executorlib-zap", daemon=True).start()

    def configure(self, socket: zmq.Socket) -> None:
        """Make ``socket`` (the ROUTER, before bind) a CURVE server guarded by us."""
        socket.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
        socket.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)
        if self.encrypted:
            socket.setsockopt(zmq.CURVE_SERVER, 1)
            socket.setsockopt(zmq.CURVE_SECRETKEY, self._secret)
            socket.setsockopt(zmq.ZAP_DOMAIN, b"executorlib")

    def issue(self, worker_id: int) -> LaunchKeys:
        """Keys for the launch of ``worker_id``; they admit one connection, once."""
        public, secret = zmq.curve_keypair() if self.encrypted else (b"", b"")
        with self._lock:
            self._hello_due.add(worker_id)
            if public:
                self._expected[public] = worker_id
        return LaunchKeys(self._public, secret)

    def revoke(self, worker_id: int) -> None:
        """The launch of ``worker_id`` ended: its key admits nothing any more."""
        with self._lock:
            self._hello_due.discard(worker_id)
            for key in [k for k, w in self._expected.items() if w == worker_id]:
                del self._expected[key]

    def admit(self, user_id: str | None, claimed: int) -> bool:
        """True for the first HELLO of a launched worker: with CURVE, only from the
        connection its own key opened (``user_id``, set by the ZAP handler)."""
        if self.encrypted and user_id != str(claimed):
            return False
        with self._lock:
            if claimed not in self._hello_due:
                return False
            self._hello_due.remove(claimed)
            return True

    def _serve(self, zap: zmq.Socket) -> None:
        """Answer ZAP requests until the context ends (ZAP RFC 27)."""
        while True:
            try:
                request = zap.recv_multipart()
            except zmq.ContextTerminated:
                zap.close(linger=0)
                return
            zap.send_multipart(self._answer(request))

    def _answer(self, request: list[bytes]) -> list[bytes]:
        version, request_id, *rest = request if len(request) >= 2 else (b"1.0", b"")
        worker_id = None
        if version == b"1.0" and len(rest) == 5 and rest[3] == b"CURVE":
            with self._lock:  # each launch's key admits one connection
                worker_id = self._expected.pop(z85.encode(rest[4]), None)
        if worker_id is None:
            return [b"1.0", request_id, b"400", b"unknown or already used key", b"", b""]
        return [b"1.0", request_id, b"200", b"OK", str(worker_id).encode(), b""]


def raise_fd_limit() -> None:
    """Raise this process's soft limit on open files to its hard limit, so that idle
    connections from strangers (each dropped after ``HANDSHAKE_MS``) cannot use up the
    descriptors the executor needs for workers."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):  # some cap below an infinite hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
