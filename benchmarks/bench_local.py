"""Local-backend speed beside the standard library's ProcessPoolExecutor, same run.

    python benchmarks/bench_local.py [--quick]

Rows: executor start-up in a fresh interpreter (beside the stdlib pool's spawn, forkserver
and fork, and the floor ``python -c "import zmq, cloudpickle"``: startup_rows.py),
block-allocation throughput (2 workers, no-op calls), submit->result round trip (beside
its floors: a Python echo over a pipe, the standard library's wire and the cheapest
here, and over CurveZMQ and plaintext ZeroMQ), one fresh worker per call (beside ``python -c pass``), a
dependency chain, and an echo of a 200 MB array (beside a numpy copy and a pickle round
trip). ``--startup-only``: only the start-up and fresh-worker rows.

Transports, in alternating rounds of the same run: local serial workers talk over a
socket pair they inherit (the default), and, through benchmark-only switches, over the
CurveZMQ ROUTER that every other worker uses (MPI ranks, srun steps, Flux and pilot
jobs) and over that ROUTER in plaintext: block throughput, CPU per call, round trip, and
the 200 MB echo through /dev/shm (same machine) and without it (``EXECUTORLIB_NO_SHM=1``,
the path of workers on other nodes).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import psutil
import zmq
from startup_rows import fresh_worker_rows, startup_rows

from executorlib import Executor
from executorlib.interactive import auth
from executorlib.interactive.spawner import LocalSpawner


def noop(x=None):
    return x


def add(a, b):
    return a + b


def timed(fn, repeat: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeat`` runs."""
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def throughput(exe, calls: int) -> float:
    list(exe.map(noop, range(200)))  # warm up
    start = time.perf_counter()
    futures = [exe.submit(noop, i) for i in range(calls)]
    for future in futures:
        future.result()
    return calls / (time.perf_counter() - start)


def round_trip_us(exe, calls: int) -> float:
    for _ in range(50):
        exe.submit(noop).result()
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        exe.submit(noop).result()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def _echo(address: str, server_key: bytes | None) -> None:
    """A DEALER that sends back what it receives: the executor's wire without executorlib."""
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    if server_key is not None:
        dealer.curve_serverkey = server_key
        dealer.curve_publickey, dealer.curve_secretkey = zmq.curve_keypair()
    dealer.connect(address)
    dealer.send(b"H")
    while (message := dealer.recv_multipart()) != [b"S"]:
        dealer.send_multipart(message)
    dealer.close(linger=0)
    context.term()


