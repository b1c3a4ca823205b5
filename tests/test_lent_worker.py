"""An idle worker lent to ``submit()`` (executorlib/interactive/scheduler.py): while the
manager thread sleeps in its poll with nothing queued, the next call is sent from the
submitting thread straight to an idle worker. The manager lends one in the moment after
each result, so these tests repeat their scenario many times: most rounds take the lent
way, some the queue. What they check must hold either way."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import psutil
import pytest
from behaviour import add

from executorlib import Executor


def test_calls_from_many_threads_each_get_their_own_result():
    rounds, clients = 300, 6
    with Executor(max_workers=2, block_allocation=True) as exe:

        def client(k: int) -> list[int]:
            # one call at a time: a worker is often idle, and lent, when the next comes
            return [exe.submit(add, i, k * 1000).result(timeout=120) for i in range(rounds)]

        with ThreadPoolExecutor(clients) as threads:
            results = list(threads.map(client, range(clients)))
    assert results == [[i + k * 1000 for i in range(rounds)] for k in range(clients)]


def test_unpicklable_call_released_to_an_idle_pool_fails_alone_and_nothing_deadlocks():
    """The call is sent by the thread that resolves its input; it cannot be pickled, so
    it fails there, and the executor's own callback on its future (which takes the
    scheduler's lock) must run after the send has let go of that lock."""
    with Executor(max_workers=1, block_allocation=True) as exe:
        for _ in range(30):
            assert exe.submit(add, 1, 1).result(timeout=60) == 2
            gate: Future = Future()
            bad = exe.submit(add, gate, threading.Lock())
            gate.set_result(1)
            with pytest.raises(TypeError, match="cannot be pickled"):
                bad.result(timeout=60)
        assert exe.submit(add, 2, 3).result(timeout=60) == 5


def _gone(pid: int, timeout: float = 60) -> None:
    """Wait until ``pid`` has exited: a zombie with no thread left (a killed process's
    main thread is a zombie while its other threads still exit, and its descriptors
    close with the last of them), or reaped already."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            zombie = psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            if zombie and len(os.listdir(f"/proc/{pid}/task")) <= 1:
                return
        except (psutil.NoSuchProcess, FileNotFoundError):
            return
        assert time.monotonic() < deadline, f"worker {pid} did not exit"
        time.sleep(0.01)


def test_call_submitted_after_its_idle_worker_died_runs_on_the_replacement():
    """The send to the dead worker's socket fails: the call goes back to the queue and
    runs on the worker that replaces it (it never reached the dead one)."""
    with Executor(max_workers=1, block_allocation=True) as exe:
        for _ in range(20):
            pid = exe.submit(os.getpid).result(timeout=60)
            os.kill(pid, signal.SIGKILL)
            _gone(pid)
            assert exe.submit(add, 1, 1).result(timeout=120) == 2
