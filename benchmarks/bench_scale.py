"""Many calls at once beside the standard library's ProcessPoolExecutor, same run.

    python benchmarks/bench_scale.py [--quick] [--submit-only]

Rows (``--quick``: 10,000 calls instead of 100,000; ``--submit-only``: the submit rows
alone, e.g. to compare two versions of the code in alternating runs via PYTHONPATH):

- submitting 100,000 independent calls while the workers are held busy (so every
  call is pending): time per ``submit`` in the caller's thread, and memory per pending
  call (``tracemalloc``: every Python allocation of every thread; and the process's
  RSS growth). The floor: creating the same number of bare ``Future`` objects.
- a 100,000-call DAG, every 10th call taking the previous call's future as an
  argument, 2 block workers: time to the last result, and Python memory before, at
  its peak, and after the futures are dropped (a leak shows as "after" above
  "before"). The standard library has no dependencies: it runs the same number of
  plain calls.
- block throughput with 64 workers on this machine's cores beside 2 workers (target:
  64 keep 80 % of the throughput of 2), and the same for the standard library.

Memory is measured in a second pass of the same scenario with ``tracemalloc`` on (it
slows Python down); times come from the pass without it.
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
import time
import tracemalloc
from concurrent.futures import Future, ProcessPoolExecutor

import psutil
from bench_local import noop, print_table, throughput

from executorlib import Executor


def add(a, b):
    return a + b


def gate(path: str) -> None:
    """Block the worker until the benchmark opens the FIFO ``path`` for writing."""
    with open(path):
        pass


def rss() -> int:
    return psutil.Process().memory_info().rss


class Held:
    """A lone worker held busy (it runs ``gate``) until ``release()``."""

    def __init__(self, exe) -> None:
        self.path = os.path.join(tempfile.mkdtemp(), "gate")
        os.mkfifo(self.path)
        self.gate = exe.submit(gate, self.path)

    def release(self) -> None:
        with open(self.path, "w"):  # returns once the gate opened it for reading
            pass
        self.gate.result()
        os.unlink(self.path)
        os.rmdir(os.path.dirname(self.path))


def submit_pending(make, calls: int, traced: bool) -> tuple[float, float, float]:
    """(µs per submit, bytes per pending call by tracemalloc or RSS, bytes left after)."""
    with make() as exe:
        list(exe.map(noop, range(200)))  # workers up, functions cached
        held = Held(exe)
        gc.collect()
        if traced:
            tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0] if traced else rss()
        start = time.perf_counter()
        futures = [exe.submit(noop, i) for i in range(calls)]
        seconds = time.perf_counter() - start
        during = tracemalloc.get_traced_memory()[0] if traced else rss()
        held.release()
        for future in futures:
            future.result()
        del futures, future
        gc.collect()
        after = tracemalloc.get_traced_memory()[0] if traced else rss()
        tracemalloc.stop()
    return seconds / calls * 1e6, (during - before) / calls, after - before


def future_floor(calls: int) -> tuple[float, float]:
    """µs and traced bytes per bare ``Future`` (what any executor hands back)."""
    start = time.perf_counter()
    futures = [Future() for _ in range(calls)]
    seconds = time.perf_counter() - start
    del futures
    tracemalloc.start()
    futures = [Future() for _ in range(calls)]
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del futures
    return seconds / calls * 1e6, size / calls


def dag(exe, calls: int, with_dependencies: bool) -> None:
    """``calls`` calls; every 10th takes the previous one's future (if allowed)."""
    futures: list[Future] = []
    for i in range(calls):
        if with_dependencies and i % 10 == 9:
            futures.append(exe.submit(add, futures[-1], 1))
        else:
            futures.append(exe.submit(noop, i))
    assert all(future.result() == i for i, future in enumerate(futures))


def dag_run(make, calls: int, deps: bool, traced: bool) -> tuple[float, float, float, float]:
    """(seconds, memory before, peak, after) of a DAG on a fresh executor; memory by
    tracemalloc (else RSS, with its peak unknown: NaN)."""
    with make() as exe:
        list(exe.map(noop, range(200)))
        gc.collect()
        if traced:
            tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0] if traced else rss()
        start = time.perf_counter()
        dag(exe, calls, deps)
        seconds = time.perf_counter() - start
        gc.collect()
        if traced:
            after, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        else:
            after, peak = rss(), float("nan")
    return seconds, before, peak, after


