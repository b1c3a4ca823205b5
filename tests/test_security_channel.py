"""The channel between executor and workers on a shared machine (issue 9, items 4 and 5).

Strangers are real: a second Unix user speaking raw ZMTP with the standard library
(its Python has no pyzmq), a CurveZMQ client holding a worker's stolen launch key, a
packet capture on loopback, and a fake executor squatting on an address. Every wait is
on an event (a monitor event, a line from the stranger, a closed socket) with a
generous bound.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import socket
import struct
import subprocess
import sys
import threading
import uuid

import psutil
import pytest
import zmq
from behaviour import add, environment, pid
from zmq.utils.monitor import recv_monitor_message

from executorlib import Executor
from executorlib.interactive import auth

KEY_VARIABLES = ("EXECUTORLIB_KEYS", "EXECUTORLIB_SECRET")  # today's name, and main's
STRANGER_PYTHON = "/usr/bin/python3"  # the system's: the second user cannot read ours

# A ZMTP 3.0 peer in plain Python: greeting for MECHANISM, then (for NULL) READY.
ZMTP = r'''
import socket, struct, sys
def greeting(mechanism):
    return b"\xff" + b"\0" * 8 + b"\x7f\x03\x00" + mechanism.ljust(20, b"\0") + b"\0" * 32
def frame(body, flags=0):
    return bytes([flags]) + bytes([len(body)]) + body if len(body) < 256 else \
        bytes([flags | 2]) + struct.pack(">Q", len(body)) + body
def ready():
    return frame(b"\x05READY\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER", 4)
def connect(port):
    """Connect and exchange greetings; the server's mechanism (it speaks first)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.sendall(greeting(b"")[:11])  # signature and major version: the server answers
    server = b""
    while len(server) < 64 and (chunk := s.recv(64 - len(server))):
        server += chunk
    return s, server[12:32].rstrip(b"\0")
'''

NULL_STRANGER = ZMTP + r'''
s, mechanism = connect(int(sys.argv[1]))
evil = bytes.fromhex(sys.argv[2])
got = b""
try:  # as if the server spoke NULL
    s.sendall(greeting(b"NULL")[11:] + ready())
    for kind in (b"H", b"R", b"F", b"D"):  # as a hello, result, failure, ready
        s.sendall(frame(kind, 1) + frame(b"0", 1) + frame(b"host", 1) + frame(b"1", 1) + frame(evil))
    while b"READY" not in got and (chunk := s.recv(65536)):
        got += chunk
except OSError:  # reset by the executor
    pass
print("server-mechanism", mechanism.decode(), "handshake", "READY" if b"READY" in got else "closed")
'''

IDLE_STRANGER = ZMTP + r'''
import resource, select, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
port, count = int(sys.argv[1]), int(sys.argv[2])
sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
for s in sockets[::2]:  # half say nothing, half complete a NULL handshake if they can
    s.sendall(greeting(b"NULL") + ready())
print("open", len(sockets), flush=True)
sys.stdin.readline()  # the executor served calls meanwhile
start, open_ = time.monotonic(), set(sockets)
poller = select.poll()
for s in sockets:
    poller.register(s, select.POLLIN | select.POLLHUP)
by_fd = {s.fileno(): s for s in sockets}
while open_ and time.monotonic() - start < 60:
    for fd, _ in poller.poll(1000):
        s = by_fd[fd]
        try:
            gone = not s.recv(4096)  # the server's greeting, then its close
        except ConnectionResetError:
            gone = True
        if gone:
            open_.discard(s)
            poller.unregister(s)
print("closed-by-executor", count - len(open_), flush=True)
'''

BIG_FRAME_STRANGER = ZMTP + r'''
s, mechanism = connect(int(sys.argv[1]))
sent, closed, block = 0, False, b"\0" * (1 << 20)
try:  # the server's own mechanism, then a 2 GiB command frame, 1 GiB of it sent
    s.sendall(greeting(mechanism)[11:] + b"\x06" + struct.pack(">Q", 2 << 30))
    while sent < (1 << 30):
        s.sendall(block)
        sent += len(block)
except OSError:
    closed = True
