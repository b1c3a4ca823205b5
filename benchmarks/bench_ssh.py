"""From a laptop over SSH: what the connection costs, beside plain ssh and scp.

Rows (median of ``REPEAT`` where it says so):
  - ``ssh login true``: a fresh ssh connection through the gateway (the floor of a
    connection; the executor pays it once, at construction)
  - executor construction: ssh + bootstrap + agent (started on first use) + Hello
  - per-call round trip: one tiny call into the login-node executor, result back
  - 1,000 small calls into the login-node executor (block allocation, 2 workers)
  - a 100 MB argument (bytes, returned as its length) beside ``scp`` of the same bytes

    python benchmarks/bench_ssh.py [DIR]

Needs the test cluster with namespace nodes; starts ``scripts/ssh-test-hosts`` in DIR
(default: a temporary folder) and stops it afterwards.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from executorlib import SingleNodeExecutor  # noqa: E402

REPEAT = 5
SIZE = 100 * 1024 * 1024


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


def rows(directory: Path) -> dict[str, float]:
    config = ["-F", str(directory / "ssh_config")]
    python = directory / "python"
    options = {"ssh": "login", "remote_python": str(python), "ssh_args": tuple(config),
               "block_allocation": True, "max_workers": 2}
    found = {"ssh login true (fresh connection)": median_of(
        lambda: subprocess.run(["ssh", *config, "login", "true"], check=True))}
    start = time.perf_counter()
    with SingleNodeExecutor(**options) as exe:
        found["executor construction (first: agent starts)"] = time.perf_counter() - start
        exe.submit(nothing, 0).result()  # workers booted
        found["per-call round trip (login-node executor)"] = median_of(
            lambda: exe.submit(nothing, 1).result())
        found["1,000 small calls, submit to last result"] = timed(
            lambda: [f.result() for f in [exe.submit(nothing, i) for i in range(1000)]])
        data = os.urandom(SIZE)
        found["100 MB argument, call round trip"] = median_of(lambda: exe.submit(length, data).result())
    source = directory / "payload.bin"
    source.write_bytes(data)
    target = "login:/tmp/executorlib-bench.bin"
    found["scp of the same 100 MB"] = median_of(
        lambda: subprocess.run(["scp", "-q", *config, str(source), target], check=True))
    subprocess.run(["ssh", *config, "login", "rm -f /tmp/executorlib-bench.bin"], check=True)
    source.unlink()
    return found


def main() -> None:
    directory = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="bench-ssh-"))
    script = REPO / "scripts" / "ssh-test-hosts"
    subprocess.run([str(script), "start", str(directory)], check=True, stdout=subprocess.DEVNULL)
    (directory / "run").mkdir(mode=0o700, exist_ok=True)
    (directory / "python").write_text(
        f"#!/bin/sh\nexport PYTHONPATH='{REPO}:{REPO / 'benchmarks'}' XDG_RUNTIME_DIR='{directory / 'run'}'\n"
        f"exec '{sys.executable}' \"$@\"\n")
    (directory / "python").chmod(0o755)
    try:
        found = rows(directory)
    finally:
        subprocess.run([str(script), "stop", str(directory)], check=False, stdout=subprocess.DEVNULL)
    print(f"{'laptop -> gateway -> login node':<48} {'seconds':>9}")
    for name, seconds in found.items():
        print(f"{name:<48} {seconds:>9.3f}")
    print(f"(1,000 calls: {1000 / found['1,000 small calls, submit to last result']:.0f} calls/s; "
          f"median of {REPEAT} where repeated; load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