def zmq_echo_us(encrypted: bool, calls: int) -> float:
    """Median round trip of a 100-byte message to a Python echo over loopback TCP
    (CurveZMQ or plaintext): the floor of a call's trip through ZeroMQ's I/O threads."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    server_key = None
    if encrypted:
        router.curve_server = True
        server_key, router.curve_secretkey = zmq.curve_keypair()
        router.curve_publickey = server_key
    address = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    echo = multiprocessing.get_context("spawn").Process(target=_echo, args=(address, server_key))
    echo.start()
    peer, _ = router.recv_multipart()

    def one() -> None:
        router.send_multipart([peer, b"C" + bytes(100)])
        router.recv_multipart()

    samples = [timed(one) for _ in range(calls + 50)][50:]
    router.send_multipart([peer, b"S"])
    echo.join()
    router.close(linger=0)
    context.term()
    return statistics.median(samples) * 1e6


def _pipe_echo(connection) -> None:
    while (message := connection.recv_bytes()) != b"S":
        connection.send_bytes(message)


def pipe_echo_us(calls: int) -> float:
    """The same over a ``multiprocessing.Pipe`` (the standard library's wire)."""
    here, there = multiprocessing.Pipe()
    echo = multiprocessing.get_context("spawn").Process(target=_pipe_echo, args=(there,))
    echo.start()

    def one() -> None:
        here.send_bytes(b"C" + bytes(100))
        here.recv_bytes()

    samples = [timed(one) for _ in range(calls + 50)][50:]
    here.send_bytes(b"S")
    echo.join()
    return statistics.median(samples) * 1e6


def per_call_ms(exe, calls: int) -> float:
    exe.submit(noop).result()
    start = time.perf_counter()
    for _ in range(calls):
        exe.submit(noop).result()
    return (time.perf_counter() - start) / calls * 1e3


def chain_ms_per_link(exe, links: int, use_futures: bool) -> float:
    exe.submit(noop).result()
    start = time.perf_counter()
    value = 0
    for _ in range(links):
        value = exe.submit(add, value, 1)
        if not use_futures:  # the pool cannot take futures: wait for each link
            value = value.result()
    if use_futures:
        value = value.result()
    assert value == links
    return (time.perf_counter() - start) / links * 1e3


def cpu_us_per_call(exe, calls: int) -> float:
    """CPU time of this process and its children (workers) per no-op call: unlike
    throughput, this hardly moves when other jobs share the machine's cores."""
    list(exe.map(noop, range(200)))
    processes = [psutil.Process(), *psutil.Process().children(recursive=True)]
    before = sum(sum(p.cpu_times()[:2]) for p in processes)
    for future in [exe.submit(noop, i) for i in range(calls)]:
        future.result()
    return (sum(sum(p.cpu_times()[:2]) for p in processes) - before) / calls * 1e6


def echo_gbps(exe, array: np.ndarray) -> float:
    exe.submit(noop, array[:10]).result()
    seconds = timed(lambda: exe.submit(noop, array).result(), 5)
    return array.nbytes / seconds / 1e9


TRANSPORTS = ("socket pair", "CurveZMQ", "plaintext ZeroMQ")


@contextlib.contextmanager
def channel(transport: str, shm: bool = True):
    """Executors made inside give their local serial workers ``transport``: the socket
    pair they get by default, or (benchmark switches, never set elsewhere) the ROUTER
    every other worker uses, encrypted or not; and /dev/shm for large buffers, or not."""
    auth._PLAINTEXT_FOR_BENCHMARKS = transport == "plaintext ZeroMQ"
    private = LocalSpawner.__dict__["private_channel"]  # the staticmethod itself
    if transport != "socket pair":
        LocalSpawner.private_channel = staticmethod(lambda resources: False)
    old = os.environ.get("EXECUTORLIB_NO_SHM")
    if not shm:
        os.environ["EXECUTORLIB_NO_SHM"] = "1"
    try:
        yield
    finally:
        auth._PLAINTEXT_FOR_BENCHMARKS = False
        LocalSpawner.private_channel = private
        os.environ.pop("EXECUTORLIB_NO_SHM", None)
        if old is not None:
            os.environ["EXECUTORLIB_NO_SHM"] = old


def transport_rows(calls: int, latency_calls: int, array: np.ndarray, rounds: int) -> list:
    """The same serial workers over each transport: medians of alternating rounds."""
    measures = {
        f"block throughput, 2 workers, {calls} calls (tasks/s)": (2, True, lambda e: throughput(e, calls)),
        "CPU per call in that run, executor + workers (us)": (2, True, lambda e: cpu_us_per_call(e, calls)),
        "submit->result round trip, median (us)": (1, True, lambda e: round_trip_us(e, latency_calls)),
        "echo of a 200 MB array via /dev/shm (GB/s)": (1, True, lambda e: echo_gbps(e, array)),
        "echo of a 200 MB array, no /dev/shm (GB/s)": (1, False, lambda e: echo_gbps(e, array)),
    }
    rows = []
    for name, (workers, shm, measure) in measures.items():
        samples: dict[str, list[float]] = {transport: [] for transport in TRANSPORTS}
        for _ in range(rounds):
            for transport in TRANSPORTS:
                with channel(transport, shm), Executor(max_workers=workers, block_allocation=True) as exe:
                    samples[transport].append(measure(exe))
        with ProcessPoolExecutor(workers) as pool:
            pool_value = measure(pool)
        pair, curve, plain = (statistics.median(samples[t]) for t in TRANSPORTS)
        digits = 2 if "GB/s" in name else 0
        rows.append((f"{name}: socket pair", f"{pair:,.{digits}f}", f"{pool_value:,.{digits}f}", ""))
        rows.append(("  same, over CurveZMQ (as MPI, srun, Flux workers)", f"{curve:,.{digits}f}", "",
                     f"socket pair / CurveZMQ: {pair / curve:.0%}"))
        rows.append(("  same, plaintext ZeroMQ (benchmark switch)", f"{plain:,.{digits}f}", "",
                     f"CurveZMQ / plaintext: {curve / plain:.0%}"))
    return rows


def main() -> None:
    quick = "--quick" in sys.argv
    calls, chain, latency_calls = (400, 60, 200) if quick else (2000, 300, 1000)
    array = np.random.default_rng(0).random(25_000_000)  # 200 MB
    rows: list[tuple[str, str, str, str]] = []

    def block(workers: int = 2):
        return Executor(max_workers=workers, block_allocation=True)

    rows += startup_rows(quick)
    if "--startup-only" in sys.argv:
        print_table([*rows, *fresh_worker_rows(quick, per_call_ms)])
        return
    with block() as exe, ProcessPoolExecutor(2) as pool:
        rows.append((f"block throughput, 2 workers, {calls} calls (tasks/s)",
                     f"{throughput(exe, calls):,.0f}", f"{throughput(pool, calls):,.0f}", ""))
    with block(1) as exe, ProcessPoolExecutor(1) as pool:
        rows.append(("submit->result round trip, median (us)",
                     f"{round_trip_us(exe, latency_calls):.0f}",
                     f"{round_trip_us(pool, latency_calls):.0f}", "dependencies enabled"))
    with Executor(max_workers=1, block_allocation=True, disable_dependencies=True) as exe:
        rows.append(("  same, disable_dependencies=True", f"{round_trip_us(exe, latency_calls):.0f}", "", ""))
    rows.append(("  floor: echo over CurveZMQ / plaintext ZeroMQ (us)", "", "",
                 f"{zmq_echo_us(True, latency_calls):.0f} / {zmq_echo_us(False, latency_calls):.0f}"))
    rows.append(("  floor: echo over multiprocessing.Pipe (us)", "", "",
                 f"{pipe_echo_us(latency_calls):.0f}"))
    rows += fresh_worker_rows(quick, per_call_ms)
    with block() as exe, ProcessPoolExecutor(2) as pool:
        rows.append((f"dependency chain, {chain} links (ms/link)",
                     f"{chain_ms_per_link(exe, chain, True):.3f}",
                     f"{chain_ms_per_link(pool, chain, False):.3f}", "pool: result() per link"))
    with block(1) as exe, ProcessPoolExecutor(1) as pool:
        rows.append(("echo of a 200 MB array (GB/s)",
                     f"{echo_gbps(exe, array):.2f}", f"{echo_gbps(pool, array):.2f}", ""))
    copy_s = timed(lambda: array.copy(), 5)
    pickle_s = timed(lambda: pickle.loads(pickle.dumps(array, protocol=5)), 3)
    rows.append(("  numpy copy / pickle round trip (GB/s)", "", "",
                 f"{array.nbytes / copy_s / 1e9:.2f} / {array.nbytes / pickle_s / 1e9:.2f}"))
    rows += transport_rows(calls, latency_calls, array, 3 if quick else 5)
    print_table(rows)


def print_table(rows: list[tuple[str, str, str, str]]) -> None:
    header = ("measure", "executorlib", "ProcessPool", "note / floor")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    line = " | ".join(f"{{:{'<' if i in (0, 3) else '>'}{w}}}" for i, w in enumerate(widths))
    print(line.format(*header))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(line.format(*row))


if __name__ == "__main__":
    main()
