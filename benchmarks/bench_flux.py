"""The flux_allocation backend beside its floors, measured in the same Flux instance.

    python benchmarks/bench_flux.py [--quick]

Outside a Flux instance the script re-runs itself under ``flux start --test-size=1``
(``scripts/find-flux`` puts Flux on PATH). Rows:

- the floors of any Flux-launched worker: ``flux run -n1 true`` and
  ``flux run -n1 python -c pass`` (a CLI start, a job, a Python start-up);
- one worker per call through Flux (a Flux job per call): a call to an idle executor,
  and calls back to back, beside the same on local workers (which keep booted spares);
- a burst of 100 calls submitted at once, one worker per call, on Flux, on local
  processes, and on ``srun`` steps of a Slurm allocation (started with ``salloc`` when
  the test cluster answers);
- block allocation, 2 workers, no-op calls: on Flux, local, and the standard library's
  ``ProcessPoolExecutor(2)``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from bench_slurm import back_to_back_ms, block, idle_call_ms, median_ms, noop, throughput

from executorlib import Executor


def flux_run_ms(command: list[str], repeat: int) -> float:
    return median_ms(lambda: subprocess.run(["flux", "run", "-n1", *command], check=True), repeat)






def burst_s(backend: str, calls: int) -> float:
    """Wall time of ``calls`` one-worker-per-call calls submitted at once."""
    with Executor(backend=backend) as exe:
        exe.submit(noop).result()
        start = time.perf_counter()
        for future in [exe.submit(noop, i) for i in range(calls)]:
            future.result()
        return time.perf_counter() - start


def srun_burst_s(calls: int) -> float | None:
    """The same burst on srun steps, in an salloc of the test cluster (None without Slurm)."""
    if shutil.which("salloc") is None or subprocess.run(["sinfo"], capture_output=True).returncode:
        return None
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLUX_", "SLURM_"))}
    done = subprocess.run(["salloc", "--ntasks=2", "--quiet", "--job-name=executorlib-bench", sys.executable,
                           os.path.abspath(__file__), "--srun-burst", str(calls)],
                          capture_output=True, text=True, env=env, timeout=900)
    lines = done.stdout.split()
    return float(lines[-1]) if done.returncode == 0 and lines else None






def main(quick: bool) -> None:
    repeat, calls, burst = (5, 500, 100) if quick else (20, 2000, 100)
    flux, local = "flux_allocation", "local"
    true_ms = flux_run_ms(["true"], repeat)
    python_ms = flux_run_ms([sys.executable, "-c", "pass"], repeat)
    rows = [
        ("`flux run -n1 true`", f"{true_ms:.0f} ms", "floor: a job"),
        ("`flux run -n1 python -c pass`", f"{python_ms:.0f} ms", "floor: a job + Python"),
        ("one worker per call, idle executor: Flux", f"{idle_call_ms(flux, repeat):.0f} ms", ""),
        ("one worker per call, idle executor: local", f"{idle_call_ms(local, repeat):.0f} ms", ""),
        ("one worker per call, back to back: Flux", f"{back_to_back_ms(flux, repeat):.0f} ms", ""),
        ("one worker per call, back to back: local", f"{back_to_back_ms(local, repeat):.0f} ms", ""),
    ]
    flux_burst, local_burst, srun_burst = burst_s(flux, burst), burst_s(local, burst), srun_burst_s(burst)
    rows += [
        (f"burst of {burst} calls, one worker each: Flux", f"{flux_burst:.1f} s",
         f"{burst / flux_burst:.0f} calls/s"),
        (f"burst of {burst} calls, one worker each: local", f"{local_burst:.1f} s",
         f"{burst / local_burst:.0f} calls/s"),
        (f"burst of {burst} calls, one worker each: srun",
         "n/a" if srun_burst is None else f"{srun_burst:.1f} s",
         "no Slurm here" if srun_burst is None else f"{burst / srun_burst:.0f} calls/s (salloc -n 2)"),
    ]
    flux_rate, local_rate = block(flux, calls), block(local, calls)
    with ProcessPoolExecutor(2) as pool:
        pool_rate = throughput(pool, calls)
    rows += [
        (f"block allocation, 2 workers, {calls} calls: Flux", f"{flux_rate:,.0f} /s",
         f"{flux_rate / local_rate:.0%} of local"),
        (f"block allocation, 2 workers, {calls} calls: local", f"{local_rate:,.0f} /s", ""),
        (f"ProcessPoolExecutor(2), {calls} calls", f"{pool_rate:,.0f} /s", ""),
    ]
    cores = subprocess.run(["flux", "resource", "list", "--no-header", "--states=up", "--format={ncores}"],
                           capture_output=True, text=True).stdout.split()[0]
    print(f"Flux instance {os.environ['FLUX_URI']}: {cores} cores; {os.cpu_count()} CPUs on this machine")
    width = max(len(row[0]) for row in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>10}  {note}")


if __name__ == "__main__":
    if "--srun-burst" in sys.argv:  # the srun row, run by srun_burst_s() inside salloc
        print(burst_s("slurm_allocation", int(sys.argv[sys.argv.index("--srun-burst") + 1])))
    elif not os.environ.get("FLUX_URI"):
        command = ["flux", "start", "--test-size=1", sys.executable, os.path.abspath(__file__), *sys.argv[1:]]
        sys.exit(subprocess.run(command).returncode)
    else:
        main("--quick" in sys.argv)
