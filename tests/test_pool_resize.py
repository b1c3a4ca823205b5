"""Block allocation pools that change while they run (issue 12's pool items):
``exe.max_workers`` settable, and ``executorlib_worker_id``."""

from __future__ import annotations

import os
import time

import psutil
import pytest
from behaviour import started_then_wait, wait_for

from executorlib import Executor
from executorlib.errors import WorkerDiedError


def worker_number(executorlib_worker_id):
    return executorlib_worker_id


def held_number(started, release, executorlib_worker_id=None):
    return started_then_wait(started, release, executorlib_worker_id)


def record_then_wait(log, started, release):
    with open(log, "a") as file:
        file.write(f"{os.getpid()}\n")
    return started_then_wait(started, release, os.getpid())


def _wait_for_workers(count, timeout=60):
    """Wait until this process has ``count`` worker processes (an event we can see)."""
    deadline = time.monotonic() + timeout
    while True:
        workers = [p for p in psutil.Process().children() if _is_live_worker(p)]
        if len(workers) == count or time.monotonic() > deadline:
            return len(workers)
        time.sleep(0.05)


def _is_live_worker(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE and "executorlib.backend" in " ".join(
            process.cmdline()
        )
    except psutil.Error:  # ended meanwhile
        return False


def test_each_worker_gets_its_number(tmp_path):
    started = [tmp_path / f"started{i}" for i in range(2)]
    release = tmp_path / "release"
    with Executor(max_workers=2, block_allocation=True) as exe:
        try:
            held = [exe.submit(held_number, str(path), str(release)) for path in started]
            for path in started:
                wait_for(path)
        finally:
            release.touch()
        assert sorted(f.result(timeout=60) for f in held) == [0, 1]
        assert exe.submit(worker_number, executorlib_worker_id=7).result(timeout=60) == 7


def test_replacement_takes_the_number_of_the_worker_it_replaces():
    with Executor(max_workers=1, block_allocation=True) as exe:
        assert exe.submit(worker_number).result(timeout=60) == 0
        dead = exe.submit(os._exit, 3)
        assert dead.exception(timeout=60) is not None
        assert exe.submit(worker_number).result(timeout=60) == 0


def test_raising_max_workers_starts_a_worker_that_takes_calls(tmp_path):
    started, release = tmp_path / "started", tmp_path / "release"
    with Executor(max_workers=1, block_allocation=True) as exe:
        try:
            held = exe.submit(started_then_wait, str(started), str(release), "held")
            wait_for(started)
            exe.max_workers = 2
            assert exe.max_workers == 2
            assert exe.submit(worker_number).result(timeout=60) == 1  # while 0 is held
        finally:
            release.touch()
        assert held.result(timeout=60) == "held"


def test_lowering_max_workers_loses_and_repeats_no_call(tmp_path):
    log, release = tmp_path / "log", tmp_path / "release"
    started = [tmp_path / f"started{i}" for i in range(2)]
    with Executor(max_workers=3, block_allocation=True) as exe:
        try:
            busy = [exe.submit(record_then_wait, str(log), str(path), str(release)) for path in started]
            for path in started:
                wait_for(path)
            exe.max_workers = 1  # the idle worker stops at once, one busy one after its call
        finally:
            release.touch()
        pids = [f.result(timeout=60) for f in busy]
        assert sorted(log.read_text().split()) == sorted(str(pid) for pid in pids)
        assert _wait_for_workers(1) == 1
        assert {exe.submit(os.getpid).result(timeout=60) for _ in range(5)} <= set(pids)
        assert len({exe.submit(os.getpid).result(timeout=60) for _ in range(5)}) == 1


def die(code):
    os._exit(code)


def test_restart_limit_gives_up_after_that_many_replacements():
    with Executor(max_workers=1, block_allocation=True, restart_limit=1) as exe:
        with pytest.raises(WorkerDiedError, match="exit code 7"):
            exe.submit(die, 7).result(timeout=60)
        assert exe.submit(worker_number).result(timeout=60) == 0  # the one replacement
        with pytest.raises(WorkerDiedError, match="exit code 8"):
            exe.submit(die, 8).result(timeout=60)
        with pytest.raises(WorkerDiedError, match="restart_limit=1 reached"):
            exe.submit(worker_number).result(timeout=60)


def test_restart_limit_must_be_a_count():
    with pytest.raises(ValueError, match="restart_limit must be an int >= 0"):
        Executor(max_workers=1, block_allocation=True, restart_limit=-1)
