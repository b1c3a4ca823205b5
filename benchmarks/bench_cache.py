"""HDF5 result cache: warm hit and cold write overhead per call, beside the stdlib.

    python benchmarks/bench_cache.py [N]

Rows (per call, N distinct calls of a trivial function, one long-lived worker):
  ProcessPoolExecutor(1)          the stdlib floor for a call in another process
  executorlib, no cache           block allocation, one worker
  executorlib, cold cache         same, every result written to a new HDF5 file
  cold write overhead             cold cache minus no cache
  executorlib, warm cache         every call served from its file, no worker touched
  FileCache.load / .store alone   the cache's own share, without the executor
"""

from __future__ import annotations

import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

from executorlib import Executor
from executorlib.cache import FileCache
from executorlib.resources import Resources
from executorlib.task import Task


def work(i: int) -> int:
    return i + 1


def per_call(run, n: int) -> float:
    start = time.perf_counter()
    run(n)
    return (time.perf_counter() - start) / n * 1e3


def batch(exe, n: int) -> None:
    futures = [exe.submit(work, i) for i in range(n)]
    assert [f.result() for f in futures] == [i + 1 for i in range(n)]


def executorlib_rows(n: int, directory: str) -> dict[str, float]:
    rows = {}
    with Executor(block_allocation=True, max_workers=1) as exe:
        batch(exe, 50)  # worker started and warm
        rows["executorlib, no cache"] = per_call(lambda k: batch(exe, k), n)
    with Executor(block_allocation=True, max_workers=1, cache_directory=directory) as exe:
        batch(exe, 50)
        rows["executorlib, cold cache"] = per_call(lambda k: batch(exe, k), n)
        rows["cold write overhead"] = rows["executorlib, cold cache"] - rows["executorlib, no cache"]
        rows["executorlib, warm cache"] = per_call(lambda k: batch(exe, k), n)
        rows["executorlib, warm cache, submit+result one by one"] = per_call(
            lambda k: [exe.submit(work, i).result() for i in range(k)], n)
    return rows


def cache_alone(n: int, directory: str) -> dict[str, float]:
    cache = FileCache(directory)
    tasks = [Task(work, (10**6 + i,), {}, Resources()) for i in range(n)]
    load_miss = per_call(lambda k: [cache.load(t) for t in tasks[:k]], n)
    store = per_call(lambda k: [cache.store(t, 0) for t in tasks[:k]], n)
    hits = [Task(work, (10**6 + i,), {}, Resources()) for i in range(n)]
    load_hit = per_call(lambda k: [cache.load(t) for t in hits[:k]], n)
    return {"FileCache.load, miss (key + stat)": load_miss, "FileCache.store (write file)": store,
            "FileCache.load, hit (key + read)": load_hit}


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    rows = {}
    with ProcessPoolExecutor(1) as pool:
        batch(pool, 50)
        rows["ProcessPoolExecutor(1), no cache"] = per_call(lambda k: batch(pool, k), n)
    with tempfile.TemporaryDirectory() as directory:
        rows.update(executorlib_rows(n, directory + "/a"))
        rows.update(cache_alone(n, directory + "/b"))
    print(f"{'per call, N=' + str(n):<52} {'ms':>8}")
    for name, value in rows.items():
        print(f"{name:<52} {value:8.3f}")


if __name__ == "__main__":
    main()
