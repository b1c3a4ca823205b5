"""Pilot pools (``SlurmClusterExecutor(block_allocation=True)``) beside their floors.

    python benchmarks/bench_pilot.py [--quick]

Needs the test cluster (``scripts/slurm-test-cluster start``); worker jobs go to
partition ``multi`` (the namespace nodes). Rows, all measured in the same run:

- block throughput: 2 pilot workers on the namespace nodes beside 2 local block-
  allocation workers (``SingleNodeExecutor``), no-op calls; the ratio is the figure;
- cold start: executor created -> first result, beside a bare ``sbatch --wrap true``
  from submission to RUNNING (the floor of any job-based worker);
- growth: a burst of calls -> 4 workers connected, from an empty pool;
- workers per job: 4 workers as 4 jobs of one worker beside 1 job of four
  (``workers_per_job=4``): throughput of no-op calls and growth 0 -> 4 workers;
- lost calls: 20 worker jobs scancelled while they run calls, ``max_retries=1``:
  calls that did not return their value (must be 0).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

from executorlib import SingleNodeExecutor, SlurmClusterExecutor

PARTITION = {"partition": "multi"}


def noop(x=None):
    return x


def pause(x, directory):
    """Tell the benchmark which job runs this call (a file), then take a moment."""
    import os
    import time

    open(os.path.join(directory, f"{x}-{os.environ['SLURM_JOB_ID']}"), "w").close()
    time.sleep(0.3)
    return x


def throughput(exe, calls: int) -> tuple[float, float]:
    """(calls per second, CPU microseconds per call in this process: steadier than the
    rate on a shared machine)."""
    list(exe.map(noop, range(200)))  # warm up
    cpu, start = time.process_time(), time.perf_counter()
    for future in [exe.submit(noop, i) for i in range(calls)]:
        future.result()
    return calls / (time.perf_counter() - start), (time.process_time() - cpu) / calls * 1e6


def pilot_pool(**options):
    return SlurmClusterExecutor(block_allocation=True, resource_dict=PARTITION, **options)


def block_rows(calls: int, rounds: int = 3) -> list[tuple[str, str]]:
    """Local and pilot pools in alternating rounds; medians."""
    local, pilot = [], []
    for _ in range(rounds):
        with SingleNodeExecutor(max_workers=2, block_allocation=True) as exe:
            local.append(throughput(exe, calls))
        with pilot_pool(max_workers=2, min_workers=2) as exe:
            pilot.append(throughput(exe, calls))
    rate_l, cpu_l = (statistics.median(x) for x in zip(*local, strict=True))
    rate_p, cpu_p = (statistics.median(x) for x in zip(*pilot, strict=True))
    what = f"{calls} no-op calls, median of {rounds} alternating rounds"
    return [
        (f"block throughput, 2 local workers, {what}", f"{rate_l:,.0f} calls/s, {cpu_l:.0f} us CPU/call"),
        (f"block throughput, 2 pilot workers on the namespace nodes, {what}",
         f"{rate_p:,.0f} calls/s, {cpu_p:.0f} us CPU/call"),
        ("pilot / local (rate; executor CPU per call)", f"{rate_p / rate_l:.0%}; {cpu_p / cpu_l:.0%}"),
    ]


def bare_sbatch_s() -> float:
    start = time.perf_counter()
    job = subprocess.run(["sbatch", "--parsable", "-p", "multi", "-o", "/dev/null", "--wrap", "sleep 30"],
                         capture_output=True, text=True, check=True).stdout.strip()
    try:
        while subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                             text=True).stdout.strip() != "RUNNING":
            time.sleep(0.02)
        return time.perf_counter() - start
    finally:
        subprocess.run(["scancel", job], check=False)


def cold_start_s() -> float:
    start = time.perf_counter()
    with pilot_pool(max_workers=1) as exe:
        exe.submit(noop).result()
        return time.perf_counter() - start


def growth_s(workers_per_job: int = 1) -> float:
    with pilot_pool(max_workers=4, idle_timeout=None, workers_per_job=workers_per_job) as exe:
        start = time.perf_counter()
        futures = [exe.submit(noop, i) for i in range(2000)]
        while sum(row["connected"] for row in exe.worker_jobs()) < 4:
            time.sleep(0.01)
        elapsed = time.perf_counter() - start
        for future in futures:
            future.result()
        return elapsed


def per_job_rows(calls: int, rounds: int = 3) -> list[tuple[str, str]]:
    """4 workers as 4 jobs of 1 and as 1 job of 4, in alternating rounds; medians."""
    measured: dict[int, list] = {1: [], 4: []}
    grown: dict[int, list] = {1: [], 4: []}
    for _ in range(rounds):
        for per_job in (1, 4):
            grown[per_job].append(growth_s(per_job))
            with pilot_pool(max_workers=4, min_workers=4, workers_per_job=per_job) as exe:
                measured[per_job].append(throughput(exe, calls))
    rows = []
    for per_job, jobs in ((1, "4 jobs x 1 worker"), (4, "1 job x 4 workers")):
        rate, cpu = (statistics.median(x) for x in zip(*measured[per_job], strict=True))
        rows.append((f"block throughput, 4 pilot workers as {jobs}, {calls} no-op calls (median of {rounds})",
                     f"{rate:,.0f} calls/s, {cpu:.0f} us CPU/call"))
        rows.append((f"pilot pool growth 0 -> 4 connected workers as {jobs} (median of {rounds})",
                     f"{statistics.median(grown[per_job]):.2f} s"))
    return rows


def lost_calls(cancellations: int) -> tuple[int, int]:
    """(calls that did not return their value, calls made) across scancels of busy jobs."""
    directory = tempfile.mkdtemp()
    lost = made = 0
    with pilot_pool(max_workers=2, min_workers=2, max_retries=1, idle_timeout=None) as exe:
        for round_ in range(cancellations):
            futures = {i: exe.submit(pause, i, directory) for i in range(round_ * 4, round_ * 4 + 4)}
            made += len(futures)
            while not (names := os.listdir(directory)):
                time.sleep(0.01)
            subprocess.run(["scancel", names[0].split("-")[1]], check=True)
            lost += sum(1 for i, future in futures.items() if _value(future) != i)
            for name in os.listdir(directory):
                os.remove(os.path.join(directory, name))
    os.rmdir(directory)
    return lost, made


def _value(future):
    try:
        return future.result(timeout=300)
    except Exception as error:  # a lost call
        print(f"lost: {error}", file=sys.stderr)
        return None


def main() -> None:
    quick = "--quick" in sys.argv
    calls = 2000 if quick else 5000
    rows = block_rows(calls)
    rows.append(("bare sbatch --wrap, submitted -> RUNNING (median of 3)",
                 f"{statistics.median(bare_sbatch_s() for _ in range(3)):.2f} s"))
    rows.append(("pilot pool cold start, created -> first result (median of 3)",
                 f"{statistics.median(cold_start_s() for _ in range(3)):.2f} s"))
    rows.append(("pilot pool growth 0 -> 4 connected workers under a burst", f"{growth_s():.2f} s"))
    rows += per_job_rows(calls)
    lost, made = lost_calls(5 if quick else 20)
    rows.append((f"calls lost across {5 if quick else 20} worker-job scancels, max_retries=1 "
                 f"({made} calls)", str(lost)))
    width = max(len(name) for name, _ in rows)
    print(f"{'measure':<{width}} | value")
    print(f"{'-' * width}-|-{'-' * 16}")
    for name, value in rows:
        print(f"{name:<{width}} | {value}")


if __name__ == "__main__":
    main()
