"""HDF5 result cache: warm hit and miss overhead per call, beside their floors.

    python benchmarks/bench_cache.py [N] [--profile] [--in DIRECTORY]

Rows (milliseconds per call, wall clock and this process's CPU time; N distinct calls
of a trivial function):
  floor: os.open + read + close        a small file (the bytes of a cache file), no checks
  floor: h5py open + read one dataset  a small HDF5 file through h5py.File (locking off)
  FileCache hit, D files               key + trusted open + read + unpickle, no worker,
                                       with D files already in the cache directory
  FileCache miss, D files              key + failed open + write of the result file
    floor: create + write + rename     a new small file under its name, in that directory,
                                       in turns with the misses: the file system's share
  ProcessPoolExecutor(1), no cache     the stdlib, one long-lived worker
  executorlib no / cold / warm cache   block allocation, one worker; "miss overhead" is
                                       cold minus no cache, in the same run
D runs over 200, 2,000 and 20,000 files (made in the set-up, copies of a real cache
file under other keys): the rows must not grow with D (no listing of the directory).
``--profile`` prints cProfile's top costs of a hit and of a miss (at the largest D);
``--in`` puts the directories on another file system (default: the temporary directory).
"""

from __future__ import annotations

import cProfile
import os
import pstats
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

import h5py
import numpy as np

from executorlib import Executor
from executorlib.cache import FileCache
from executorlib.resources import Resources
from executorlib.task import Task

DIRECTORY_SIZES = (200, 2_000, 20_000)


def work(i: int) -> int:
    return i + 1


def per_call(run, n: int) -> tuple[float, float]:
    """Milliseconds per call of ``run(n)``, which makes ``n`` calls: wall clock, and CPU
    time of this process (all its threads; less disturbed by other load on the machine)."""
    start, cpu = time.perf_counter(), time.process_time()
    run(n)
    return (time.perf_counter() - start) / n * 1e3, (time.process_time() - cpu) / n * 1e3


def repeat(action, n: int) -> None:
    for _ in range(n):
        action()


def floors(n: int, directory: str) -> dict[str, tuple[float, float]]:
    plain, small = os.path.join(directory, "plain"), os.path.join(directory, "small.h5")
    with open(plain, "wb") as file:
        file.write(os.urandom(1500))
    with h5py.File(small, "w") as file:
        file["x"] = np.frombuffer(os.urandom(40), dtype=np.uint8)

    def read_plain() -> None:
        descriptor = os.open(plain, os.O_RDONLY)
        os.read(descriptor, 4096)
        os.close(descriptor)

    def read_h5() -> None:
        with h5py.File(small, "r", locking=False) as file:
            file["x"][()]

    return {"floor: os.open + read + close": per_call(lambda k: repeat(read_plain, k), n),
            "floor: h5py open + read one dataset": per_call(lambda k: repeat(read_h5, k), n)}