def ready_pool(workers: int) -> Executor:
    """A block-allocation executor whose ``workers`` workers have all connected."""
    exe = Executor(max_workers=workers, block_allocation=True)
    deadline = time.monotonic() + 300
    while len(exe._scheduler._ready) < workers and time.monotonic() < deadline:
        time.sleep(0.05)  # a benchmark may poll; the library never does
    return exe


def pool_throughput(make, workers: int, calls: int) -> float:
    with make(workers) as exe:
        return throughput(exe, calls)


def mb(value: float) -> str:
    return f"{value / 1e6:,.1f}"


def main() -> None:
    quick = "--quick" in sys.argv
    calls, pool_calls = (10_000, 2_000) if quick else (100_000, 10_000)
    n = f"{calls:,}"
    rows: list[tuple[str, str, str, str]] = []

    def ours():
        return Executor(max_workers=1, block_allocation=True)

    def stdlib():
        return ProcessPoolExecutor(1)

    floor_us, floor_bytes = future_floor(calls)
    us, rss_bytes, _ = submit_pending(ours, calls, traced=False)
    pool_us, pool_rss, _ = submit_pending(stdlib, calls, traced=False)
    rows.append((f"submit {n} independent calls, caller's side (us/call)",
                 f"{us:.1f}", f"{pool_us:.1f}", f"floor: Future() {floor_us:.1f}"))
    _, traced_bytes, left = submit_pending(ours, calls, traced=True)
    _, pool_traced, pool_left = submit_pending(stdlib, calls, traced=True)
    rows.append(("  memory per pending call, tracemalloc (bytes)",
                 f"{traced_bytes:,.0f}", f"{pool_traced:,.0f}", f"floor: Future() {floor_bytes:,.0f}"))
    rows.append(("  memory per pending call, RSS growth (bytes)",
                 f"{rss_bytes:,.0f}", f"{pool_rss:,.0f}", ""))
    rows.append(("  left after all finished, tracemalloc (MB)", mb(left), mb(pool_left), "0"))
    if "--submit-only" in sys.argv:
        print(f"load average: {os.getloadavg()[0]:.2f}")
        print_table(rows)
        return

    def two():
        return Executor(max_workers=2, block_allocation=True)

    seconds, before, peak, after = dag_run(two, calls, True, traced=False)
    pool_seconds, pool_before, _, pool_after = dag_run(lambda: ProcessPoolExecutor(2), calls, False, False)
    rows.append((f"DAG of {n} calls, a dependency every 10th, 2 workers (s)",
                 f"{seconds:.1f}", f"{pool_seconds:.1f}", "pool: no dependencies"))
    rows.append(("  per call (us)", f"{seconds / calls * 1e6:.0f}", f"{pool_seconds / calls * 1e6:.0f}", ""))
    rows.append(("  RSS before -> after (MB)", f"{mb(before)} -> {mb(after)}",
                 f"{mb(pool_before)} -> {mb(pool_after)}", ""))
    _, before, peak, after = dag_run(two, calls, True, traced=True)
    _, pool_before, pool_peak, pool_after = dag_run(lambda: ProcessPoolExecutor(2), calls, False, True)
    rows.append(("  tracemalloc before / peak / after (MB)", f"{mb(before)} / {mb(peak)} / {mb(after)}",
                 f"{mb(pool_before)} / {mb(pool_peak)} / {mb(pool_after)}", "after = before: no leak"))

    cores = len(os.sched_getaffinity(0))
    many = {w: pool_throughput(lambda k: ready_pool(k), w, pool_calls) for w in (2, 64)}
    pool_many = {w: pool_throughput(ProcessPoolExecutor, w, pool_calls) for w in (2, 64)}
    for w in (2, 64):
        rows.append((f"block throughput, {w} workers on {cores} cores (tasks/s)",
                     f"{many[w]:,.0f}", f"{pool_many[w]:,.0f}", ""))
    rows.append(("  64 workers / 2 workers", f"{many[64] / many[2]:.0%}",
                 f"{pool_many[64] / pool_many[2]:.0%}", "target >= 80%"))
    print(f"load average: {os.getloadavg()[0]:.2f}")
    print_table(rows)


if __name__ == "__main__":
    main()
