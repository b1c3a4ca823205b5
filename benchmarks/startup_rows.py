"""Start-up and fresh-worker rows of bench_local.py, beside the standard library and floors.

Start-up is measured in a fresh interpreter per sample, the way a user's script meets it:

    t0 = perf_counter()                       # the interpreter has booted
    import executorlib (or concurrent.futures, multiprocessing)
    t1 = perf_counter()
    with Executor() as e: e.submit(os.getpid).result()     # ProcessPoolExecutor(mp_context=...)
    t2 = perf_counter()

"excluding import" is t2 - t1 (executor creation, first result, shutdown), "including
import" is t2 - t0. ``os.getpid`` travels by reference for both (no cloudpickle by value,
and spawn's children import nothing of the script but its imports). Samples of all
executors alternate, so load on the machine spreads evenly over them; medians are
shown, and each one's fastest sample.
The floor is ``python -c "import zmq, cloudpickle"`` (wall time of the whole process,
whose boot the in-script figures do not include: a generous floor).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor

_SCRIPT = """\
import time
t0 = time.perf_counter()
import os, sys
{imports}
t1 = time.perf_counter()
if __name__ == "__main__":
    with {executor} as exe:
        exe.submit(os.getpid).result()
    t2 = time.perf_counter()
    print((t2 - t0) * 1e3, (t2 - t1) * 1e3)
"""
_OURS = ("from executorlib import Executor", "Executor()")
_STDLIB = (
    "import multiprocessing\nfrom concurrent.futures import ProcessPoolExecutor",
    "ProcessPoolExecutor(mp_context=multiprocessing.get_context({method!r}))",
)
Row = tuple[str, str, str, str]


def _fresh_interpreter_ms(
    scripts: dict[str, str], repeat: int
) -> tuple[dict[str, tuple[float, float]], dict[str, float]]:
    """Median (including, excluding import) in ms of each script, run alternately, and
    each script's fastest sample excluding import (on a shared machine, the least
    disturbed one)."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in scripts}
    with tempfile.TemporaryDirectory() as folder:
        paths = {}
        for name, text in scripts.items():
            paths[name] = os.path.join(folder, f"{name}.py")
            with open(paths[name], "w") as file:
                file.write(text)
        for _ in range(repeat):
            for name, path in paths.items():
                out = subprocess.run([sys.executable, path], check=True, capture_output=True, text=True)
                including, excluding = map(float, out.stdout.split())
                samples[name].append((including, excluding))
    medians = {
        name: (statistics.median(s[0] for s in values), statistics.median(s[1] for s in values))
        for name, values in samples.items()
    }
    fastest = {name: min(s[1] for s in values) for name, values in samples.items()}
    return medians, fastest


def _command_ms(code: str, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def startup_rows(quick: bool) -> list[Row]:
    """Executor creation + first result in a fresh interpreter, ours beside the stdlib
    pool with the spawn, forkserver and fork start methods, and the floor."""
    repeat = 3 if quick else 15
    byte_compile_executorlib()
    scripts = {"ours": _SCRIPT.format(imports=_OURS[0], executor=_OURS[1])}
    for method in ("spawn", "forkserver", "fork"):
        scripts[method] = _SCRIPT.format(imports=_STDLIB[0], executor=_STDLIB[1].format(method=method))
    ms, fastest = _fresh_interpreter_ms(scripts, repeat)
    floor = _command_ms("import zmq, cloudpickle", repeat)
    rows: list[Row] = []
    for index, label in enumerate(("including", "excluding")):
        ours = ms["ours"][index]
        rows.append((
            f"start-up, fresh interpreter, {label} import (ms)", f"{ours:.0f}",
            f"spawn {ms['spawn'][index]:.0f} / forkserver {ms['forkserver'][index]:.0f}",
            f"fork {ms['fork'][index]:.0f}; ours / spawn {ours / ms['spawn'][index]:.2f}, "
            f"/ forkserver {ours / ms['forkserver'][index]:.2f}",
        ))
    rows.append((
        f"  same, fastest of {repeat} samples (ms)", f"{fastest['ours']:.0f}",
        f"spawn {fastest['spawn']:.0f} / forkserver {fastest['forkserver']:.0f}",
        f"ours / spawn {fastest['ours'] / fastest['spawn']:.2f}, "
        f"/ forkserver {fastest['ours'] / fastest['forkserver']:.2f}",
    ))
    excluding = ms["ours"][1]
    rows.append(("  floor: python -c 'import zmq, cloudpickle' (ms)", "", "",
                 f"{floor:.0f}; excluding-import figure / floor = {excluding / floor:.2f} (target <= 1.5)"))
    return rows


def byte_compile_executorlib() -> None:
    """Write executorlib's bytecode, as installing a wheel does: in a checkout (an
    editable install) run with PYTHONDONTWRITEBYTECODE=1 every fresh interpreter would
    compile our modules from source, while the standard library's are compiled."""
    import compileall

    import executorlib

    compileall.compile_dir(os.path.dirname(executorlib.__file__), quiet=1)


def fresh_worker_rows(quick: bool, per_call_ms: Callable[[Executor, int], float]) -> list[Row]:
    """One fresh process per call, back to back: ours (max_cores=2, the zygote forks
    each worker) beside ProcessPoolExecutor(max_tasks_per_child=1) and the floors."""
    from executorlib import Executor as Ours

    calls, repeat = (5, 3) if quick else (20, 7)
    with Ours(max_cores=2) as exe, ProcessPoolExecutor(1, max_tasks_per_child=1) as pool:
        ours, stdlib = per_call_ms(exe, calls), per_call_ms(pool, calls)
    return [
        ("one fresh worker per call (ms)", f"{ours:.1f}", f"{stdlib:.1f}", "pool: max_tasks_per_child=1"),
        ("  floor: python -c pass (ms)", "", "", f"{_command_ms('pass', repeat):.1f}"),
    ]