def floor_writer(directory: str) -> Callable[[], None]:
    """What every miss must do, in ``directory``: a new small file, complete when named.
    Measured per directory and in turns with the misses: on this machine's ext4, making
    a file costs 20 us in one directory and 1.5 ms in another (the block group it lands
    in), and other users' load changes it from one second to the next."""
    written = iter(range(10**9))

    def write_plain() -> None:
        temporary = os.path.join(directory, "floor.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(descriptor, b"x" * 1500)
        os.close(descriptor)
        os.replace(temporary, os.path.join(directory, f"floor{next(written)}"))

    return write_plain


def in_turns(actions: list[Callable[[], object]], n: int, turns: int = 10) -> list[tuple[float, float]]:
    """Per-call times of each action, each run ``n`` times in ``turns`` alternating
    slices, so that all of them see the same load."""
    totals = [(0.0, 0.0)] * len(actions)
    for _ in range(turns):
        for i, action in enumerate(actions):
            wall, cpu = per_call(lambda k, act=action: repeat(act, k), n // turns)
            totals[i] = (totals[i][0] + wall / turns, totals[i][1] + cpu / turns)
    return totals


def tasks(n: int, first: int) -> list[Task]:
    return [Task(work, (first + i,), {}, Resources()) for i in range(n)]


def fill(directory: str, size: int) -> None:
    """``size`` cache files in ``directory``: copies of one real entry under other names."""
    cache = FileCache(directory)
    (seed,) = tasks(1, -1)
    cache.load(seed)
    cache.store(seed, 0)
    source = next(os.path.join(directory, name) for name in os.listdir(directory))
    have = len(os.listdir(directory))
    for i in range(have, size):
        shutil.copyfile(source, os.path.join(directory, f"work_{i:032x}.h5"))


def cache_alone(n: int, directory: str, size: int) -> dict[str, tuple[float, float]]:
    fill(directory, size)
    cache = FileCache(directory)
    first = 10**6 * size
    pending = iter(tasks(n, first))

    def miss() -> None:
        task = next(pending)
        cache.load(task) or cache.store(task, 0)

    miss_times, floor_times = in_turns([miss, floor_writer(directory)], n)
    hits = tasks(n, first)
    hit = per_call(lambda k: [cache.load(t) for t in hits[:k]], n)
    assert all(t.future.result(timeout=0) == 0 for t in hits)
    return {f"FileCache hit, {size} files": hit, f"FileCache miss, {size} files": miss_times,
            f"  floor: create + write + rename there ({size})": floor_times}


def batch(exe, n: int) -> None:
    futures = [exe.submit(work, i) for i in range(n)]
    assert [f.result() for f in futures] == [i + 1 for i in range(n)]


def executor_rows(n: int, directory: str) -> dict[str, tuple[float, float]]:
    rows = {}
    with ProcessPoolExecutor(1) as pool:
        batch(pool, 50)
        rows["ProcessPoolExecutor(1), no cache"] = per_call(lambda k: batch(pool, k), n)
    with Executor(block_allocation=True, max_workers=1) as exe:
        batch(exe, 50)  # worker started and warm
        rows["executorlib, no cache"] = per_call(lambda k: batch(exe, k), n)
    with Executor(block_allocation=True, max_workers=1, cache_directory=directory) as exe:
        batch(exe, 50)
        rows["executorlib, cold cache"] = per_call(lambda k: batch(exe, k), n)
        rows["executorlib, miss overhead (cold - no cache)"] = tuple(
            cold - plain for cold, plain in zip(rows["executorlib, cold cache"],
                                                 rows["executorlib, no cache"], strict=True))
        rows["executorlib, warm cache (hit)"] = per_call(lambda k: batch(exe, k), n)
    rows["  floor: create + write + rename, in its directory"] = in_turns([floor_writer(directory)], n)[0]
    return rows


def profile(n: int, directory: str) -> None:
    cache = FileCache(directory)
    first = 10**9
    for name, calls in (("misses", lambda t: cache.load(t) or cache.store(t, 0)), ("hits", cache.load)):
        profiler = cProfile.Profile()
        profiler.enable()
        for task in tasks(n, first):
            calls(task)
        profiler.disable()
        print(f"\n--- cProfile, {n} {name}, {len(os.listdir(directory))} files in the directory")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


def main() -> None:
    n = int(sys.argv[1]) if sys.argv[1:2] and sys.argv[1].isdigit() else 1000
    rows: dict[str, tuple[float, float]] = {}
    base = sys.argv[sys.argv.index("--in") + 1] if "--in" in sys.argv else None
    with tempfile.TemporaryDirectory(dir=base) as directory:
        rows.update(floors(n, directory))
        for size in DIRECTORY_SIZES:
            rows.update(cache_alone(n, os.path.join(directory, f"d{size}"), size))
        rows.update(executor_rows(n, os.path.join(directory, "executor")))
        print(f"load average {os.getloadavg()[0]:.2f}")
        print(f"{'per call, N=' + str(n):<52} {'ms':>8} {'CPU ms':>8}")
        for name, (wall, cpu) in rows.items():
            print(f"{name:<52} {wall:8.3f} {cpu:8.3f}")
        if "--profile" in sys.argv:
            profile(n, os.path.join(directory, f"d{DIRECTORY_SIZES[-1]}"))


if __name__ == "__main__":
    main()
