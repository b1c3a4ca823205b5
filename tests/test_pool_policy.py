"""The pool's policy for more local workers than cores (executorlib/interactive/pool.py):
short calls stay on as many busy workers as there are cores, but a short function that
turns slow holds back at most one call per core; every other call reaches an idle worker."""

from __future__ import annotations

import os
import time

from behaviour import started_then_wait

from executorlib import Executor


def test_a_short_function_that_turns_slow_holds_back_at_most_one_call_per_core(tmp_path):
    cores = len(os.sched_getaffinity(0))
    workers = cores + 4  # more workers than cores, on any machine
    release = tmp_path / "release"
    release.touch()
    with Executor(block_allocation=True, max_workers=workers) as exe:
        # a few quick runs: the pool now counts started_then_wait as a short function
        quick = [exe.submit(started_then_wait, str(tmp_path / "warm"), str(release), i) for i in range(4)]
        assert [f.result(timeout=120) for f in quick] == [0, 1, 2, 3]
        release.unlink()
        started = [tmp_path / f"started-{i}" for i in range(workers)]
        slow = [exe.submit(started_then_wait, str(path), str(release), i) for i, path in enumerate(started)]
        expected = workers - cores  # one call per core may wait behind a slow one
        deadline = time.monotonic() + 120
        while sum(path.exists() for path in started) < expected:
            assert time.monotonic() < deadline, "calls wait behind slow ones while workers are idle"
            time.sleep(0.01)
        release.touch()
        assert [f.result(timeout=120) for f in slow] == list(range(workers))