print("mechanism", mechanism.decode(), "sent", sent, "closed", closed, flush=True)
sys.stdin.readline()
'''


def marker_echo(value):
    return value


def _popen_as(user, code: str, *args: str) -> subprocess.Popen:
    prefix = ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups", "--"]
    env = {"PATH": "/usr/bin:/bin", "HOME": user.home}
    return subprocess.Popen(
        [*prefix, STRANGER_PYTHON, "-c", code, *args], env=env, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def _port(exe) -> int:
    return int(exe._scheduler._socket.address.rsplit(":", 1)[1])


# Workers that use the ROUTER: MPI ranks under mpiexec (a local serial worker talks over a
# socket pair and opens no port: tests/test_pipe_channel.py). Each call returns a list,
# one value per rank.
ROUTED = {"max_cores": 2, "resource_dict": {"cores": 2}}


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# ------------------------------------------------------------------ item 4: keys
def test_launch_keys_leave_no_trace_in_argv_or_any_rank_environment():
    with Executor(max_cores=2, block_allocation=True, max_workers=1,
                  resource_dict={"cores": 2}) as exe:
        ranks = exe.submit(environment, *KEY_VARIABLES).result(timeout=120)
        worker = exe.submit(pid).result(timeout=60)[0]
        cmdline = " ".join(psutil.Process(worker).cmdline())
    assert ranks == [dict.fromkeys(KEY_VARIABLES)] * 2  # stripped on rank 0 and rank 1
    assert "EXECUTORLIB_KEYS" not in os.environ
    assert all(name not in cmdline for name in KEY_VARIABLES)


def _stolen_keys(worker_pid: int) -> auth.LaunchKeys:
    """The launch keys from a worker's original environment block (readable by the
    same user or root: unsetenv does not erase it)."""
    with open(f"/proc/{worker_pid}/environ", "rb") as file:
        entries = dict(e.split(b"=", 1) for e in file.read().split(b"\0") if b"=" in e)
    value = entries[b"EXECUTORLIB_KEYS"]
    return auth.LaunchKeys(value[:40], value[40:])


def _curve_stranger(address: str, keys: auth.LaunchKeys) -> tuple[zmq.Context, zmq.Socket, int]:
    """Connect with ``keys``, send a HELLO; the first monitor event that settles it."""
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    keys.configure(dealer)
    monitor = dealer.get_monitor_socket()
    dealer.connect(address)
    dealer.send_multipart([b"H", b"0", b"host", b"1", b""])
    settled = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | \
        zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    assert monitor.poll(30_000), "the handshake never settled"
    event = recv_monitor_message(monitor)["event"]
    while not event & settled:
        assert monitor.poll(30_000), "the handshake never settled"
        event = recv_monitor_message(monitor)["event"]
    monitor.close(0)
    return context, dealer, event


@pytest.mark.parametrize("whose", ["stolen from the connected worker", "a stranger's own"])
def test_a_launch_key_admits_one_connection_only(whose):
    """A replayed or second HELLO, and any key not issued for a pending launch, is
    refused in the handshake; no call's arguments ever reach that connection."""
    with Executor(block_allocation=True, max_workers=1, **ROUTED) as exe:
        worker = exe.submit(pid).result(timeout=120)[0]  # rank 0
        keys = _stolen_keys(worker)
        if whose == "a stranger's own":
            keys = auth.LaunchKeys(keys.server_public, zmq.curve_keypair()[1])
        context, dealer, event = _curve_stranger(exe._scheduler._socket.address, keys)
        assert event == zmq.EVENT_HANDSHAKE_FAILED_AUTH
        assert [exe.submit(add, i, 1).result(timeout=60) for i in range(3)] == [[1, 1], [2, 2], [3, 3]]
        assert not dealer.poll(0)
        context.destroy(0)


def test_a_stranger_speaking_plain_zmtp_is_dropped_and_nothing_is_unpickled(other_user, tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Evil(str(marker))).hex()
    with Executor(block_allocation=True, max_workers=1, **ROUTED) as exe:
        assert exe.submit(add, 1, 1).result(timeout=120) == [2, 2]
        done = other_user.run([STRANGER_PYTHON, "-c", NULL_STRANGER, str(_port(exe)), evil])
        assert done.returncode == 0, done.stderr
        assert exe.submit(add, 2, 2).result(timeout=60) == [4, 4]
    assert done.stdout.split() == ["server-mechanism", "CURVE", "handshake", "closed"]
    assert not marker.exists()


@pytest.mark.parametrize("impostor", ["NULL", "CURVE with its own key"])
def test_worker_talks_to_no_impostor_executor(impostor, tmp_path):
    """Someone squatting on the executor's address cannot make a worker run anything."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    if impostor != "NULL":
        router.curve_server, router.curve_secretkey = True, zmq.curve_keypair()[1]
    port = router.bind_to_random_port("tcp://127.0.0.1")
    keys = auth.LaunchKeys(zmq.curve_keypair()[0], zmq.curve_keypair()[1])  # the real executor's
    env = {**os.environ, auth.KEYS_ENV: keys.to_env(), "EXECUTORLIB_CONNECT_TIMEOUT": "30"}
    argv = [sys.executable, "-m", "executorlib.backend.interactive_serial", f"tcp://127.0.0.1:{port}", "0"]
    worker = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    marker = tmp_path / "pwned"
    if router.poll(5_000):  # whatever arrives, answer as an executor would
        routing_id, *_ = router.recv_multipart()
        router.send_multipart([routing_id, b"W", b""])
        router.send_multipart([routing_id, b"C", pickle.dumps(_Evil(str(marker)))])
    _, stderr = worker.communicate(timeout=60)
    context.destroy(0)
    assert worker.returncode != 0 and "executorlib worker 0" in stderr
    if impostor != "NULL":
        assert "the CurveZMQ handshake with" in stderr and "is not the executor" in stderr
    assert not marker.exists()


def _sniff(stop: threading.Event, seen: list[bytes], interface: str = "lo") -> threading.Thread:
    raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
    raw.bind((interface, 0))
    raw.settimeout(0.2)

    def capture() -> None:
        while not stop.is_set():
            try:
                seen.append(raw.recv(1 << 16))
            except TimeoutError:
                continue
        raw.close()

    thread = threading.Thread(target=capture, daemon=True)
    thread.start()
    return thread


def _payload_on_port(packets: list[bytes], port: int) -> bytes:
    """The TCP payload of captured IPv4 packets to or from ``port``."""
    payload = []
    for packet in packets:
        ip = packet[14:]
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 6:
            continue
        tcp = ip[(ip[0] & 15) * 4:]
        if port in struct.unpack(">HH", tcp[:4]):
            payload.append(tcp[(tcp[12] >> 4) * 4:])
    return b"".join(payload)


@pytest.mark.parametrize("encrypted", [True, False], ids=["curve", "plaintext-benchmark-mode"])
def test_sniffed_loopback_traffic_holds_no_argument(encrypted, monkeypatch):
    """A capture of every packet on loopback sees the executor's traffic, but neither the
    arguments nor the results in it; the benchmarks' plaintext mode shows the capture
    would find them."""
    if os.geteuid() != 0:
        pytest.skip("a packet capture needs root (CAP_NET_RAW)")
    monkeypatch.setattr(auth, "_PLAINTEXT_FOR_BENCHMARKS", not encrypted)
    secret = f"marker-{uuid.uuid4().hex}"
    stop, packets = threading.Event(), []
    sniffer = _sniff(stop, packets)
    try:
        with Executor(block_allocation=True, max_workers=1, **ROUTED) as exe:
            assert exe.submit(marker_echo, secret).result(timeout=120) == [secret, secret]
            port = _port(exe)
    finally:
        stop.set()
        sniffer.join(timeout=30)
    payload = _payload_on_port(packets, port)
    assert len(payload) > 200  # the capture saw the handshake and the call
    assert (secret.encode() in payload) is not encrypted


ACROSS_NODES = r'''
import json, socket, sys
from executorlib import Executor
from executorlib.interactive import auth
auth._PLAINTEXT_FOR_BENCHMARKS = sys.argv[2] == "plaintext"
def echo(value):
    return value, socket.gethostname()
