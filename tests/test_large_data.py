"""Large data between the executor and its workers: intact, writable, and on the same
machine through /dev/shm without leaving a file there on any path (see
executorlib/interactive/shm.py). ``EXECUTORLIB_NO_SHM=1`` forces the plain ZeroMQ frames
that workers on other nodes use."""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import textwrap
import threading

import psutil
import pytest

from executorlib import Executor
from executorlib.errors import WorkerDiedError
from executorlib.interactive.shm import (
    NO_SHM_ENV,
    SHM_DIR,
    SharedMemory,
    SharedMemoryError,
    describe,
    owner_prefix,
    parse,
)

np = pytest.importorskip("numpy")


def _files_of(pid: int) -> list[str]:
    """Shared-memory files left by the executor in process ``pid``."""
    return [name for name in os.listdir(SHM_DIR) if name.startswith(owner_prefix(pid))]


def _backing(array):
    """The object that finally holds an array's memory."""
    while isinstance(array, (np.ndarray, memoryview)):
        array = array.base if isinstance(array, np.ndarray) else array.obj
    return array


def echo(value):
    return value


def describe_argument(array):
    """Worker side: how the argument arrived, then the argument itself back."""
    return array.flags.writeable, isinstance(_backing(array), mmap.mmap), array


def double_in_place(array):
    array *= 2
    return array


