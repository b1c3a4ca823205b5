"""From a laptop over SSH: what the connection costs, beside plain ssh and scp.

Rows, all measured in one run (median of ``REPEAT`` where it says so):
  - ``ssh login true``: a fresh ssh connection through the gateway (the floor of a
    connection; the executor pays it once, at construction)
  - executor construction: ssh + bootstrap + agent (started on first use) + Hello
  - per-call round trip: one tiny call, result back, into the login-node executor and
    into a pilot pool (the call travels on to a worker job and back)
  - 1,000 small calls, submit to last result: into the login-node executor (block
    allocation, 2 workers on the login node) and into a pilot pool (2 worker jobs on
    another node, connected back to the agent on the login node)
  - a 100 MB argument (bytes, returned as its length) beside ``scp`` of the same bytes

    python benchmarks/bench_ssh.py [DIR]

Needs the test cluster with namespace nodes; starts ``scripts/ssh-test-hosts`` in DIR
(default: a temporary folder) and stops it afterwards.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from executorlib import SingleNodeExecutor, SlurmClusterExecutor  # noqa: E402

REPEAT = 5
CALLS = 1000
SIZE = 100 * 1024 * 1024
# Worker jobs on n2: not the login node n1 where the agent runs.
POOL = {"partition": "multi", "slurm_cmd_args": ["--exclude=n1"]}


def nothing(x: int) -> int:
    return x


def length(data: bytes) -> int:
    return len(data)


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def median_of(action) -> float:
    return statistics.median(timed(action) for _ in range(REPEAT))


def many_calls(exe) -> float:
    return timed(lambda: [f.result() for f in [exe.submit(nothing, i) for i in range(CALLS)]])


def login_node_rows(options: dict, data: bytes) -> dict[str, float]:
    start = time.perf_counter()
    with SingleNodeExecutor(**options, block_allocation=True, max_workers=2) as exe:
        found = {"executor construction (first: agent starts)": time.perf_counter() - start}
        exe.submit(nothing, 0).result()  # workers booted
        found["per-call round trip, login-node executor"] = median_of(lambda: exe.submit(nothing, 1).result())
        found["1,000 small calls, login-node executor"] = many_calls(exe)
        found["100 MB argument, call round trip"] = median_of(lambda: exe.submit(length, data).result())
    return found


def pilot_rows(options: dict) -> dict[str, float]:
    # No cache_directory (as for the login-node row): no HDF5 file per call.
    with SlurmClusterExecutor(**options, block_allocation=True, max_workers=2, resource_dict=POOL) as exe:
        # A burst first: the pool grows to both worker jobs (one per waiting call).
        [f.result() for f in [exe.submit(nothing, i) for i in range(50)]]
        found = {"per-call round trip, pilot pool": median_of(lambda: exe.submit(nothing, 1).result())}
        found["1,000 small calls, pilot pool (2 worker jobs)"] = many_calls(exe)
    return found


def floor_rows(directory: Path, config: list[str], data: bytes) -> dict[str, float]:
    found = {"ssh login true (fresh connection)": median_of(
        lambda: subprocess.run(["ssh", *config, "login", "true"], check=True))}
    source = directory / "payload.bin"
    source.write_bytes(data)
    target = "login:/tmp/executorlib-bench.bin"
    found["scp of the same 100 MB"] = median_of(
        lambda: subprocess.run(["scp", "-q", *config, str(source), target], check=True))
    subprocess.run(["ssh", *config, "login", "rm -f /tmp/executorlib-bench.bin"], check=True)
    source.unlink()
    return found


def rows(directory: Path) -> dict[str, float]:
    config = ["-F", str(directory / "ssh_config")]
    options = {"ssh": "login", "remote_python": str(directory / "python"), "ssh_args": tuple(config)}
    data = os.urandom(SIZE)
    found = floor_rows(directory, config, data)
    found |= login_node_rows(options, data)
    return found | pilot_rows(options)


def write_python(directory: Path) -> None:
    """The cluster's Python: this one, with the repository (and this file) importable."""
    (directory / "run").mkdir(mode=0o700, exist_ok=True)
    (directory / "python").write_text(
        f"#!/bin/sh\nexport PYTHONPATH='{REPO}:{REPO / 'benchmarks'}' XDG_RUNTIME_DIR='{directory / 'run'}'\n"
        f"exec '{sys.executable}' \"$@\"\n")
    (directory / "python").chmod(0o755)


def report(found: dict[str, float]) -> None:
    order = ["ssh login true (fresh connection)", "executor construction (first: agent starts)",
             "per-call round trip, login-node executor", "per-call round trip, pilot pool",
             "1,000 small calls, login-node executor", "1,000 small calls, pilot pool (2 worker jobs)",
             "100 MB argument, call round trip", "scp of the same 100 MB"]
    print(f"{'laptop -> gateway -> login node':<48} {'seconds':>9} {'calls/s':>9}")
    for name in order:
        rate = f"{CALLS / found[name]:>9.0f}" if name.startswith("1,000") else ""
        print(f"{name:<48} {found[name]:>9.4f} {rate}")
    print(f"(median of {REPEAT} where repeated; load average {os.getloadavg()[0]:.1f})")


def main() -> None:
    given = len(sys.argv) > 1
    directory = Path(sys.argv[1] if given else tempfile.mkdtemp(prefix="bench-ssh-"))
    script = REPO / "scripts" / "ssh-test-hosts"
    subprocess.run([str(script), "start", str(directory)], check=True, stdout=subprocess.DEVNULL)
    write_python(directory)
    try:
        found = rows(directory)
    finally:
        subprocess.run([str(script), "stop", str(directory)], check=False, stdout=subprocess.DEVNULL)
        if not given:  # keys and logs of a folder we made
            shutil.rmtree(directory, ignore_errors=True)
    report(found)


if __name__ == "__main__":
    main()