with Executor(backend="slurm_allocation") as exe:
    pinned = {"slurm_cmd_args": ["--nodelist=n2"]}
    value, host = exe.submit(echo, sys.argv[1], resource_dict=pinned).result(timeout=90)
    port = int(exe._scheduler._socket.address.rsplit(":", 1)[1])
report = {"executor": socket.gethostname(), "worker": host, "port": port, "ok": value == sys.argv[1]}
print(json.dumps(report))
'''


@pytest.mark.timeout(200)
@pytest.mark.parametrize("mode", ["curve", "plaintext"])
def test_traffic_between_nodes_holds_no_argument(mode, tmp_path):
    """An executor on n1 and a worker on n2 (srun step, test cluster): a capture on
    n2's link sees their traffic, but not the argument and result in it."""
    if os.geteuid() != 0 or not os.path.exists("/sys/class/net/veth-n2"):
        pytest.skip("needs root and the test cluster's node n2 (scripts/slurm-test-cluster start --nodes 2)")
    secret = f"marker-{uuid.uuid4().hex}"
    (tmp_path / "across.py").write_text(ACROSS_NODES)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    command = ["sbatch", "--wait", "--quiet", "--partition=multi", "--nodes=2", "--ntasks=2",
               f"--output={tmp_path / 'out'}", "--job-name=executorlib-test",
               f"--wrap={sys.executable} {tmp_path / 'across.py'} {secret} {mode}"]
    stop, packets = threading.Event(), []
    sniffer = _sniff(stop, packets, "veth-n2")
    try:
        subprocess.run(command, env=env, cwd=tmp_path, timeout=180, check=False)
    finally:
        stop.set()
        sniffer.join(timeout=30)
    output = (tmp_path / "out").read_text()
    report = json.loads([line for line in output.splitlines() if line.startswith("{")][-1])
    assert (report["executor"], report["worker"], report["ok"]) == ("n1", "n2", True), output
    payload = _payload_on_port(packets, report["port"])
    assert len(payload) > 200  # the capture saw the handshake and the call
    assert (secret.encode() in payload) is (mode == "plaintext")


# -------------------------------------------------- item 5: unauthenticated peers
def test_idle_connections_of_a_stranger_are_dropped_and_the_executor_serves_on(other_user):
    """1,500 idle connections from another user (half silent, half after a NULL
    greeting), above the usual soft limit of 1,024 open files: the executor keeps
    starting workers, and drops every one of them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    try:
        with Executor(**ROUTED) as exe:  # one fresh mpiexec (new descriptors) per call
            assert exe.submit(add, 0, 1).result(timeout=120) == [1, 1]
            fds = psutil.Process().num_fds()
            stranger = _popen_as(other_user, IDLE_STRANGER, str(_port(exe)), "1500")
            assert stranger.stdout.readline().split() == ["open", "1500"], stranger.stderr.read()
            assert [exe.submit(add, i, 1).result(timeout=120) for i in range(3)] == [[1, 1], [2, 2], [3, 3]]
            out, err = stranger.communicate("go\n", timeout=90)
            assert out.split() == ["closed-by-executor", "1500"], err
            assert psutil.Process().num_fds() <= fds + 20
            assert exe.submit(add, 5, 1).result(timeout=120) == [6, 6]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_strangers_huge_frame_is_refused_before_it_is_buffered(other_user):
    with Executor(block_allocation=True, max_workers=1, **ROUTED) as exe:
        assert exe.submit(add, 1, 1).result(timeout=120) == [2, 2]
        before = psutil.Process().memory_info().rss
        stranger = _popen_as(other_user, BIG_FRAME_STRANGER, str(_port(exe)))
        try:
            report = stranger.stdout.readline().split()
            grown = psutil.Process().memory_info().rss - before  # the stranger holds on
            assert exe.submit(add, 2, 2).result(timeout=60) == [4, 4]
        finally:
            stranger.communicate("done\n", timeout=60)
    assert report[:2] == ["mechanism", "CURVE"] and report[-2:] == ["closed", "True"], report
    assert grown < 500e6
