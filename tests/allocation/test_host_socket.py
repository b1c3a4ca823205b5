"""srun steps on the executor's own node talk over a Unix socket in a private directory
(executorlib/interactive/host_socket.py), without ZeroMQ; nobody else gets in. (A step
on another node uses the CurveZMQ ROUTER: tests/test_security_channel.py sniffs it.)"""

from __future__ import annotations

import os
import socket
import sys

import psutil

from executorlib import Executor
from executorlib.interactive import protocol
from executorlib.interactive.pipe import message_buffers


def worker_facts() -> dict:
    return {"zmq": "zmq" in sys.modules, "node": os.uname().nodename,
            "step": os.environ.get("SLURM_STEP_ID"), "keys": os.environ.get("EXECUTORLIB_KEYS")}


def the_socket() -> str:
    """The path of this process's same-host socket (exactly one)."""
    paths = {c.laddr for c in psutil.Process().net_connections(kind="unix")
             if c.laddr and os.path.basename(os.path.dirname(c.laddr)).startswith("executorlib-")}
    assert len(paths) == 1, paths
    return paths.pop()


def closed_by_executor(conn: socket.socket) -> bool:
    """Whether the executor closes ``conn`` (EOF) rather than answering it."""
    conn.settimeout(60)
    try:
        return conn.recv(1024) == b""
    except ConnectionResetError:
        return True


def test_a_step_on_this_node_connects_over_the_private_socket_without_zeromq():
    with Executor(backend="slurm_allocation") as exe:
        facts = exe.submit(worker_facts).result(timeout=120)
        path = the_socket()
        folder = os.stat(os.path.dirname(path))
    assert facts == {"zmq": False, "node": os.uname().nodename, "step": facts["step"], "keys": None}
    assert facts["step"] is not None  # it ran as an srun step
    assert (folder.st_mode & 0o777, folder.st_uid) == (0o700, os.getuid())
    assert not os.path.exists(os.path.dirname(path))  # removed at shutdown


def test_another_user_cannot_reach_the_socket(other_user):
    probe = "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])"
    with Executor(backend="slurm_allocation") as exe:
        exe.submit(worker_facts).result(timeout=120)
        done = other_user.run([sys.executable, "-c", probe, the_socket()])
        assert exe.submit(worker_facts).result(timeout=120)["zmq"] is False
    assert done.returncode != 0 and "PermissionError" in done.stderr, done.stderr


def test_connections_without_a_launchs_proof_are_closed_and_the_executor_serves_on():
    """Our own user's process, not a worker we launched: a HELLO with a wrong proof,
    a HELLO for a worker id with no launch, and bytes that are no message at all."""
    hellos = [
        [b"0", b"node", b"1", b"", b"0" * 64],  # worker 0 exists, but not with this proof
        [b"99", b"node", b"1", b"", b"0" * 64],  # no such launch
    ]
    with Executor(backend="slurm_allocation") as exe:
        exe.submit(worker_facts).result(timeout=120)
        path = the_socket()
        for frames in hellos:
            with socket.socket(socket.AF_UNIX) as conn:
                conn.connect(path)
                conn.sendmsg(message_buffers(protocol.HELLO, frames))
                assert closed_by_executor(conn)
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(path)
            conn.sendall(b"GET / HTTP/1.0\r\n\r\n" * 100)
            assert closed_by_executor(conn)
        idle = socket.socket(socket.AF_UNIX)
        idle.connect(path)  # says nothing: it must not keep the executor from serving or ending
        assert exe.submit(worker_facts).result(timeout=120)["zmq"] is False
    try:
        assert closed_by_executor(idle)
    finally:
        idle.close()
