"""Cluster side, per ssh session: connect to the user's agent (start it if needed) and
relay the ssh channel's stdin/stdout to the agent's Unix socket.

    laptop ──ssh──> sshd ──> bridge (this) ──Unix socket──> agent (detached, one per
                                                             user + executor options)

The socket lives in a directory only its owner can enter (0700, checked, never
trusted when another user owns it); the agent checks each peer's uid with
SO_PEERCRED. Nothing listens on TCP. Bridges take a lock while they connect or start
the agent, and the agent takes the same lock before it decides to exit, so a bridge
never connects to an agent that is about to leave.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import socket
import stat
import subprocess
import sys
import threading

_START_WAIT_S = 60.0
_CHUNK = 1 << 20
SERVE = (
    "import sys; sys.path[:1] == [''] and sys.path.pop(0); "
    "from executorlib.remote.agent import main; main(sys.argv[1:])"
)


def private_directory() -> str:
    """``$XDG_RUNTIME_DIR/executorlib`` or ``/tmp/executorlib-<uid>``: created 0700, and
    refused when it is not a directory of ours that only we can enter."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = os.path.join(base, "executorlib") if base else f"/tmp/executorlib-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(
            f"{path} is not a private directory of uid {os.getuid()} (owner uid {info.st_uid}, "
            f"mode {stat.filemode(info.st_mode)}); another user may have planted it: remove it, "
            "or set XDG_RUNTIME_DIR to a private directory"
        )
    return path


def lock(path: str) -> int:
    """An exclusive flock on ``path`` (created 0600); release with ``os.close``."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    return descriptor


def connect_or_start(name: str, idle_timeout: str) -> socket.socket:
    """A connection to agent ``name``, starting the agent when none answers."""
    directory = private_directory()
    path = os.path.join(directory, name + ".sock")
    held = lock(os.path.join(directory, name + ".lock"))
    try:
        try:
            return _connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            _start_agent(directory, name, idle_timeout)
            return _connect(path)
    finally:
        os.close(held)


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


def _start_agent(directory: str, name: str, idle_timeout: str) -> None:
    """Start the agent detached (own session, no terminal) and wait until it listens."""
    path = os.path.join(directory, name + ".sock")
    if os.path.exists(path):
        os.unlink(path)  # left by an agent that was killed
    log_path = os.path.join(directory, name + ".log")
    ready_r, ready_w = os.pipe()
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    try:
        subprocess.Popen(
            [sys.executable, "-c", SERVE, path, str(ready_w), idle_timeout],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(ready_w,),
            start_new_session=True, cwd=os.path.expanduser("~"),
        )
    finally:
        os.close(ready_w)
        os.close(log)
    try:
        ready, _, _ = select.select([ready_r], [], [], _START_WAIT_S)
        if not ready or not os.read(ready_r, 1):
            raise RuntimeError(f"the executorlib agent did not start; its log {log_path} ends:\n"
                               + _tail(log_path))
    finally:
        os.close(ready_r)


def _tail(path: str) -> str:
    with open(path, "rb") as file:
        return file.read()[-2000:].decode(errors="replace")


def relay(sock: socket.socket) -> None:
    """Copy stdin -> socket and socket -> stdout until the agent closes the connection."""
    upward = threading.Thread(target=_stdin_to_socket, args=(sock,), daemon=True)
    upward.start()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    while True:
        try:
            got = sock.recv_into(buffer)
        except OSError:
            return
        if not got:
            return
        try:
            _write_all(1, view[:got])
        except OSError:  # ssh's channel is gone: the laptop reconnects if it wants
            return


def _stdin_to_socket(sock: socket.socket) -> None:
    try:
        while data := os.read(0, _CHUNK):
            sock.sendall(data)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)  # the laptop is gone: the agent ends this session


def _write_all(descriptor: int, data: memoryview) -> None:
    while data:
        written = os.write(descriptor, data)
        data = data[written:]


def main(argv: list[str]) -> None:
    """``bridge NAME IDLE_TIMEOUT``: entry point run by the ssh bootstrap."""
    mode, name, idle_timeout = argv[0], argv[1], argv[2]
    if mode != "bridge" or not name.isalnum():
        sys.stderr.write(f"executorlib bridge: bad agent name {name!r}\n")
        sys.exit(4)
    try:
        sock = connect_or_start(name, idle_timeout)
    except (OSError, RuntimeError) as error:
        sys.stderr.write(f"executorlib bridge on {socket.gethostname()}: {error}\n")
        sys.exit(4)
    try:
        relay(sock)
    finally:
        sock.close()
