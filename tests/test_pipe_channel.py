"""Local serial workers talk over a socket pair they inherit (executorlib/interactive/pipe.py):
no port is opened, nothing a call starts holds the channel, messages larger than the
socket's buffer arrive whole, and a worker that closes its end is stopped, not waited on."""

from __future__ import annotations

import subprocess

import psutil
import pytest

from executorlib import Executor


def double(value):
    return value * 2


def echo(value):
    return value


def descriptors_of_a_child() -> list[str]:
    """What a process started by the call holds open (besides stdio and its listing)."""
    out = subprocess.run(["ls", "-l", "/proc/self/fd"], capture_output=True, text=True, check=True).stdout
    return [line.split(" -> ")[-1] for line in out.splitlines() if " -> " in line]


def _listening_ports() -> list:
    return [c for c in psutil.Process().net_connections("tcp") if c.status == "LISTEN"]


@pytest.mark.parametrize("block", [True, False])
def test_serial_local_workers_open_no_port(block):
    options = {"block_allocation": True, "max_workers": 2} if block else {"max_cores": 2}
    with Executor(**options) as exe:
        futures = [exe.submit(double, i) for i in range(6)]
        assert [f.result(timeout=60) for f in futures] == [0, 2, 4, 6, 8, 10]
        assert exe._scheduler._socket.socket is None  # no ROUTER was ever made
        assert _listening_ports() == []


def test_mpi_workers_use_a_loopback_router_only():
    with Executor(block_allocation=True, max_workers=1, resource_dict={"cores": 2}) as exe:
        assert exe.submit(double, 4).result(timeout=120) == [8, 8]
        assert exe._scheduler._socket.address.startswith("tcp://127.0.0.1:")
        listening = _listening_ports()
        assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening)


@pytest.mark.parametrize("block", [True, False])
def test_nothing_a_call_starts_holds_the_channel(block):
    options = {"block_allocation": True, "max_workers": 1} if block else {"max_cores": 1}
    with Executor(**options) as exe:
        held = exe.submit(descriptors_of_a_child).result(timeout=60)
    assert not [target for target in held if target.startswith("socket:")], held


def test_messages_larger_than_the_socket_buffer_arrive_whole_while_the_worker_is_busy():
    payloads = [bytes([i]) * 900_000 for i in range(24)]  # below shm's 1 MiB: through the socket
    with Executor(block_allocation=True, max_workers=1) as exe:
        futures = [exe.submit(echo, payload) for payload in payloads]
        assert [f.result(timeout=120) for f in futures] == payloads


def test_empty_frames_travel():
    np = pytest.importorskip("numpy")
    with Executor(block_allocation=True, max_workers=1) as exe:
        assert exe.submit(echo, b"").result(timeout=60) == b""
        assert exe.submit(echo, np.empty(0)).result(timeout=60).shape == (0,)
