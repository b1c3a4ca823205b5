"""The local backend: the behaviour suite, plus what only a local run can show."""

from __future__ import annotations

import gc
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import zmq
from behaviour import BehaviourSuite, add, pid, sleep_then, wait_for

from executorlib import Executor, SingleNodeExecutor
from executorlib.errors import WorkerDiedError


class TestLocal(BehaviourSuite):
    backend = "local"


def echo(value):
    return value


def test_backend_dispatch_returns_backend_class():
    with Executor() as exe:
        assert type(exe) is SingleNodeExecutor
    with Executor(backend="local") as exe:
        assert isinstance(exe, SingleNodeExecutor) and isinstance(exe, Executor)
    with SingleNodeExecutor(max_workers=1) as exe:
        assert exe.submit(add, 1, 2).result(timeout=60) == 3


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"backend": "slurmm"}, ValueError, "unknown backend 'slurmm'; choose one of: local"),
        ({"resource_dict": {"cores": -2}}, ValueError, "positive int"),
        ({"max_cores": 2, "resource_dict": {"cores": 4}}, ValueError, "max_cores is 2"),
        ({"init_function": dict}, ValueError, "needs block_allocation=True"),
        ({"max_workers": 0}, ValueError, "max_workers must be a positive int"),
        ({"resource_dict": {"gpu": 1}}, ValueError, "unknown resource_dict key"),
        ({"block_allocation": True, "max_workers": 4, "max_cores": 2}, ValueError, "exceed max_cores"),
    ],
)
def test_invalid_options_fail_where_made(options, error, match):
    with pytest.raises(error, match=match):
        Executor(**options)


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_stranger_cannot_make_executor_unpickle(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(str(marker)))
    with Executor(block_allocation=True, max_workers=1, max_cores=2, resource_dict={"cores": 2}) as exe:
        assert exe.submit(add, 1, 1).result(timeout=120) == [2, 2]  # MPI ranks: ZeroMQ
        address = exe._scheduler._socket.address
        context = zmq.Context()
        for kind in (b"R", b"F", b"H", b"D"):  # as a result, failure, hello, ready
            stranger = context.socket(zmq.DEALER)
            stranger.connect(address)
            stranger.send_multipart([kind, payload, payload, b"0", b"host", b"1"])
            stranger.send_multipart([kind, payload])
            stranger.close(linger=1000)
        context.term()
        time.sleep(0.5)
        assert exe.submit(add, 2, 2).result(timeout=60) == [4, 4]
    assert not marker.exists()


def test_large_array_round_trip():
    np = pytest.importorskip("numpy")
    array = np.arange(25_000_000, dtype=np.float64)  # 200 MB
    with Executor(block_allocation=True, max_workers=1) as exe:
        back = exe.submit(echo, array).result(timeout=120)
    assert back.dtype == array.dtype and np.array_equal(back, array)
    back[0] = -1.0  # arrays that come back are ordinary, writable arrays


def test_garbage_collected_executor_ends_its_workers():
    exe = Executor(block_allocation=True, max_workers=2)
    worker = exe.submit(pid).result(timeout=60)
    del exe
    gc.collect()
    psutil.Process(worker).wait(timeout=15)


def _run_script(body: str, timeout: float = 60) -> subprocess.CompletedProcess:
    script = "import os, sys, time\nfrom executorlib import Executor\n" + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout
    )


def test_script_without_shutdown_finishes_and_exits():
    done = _run_script(
        """
        exe = Executor(block_allocation=True, max_workers=2)
        futures = [exe.submit(time.sleep, 0.2) for _ in range(4)]
        print("worker", exe.submit(os.getpid).result())
        """
    )
    assert done.returncode == 0, done.stderr
    worker = int(done.stdout.split()[-1])
    assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("block", [True, False])
def test_workers_exit_when_parent_is_killed(block, tmp_path):
    started = [str(tmp_path / f"started{i}") for i in range(2)]
    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(
            f"""
            import time
            from executorlib import Executor
            from behaviour import started_then_wait
            exe = Executor(block_allocation={block}, max_workers=2)
            futures = [exe.submit(started_then_wait, path, path + ".never") for path in {started}]
            time.sleep(600)
            """
        )],
        stdout=subprocess.PIPE, text=True,
    )
    for path in started:  # both calls run: their workers exist
        wait_for(path)
    workers = [p for p in psutil.Process(parent.pid).children(recursive=True)]
    assert workers
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=10)
    gone, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive, [p.cmdline() for p in alive]


def test_mpiexec_refusing_to_start_fails_the_call():
    # 8 ranks on a machine with fewer cores: OpenMPI refuses without --oversubscribe
    cores = os.cpu_count() * 4
    with Executor(max_cores=cores) as exe:
        future = exe.submit(add, 1, resource_dict={"cores": cores})
        with pytest.raises(WorkerDiedError, match="(?s)before it could run add.*not enough slots") as info:
            future.result(timeout=60)
        assert "exit code" in str(info.value)
        ok = exe.submit(add, 1, resource_dict={"cores": cores, "openmpi_oversubscribe": True})
        assert ok.result(timeout=120) == [1] * cores


def test_waiting_costs_no_cpu():
    with Executor(max_workers=1, block_allocation=True) as exe:
        exe.submit(add, 1, 1).result(timeout=60)
        me = psutil.Process()
        before = me.cpu_times()
        future = exe.submit(sleep_then, 2, 1)
        assert future.result(timeout=60) == 1
        after = me.cpu_times()
    assert (after.user + after.system) - (before.user + before.system) < 0.2