def poke_middle(array):
    array[len(array) // 2] = -1.0
    return array


def slices(array):
    return array[1000:-1000], array[5:7], array


def scaled_by_rank(array):
    from mpi4py import MPI

    return array * (MPI.COMM_WORLD.Get_rank() + 1)


def die_with(array):
    os.kill(os.getpid(), signal.SIGKILL)


def die_while_sending(size):
    array = np.ones(size)
    threading.Timer(0.02, os.kill, (os.getpid(), signal.SIGKILL)).start()
    return array


@pytest.fixture
def shm_files():
    """Fail a test that leaves files of this process's executors in /dev/shm."""
    yield
    assert _files_of(os.getpid()) == []


@pytest.mark.timeout(180)
def test_200_mb_round_trip_intact_and_writable_both_ways(shm_files):
    array = np.arange(25_000_000, dtype=np.float64)  # 200 MB
    with Executor(block_allocation=True, max_workers=1) as exe:
        writable, shared, back = exe.submit(describe_argument, array).result(timeout=120)
        assert writable and shared  # the worker got an ordinary array, from /dev/shm
        assert np.array_equal(back, array) and isinstance(_backing(back), mmap.mmap)
        back[0] = -1.0  # and so does the caller
        assert array[0] == 0.0 and exe.submit(echo, 3).result(timeout=60) == 3


def test_changes_made_by_the_function_come_back(shm_files):
    array = np.arange(2_000_000, dtype=np.float64)
    with Executor(block_allocation=True, max_workers=1) as exe:
        assert np.array_equal(exe.submit(double_in_place, array).result(timeout=60), array * 2)
        poked = exe.submit(poke_middle, array).result(timeout=60)
        assert poked[1_000_000] == -1.0 and poked[999_999] == 999_999.0
        assert np.array_equal(np.delete(poked, 1_000_000), np.delete(array, 1_000_000))
        inner, tiny, whole = exe.submit(slices, array).result(timeout=60)
    assert np.array_equal(inner, array[1000:-1000]) and np.array_equal(tiny, array[5:7])
    assert np.array_equal(whole, array)
    assert np.array_equal(array, np.arange(2_000_000, dtype=np.float64))  # caller's untouched


def test_mixed_list_of_large_and_small_values(shm_files):
    rng = np.random.default_rng(1)
    values = [
        rng.random(1_000_000), 7, "small", rng.integers(0, 9, (500, 3000), dtype=np.int32),
        np.zeros(10), np.asfortranarray(rng.random((700, 900))), {"k": rng.random(300_000)},
    ]
    with Executor(block_allocation=True, max_workers=1) as exe:
        back = exe.submit(echo, values).result(timeout=60)
    assert back[1:3] == [7, "small"] and back[5].flags.f_contiguous
    arrays = values[:1] + values[3:6] + [values[6]["k"]], back[:1] + back[3:6] + [back[6]["k"]]
    for sent, got in zip(*arrays, strict=True):
        assert got.dtype == sent.dtype and np.array_equal(got, sent)


def test_a_function_that_captures_a_large_array_travels_with_it(shm_files):
    """A closure's or lambda's captured array above the out-of-band size goes inside the
    function's pickle (which is reused as one object), never as a lost extra frame."""
    captured = np.arange(100_000)  # 800 kB, far above the out-of-band threshold

    def total() -> int:
        return int(captured.sum())

    with Executor(block_allocation=True, max_workers=1) as exe:
        assert exe.submit(total).result(timeout=60) == 4_999_950_000
        assert exe.submit(lambda: int(captured[-1])).result(timeout=60) == 99_999
    with Executor() as exe:  # one worker per call
        assert exe.submit(total).result(timeout=60) == 4_999_950_000


def test_bytes_bytearray_memoryview_arguments(shm_files):
    blob = os.urandom(3_000_000)
    with Executor() as exe:  # one worker per call
        assert exe.submit(echo, blob).result(timeout=60) == blob
        assert exe.submit(echo, bytearray(blob)).result(timeout=60) == bytearray(blob)
        assert bytes(exe.submit(echo, memoryview(blob)).result(timeout=60)) == blob


def test_plain_zeromq_frames_when_shared_memory_is_off(monkeypatch, shm_files):
    monkeypatch.setenv(NO_SHM_ENV, "1")  # what a worker on another node gets
    array = np.random.default_rng(2).random(5_000_000)
    with Executor(block_allocation=True, max_workers=1) as exe:
        writable, shared, back = exe.submit(describe_argument, array).result(timeout=60)
    assert not shared and np.array_equal(back, array)
    assert not isinstance(_backing(back), mmap.mmap)


@pytest.mark.timeout(180)
def test_mpi_worker_gets_and_returns_large_arrays(shm_files):
    pytest.importorskip("mpi4py")
    array = np.random.default_rng(3).random(3_000_000)
    with Executor(resource_dict={"cores": 2}) as exe:
        first, second = exe.submit(scaled_by_rank, array).result(timeout=150)
    assert np.array_equal(first, array) and np.array_equal(second, array * 2)


@pytest.mark.parametrize("block", [True, False])
def test_worker_killed_mid_call_leaves_no_file(block, shm_files):
    array = np.ones(10_000_000)
    with Executor(block_allocation=block, max_workers=1) as exe:
        with pytest.raises(WorkerDiedError, match="die_with"):
            exe.submit(die_with, array).result(timeout=60)
        assert _files_of(os.getpid()) == []
        with pytest.raises(WorkerDiedError, match="die_while_sending"):
            exe.submit(die_while_sending, 25_000_000).result(timeout=60)
        assert _files_of(os.getpid()) == []
        assert exe.submit(echo, array).result(timeout=60).sum() == array.size


def test_executor_killed_while_worker_sends_leaves_no_file(tmp_path):
    """The worker holds the call's argument file and writes a new result file while its
    executor is SIGKILLed: the worker removes both before it exits."""
    script = textwrap.dedent(
        f"""
        import os, signal, time
        import numpy as np
        from executorlib import Executor

        def kill_executor_then_return(array, executor, marker):
            result = array + 1
            with open(marker, "w") as file:
                file.write(str(os.getpid()))
            os.kill(executor, signal.SIGKILL)
            return result

        with Executor(block_allocation=True, max_workers=1) as exe:
            array = np.ones(25_000_000)
            exe.submit(kill_executor_then_return, array, os.getpid(), {str(tmp_path / "worker")!r}).result()
        """
    )
    executor = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    _, stderr = executor.communicate(timeout=90)
    assert executor.returncode == -signal.SIGKILL, stderr
    worker = int((tmp_path / "worker").read_text())
    if psutil.pid_exists(worker):
        psutil.Process(worker).wait(timeout=30)
    assert _files_of(executor.pid) == []


def test_names_outside_the_connection_prefix_are_refused(tmp_path):
    """A descriptor can only name files of its own connection: another connection's
    file is neither read nor removed."""
    mine = SharedMemory(f"executorlib-test{os.getpid()}-a-")
    other = SharedMemory(f"executorlib-test{os.getpid()}-b-")
    payload = bytes(range(256)) * 8192  # 2 MiB
    try:
        head, descriptor = other.export([b"\x80\x05.", payload])
        name = parse(descriptor)[0]
        assert os.path.exists(os.path.join(SHM_DIR, name))
        refused = mine.attach([head, descriptor])[1]
        with pytest.raises(SharedMemoryError, match="refused the shared-memory name"):
            _ = refused.buffer
        assert os.path.exists(os.path.join(SHM_DIR, name))
        escape = describe(f"executorlib-test{os.getpid()}-a-/../../etc/passwd", 0, 10)
        with pytest.raises(SharedMemoryError):
            _ = mine.attach([head, escape])[1].buffer
        assert bytes(other.attach([head, descriptor])[1]) == payload
        assert not os.path.exists(os.path.join(SHM_DIR, name))
    finally:
        mine.sweep()
        other.sweep()


def test_new_executor_removes_files_of_executors_that_died_with_their_workers():
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead, alive = int(gone.stdout), os.getppid()
    stale, kept = owner_prefix(dead) + "0-0-stale", owner_prefix(alive) + "0-0-in-use"
    for name in (stale, kept):
        with open(os.path.join(SHM_DIR, name), "wb") as file:
            file.write(b"x")
    try:
        with Executor(block_allocation=True, max_workers=1) as exe:
            assert exe.submit(echo, 1).result(timeout=60) == 1
        assert not os.path.exists(os.path.join(SHM_DIR, stale))
        assert os.path.exists(os.path.join(SHM_DIR, kept))
    finally:
        for name in (stale, kept):
            if os.path.exists(os.path.join(SHM_DIR, name)):
                os.unlink(os.path.join(SHM_DIR, name))
