"""Fault paths: nothing hangs, nothing is lost (issue 10).

Every test here pins one way a call, a worker or the manager thread could go wrong,
against real worker processes (and real ``mpiexec`` where the fault is MPI's). Waits
are on events (a file a call writes, a log record), each with a generous bound, and
every ``result``/``wait`` has a timeout, so a regression fails instead of stalling.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import weakref
from concurrent.futures import Future, as_completed, wait

import psutil
import pytest
from behaviour import add, started_then_wait, wait_for, worker_connections

from executorlib import Executor
from executorlib.errors import WorkerDiedError

HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------- functions the workers run
def die_once_next_call_arrives():
    """Exit as soon as the executor has sent this worker a call ahead."""
    connection = worker_connections()[0]
    connection.poll(120_000)
    os._exit(5)


def shout(text):
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
    return text


def hog_gil(started):
    """Hold the GIL for minutes: a C loop that never lets another thread run."""
    open(started, "a").close()
    return sum(range(10**14))


def replace_cwd_with_file_then_die():
    """Make the next worker's start fail: its working directory becomes a file."""
    cwd = os.getcwd()
    os.chdir("/")
    os.rmdir(cwd)
    open(cwd, "w").close()
    os._exit(4)


class TwoArgumentError(Exception):
    """Pickles, but cannot be unpickled (its constructor wants two arguments)."""

    def __init__(self, first, second):
        super().__init__(f"{first} {second}")


def init_fails():
    raise TwoArgumentError("init", "failed")


class Unprintable(Exception):
    def __reduce__(self):
        raise RuntimeError("no pickle")

    def __str__(self):
        raise RuntimeError("no str")


def raise_unprintable():
    raise Unprintable()


class ExitOnUnpickle:
    def __reduce__(self):
        return (sys.exit, ("unpickled",))


def returns_exit_on_unpickle():
    return ExitOnUnpickle()


def returns_lock():
    return threading.Lock()


def size_of(value):
    return len(value)


class Holder:
    def __init__(self):
        self.items = list(range(10))

    def count(self):
        return len(self.items)

    @classmethod
    def runs_module_code(cls):
        """True when this very function object came by reference (imported here)."""
        import inspect

        return inspect.currentframe().f_code is cls.__dict__["runs_module_code"].__func__.__code__


class Pair(tuple):
    """A tuple subclass whose constructor takes two arguments, not one iterable."""

    def __new__(cls, first, second):
        return super().__new__(cls, (first, second))


# ------------------------------------------------------------- 1: batched calls
def test_batch_with_an_undecodable_call_fails_only_that_call(tmp_path):
    started, release = tmp_path / "started", tmp_path / "release"
    module_dir = tmp_path / "late"
    module_dir.mkdir()
    (module_dir / "late_module.py").write_text("def triple(x):\n    return 3 * x\n")
    exe = Executor(max_workers=1, block_allocation=True)
    try:
        blocker = exe.submit(started_then_wait, str(started), str(release), "held")
        wait_for(started)
        sys.path.append(str(module_dir))  # after the worker started: it cannot import this
        import late_module

        futures = [exe.submit(late_module.triple, i) if i % 7 == 3 else exe.submit(add, i, 1)
                   for i in range(40)]
        release.touch()
        assert blocker.result(timeout=60) == "held"
        for i, future in enumerate(futures):
            if i % 7 == 3:
                with pytest.raises(ModuleNotFoundError, match="late_module"):
                    future.result(timeout=60)
            else:
                assert future.result(timeout=60) == i + 1
    finally:
        sys.path.remove(str(module_dir))
        sys.modules.pop("late_module", None)
        release.touch()
        exe.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------- 2: release that raises
def test_dependent_whose_release_raises_fails_with_that_error():
    with Executor(max_workers=1, block_allocation=True) as exe:
        first = exe.submit(add, 1, 1)
        dependent = exe.submit(size_of, Pair(first, 2))
        try:
            with pytest.raises(TypeError, match="missing 1 required positional argument"):
                dependent.result(timeout=60)
            assert exe.submit(add, 2, 2).result(timeout=60) == 4
        finally:
            exe.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------ 5: stderr relay
@pytest.mark.parametrize("stderr", ["closed pipe", "None"])
def test_stderr_relay_failure_does_not_stop_the_executor(stderr):
    script = textwrap.dedent(
        f"""
        import sys
        from executorlib import Executor
        from test_faults import add, shout
        with Executor(max_workers=1, block_allocation=True) as exe:
            if {stderr == "None"}:
                sys.stderr = None
            for i in range(3):
                exe.submit(shout, "to a stderr nobody reads " * 200).result(timeout=60)
                print("ok", exe.submit(add, i, 1).result(timeout=60), flush=True)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    if stderr == "closed pipe":
        process.stderr.close()
        out, _ = process.communicate(timeout=120)
    else:
        out, _ = process.communicate(timeout=120)
    assert out.split("\n")[:3] == ["ok 1", "ok 2", "ok 3"], out


# ------------------------------------------------------ 6: cancels are notified
def test_wait_returns_for_call_cancelled_while_queued_per_call(tmp_path):
    started, release = tmp_path / "started", tmp_path / "release"
    with Executor(max_cores=1) as exe:
        try:
            blocker = exe.submit(started_then_wait, str(started), str(release), 1)
            wait_for(started)
            queued = exe.submit(add, 1, 2)
            assert queued.cancel()
            done, _ = wait([queued], timeout=30)
            assert queued in done
            assert list(as_completed([queued], timeout=30)) == [queued]
        finally:
            release.touch()
        assert blocker.result(timeout=60) == 1


def test_wait_returns_for_call_cancelled_while_queued_in_submission_mode(tmp_path):
    started, release = tmp_path / "started", tmp_path / "release"
    with Executor(backend="local_submission", max_workers=1, cache_directory=str(tmp_path / "cache")) as exe:
        try:
            blocker = exe.submit(started_then_wait, str(started), str(release), 1)
            wait_for(started)
            queued = exe.submit(add, 1, 2)  # waits: max_workers=1 job at a time
            assert queued.cancel()
            done, _ = wait([queued], timeout=30)
            assert queued in done
        finally:
            release.touch()
        assert blocker.result(timeout=60) == 1


def test_wait_returns_for_dependents_cancelled_with_their_input():
    with Executor(max_workers=1, block_allocation=True) as exe:
        foreign, other = Future(), Future()
        dependent = exe.submit(add, foreign, 1)
        cancelled_by_user = exe.submit(add, other, 1)
        foreign.cancel()
        assert cancelled_by_user.cancel()
        done, _ = wait([dependent, cancelled_by_user], timeout=30)
        assert done == {dependent, cancelled_by_user}
        assert dependent.cancelled()
        other.set_result(1)


# ------------------------------------------------------ 7: head-of-line blocking
def test_no_call_waits_behind_a_long_one_while_a_worker_is_idle(tmp_path):
    started, release = tmp_path / "started", tmp_path / "release"
    with Executor(max_workers=2, block_allocation=True) as exe:
        try:
            long = exe.submit(started_then_wait, str(started), str(release), "long")
            quick = [exe.submit(add, i, 1) for i in range(6)]
            assert [f.result(timeout=60) for f in quick] == [i + 1 for i in range(6)]
            assert not long.done()
        finally:
            release.touch()
        assert long.result(timeout=60) == "long"


def test_call_sent_ahead_to_a_worker_that_dies_runs_elsewhere():
    with Executor(max_workers=1, block_allocation=True) as exe:
        dying = exe.submit(die_once_next_call_arrives)
        ahead = exe.submit(add, 20, 1)
        with pytest.raises(WorkerDiedError, match="exit code 5"):
            dying.result(timeout=60)
        assert ahead.result(timeout=60) == 21


# ------------------------------------------------ 8: workers die with the caller
@pytest.mark.parametrize(("block", "cores"), [(True, 1), (False, 2)])
def test_worker_holding_the_gil_dies_with_its_caller(tmp_path, block, cores):
    started = tmp_path / "started"
    script = textwrap.dedent(
        f"""
        import time
        from executorlib import Executor
        from test_faults import hog_gil
        exe = Executor(max_workers=1, max_cores={cores}, block_allocation={block},
                       resource_dict={{"cores": {cores}}})
        exe.submit(hog_gil, {str(started)!r})
        time.sleep(600)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    parent = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        wait_for(started)
        workers = psutil.Process(parent.pid).children(recursive=True)
        assert workers
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, [p.cmdline() for p in alive]


# ------------------------------------------------------------ 9: pool faults
def test_failed_replacement_start_is_retried(tmp_path):
    workdir = tmp_path / "work"
    records: list[logging.LogRecord] = []

    class RemoveObstacle(logging.Handler):
        def emit(self, record):
            records.append(record)
            if workdir.is_file():
                workdir.unlink()  # the next try finds the way clear

    handler = RemoveObstacle()
    logging.getLogger("executorlib").addHandler(handler)
    try:
        with Executor(max_workers=1, block_allocation=True, resource_dict={"cwd": str(workdir)}) as exe:
            with pytest.raises(WorkerDiedError, match="exit code 4"):
                exe.submit(replace_cwd_with_file_then_die).result(timeout=60)
            assert exe.submit(add, 1, 2).result(timeout=60) == 3
    finally:
        logging.getLogger("executorlib").removeHandler(handler)
    assert any("trying again" in record.getMessage() for record in records)


def test_replacement_start_that_keeps_failing_breaks_the_pool_clearly(tmp_path):
    workdir = tmp_path / "work"
    with Executor(max_workers=1, block_allocation=True, resource_dict={"cwd": str(workdir)}) as exe:
        with pytest.raises(WorkerDiedError, match="exit code 4"):
            exe.submit(replace_cwd_with_file_then_die).result(timeout=60)
        with pytest.raises(WorkerDiedError, match="times in a row starting a worker failed"):
            exe.submit(add, 1, 2).result(timeout=60)


def test_init_function_error_that_cannot_be_unpickled_is_reported():
    with Executor(max_workers=1, block_allocation=True, init_function=init_fails) as exe, \
            pytest.raises(WorkerDiedError, match="init_function failed.*could not be unpickled"):
        exe.submit(add, 1, 2).result(timeout=60)


def test_unprintable_exception_is_reported_by_its_type():
    with Executor(max_workers=1, block_allocation=True) as exe:
        worker = exe.submit(os.getpid).result(timeout=60)
        with pytest.raises(RuntimeError, match="unprintable Unprintable exception"):
            exe.submit(raise_unprintable).result(timeout=60)
        assert exe.submit(os.getpid).result(timeout=60) == worker


# ------------------------------------------- 10: from CPython's own test suite
def test_finished_call_keeps_neither_callable_nor_arguments_alive():
    holder, argument = Holder(), _Box(range(5))
    gone = [threading.Event(), threading.Event()]
    refs = [weakref.ref(obj, lambda _, event=event: event.set())
            for obj, event in zip((holder, argument), gone, strict=True)]
    with Executor(max_workers=1, block_allocation=True) as exe:
        futures = [exe.submit(holder.count), exe.submit(size_of, argument)]
        assert [f.result(timeout=60) for f in futures] == [10, 5]
        del holder, argument
        gc.collect()
        assert [event.is_set() for event in gone] == [True, True], refs


class _Box(list):
    """A list that can be weakly referenced."""


def test_finished_dag_leaves_no_future_task_or_callback_behind():
    """A DAG (a dependency every 10th call, one input failing, one cancelled) keeps
    nothing alive once its calls are done: every future, and with it every task record,
    dependency callback and argument, is freed while the executor still runs."""
    gate = Future()
    with Executor(max_workers=2, block_allocation=True) as exe:
        futures = []
        for i in range(2_000):
            inputs = (futures[-1], 1) if i % 10 == 9 else (i, 0)
            futures.append(exe.submit(add, *inputs))
        failed = exe.submit(add, "a", 1)
        cancelled = Future()
        futures += [failed, exe.submit(add, failed, 1), exe.submit(add, cancelled, 1)]
        futures += [exe.submit(add, gate, 1)]
        cancelled.cancel()
        gate.set_result(1)
        wait(futures, timeout=120)
        assert all(f.done() for f in futures) and len(exe) == 0
        assert futures[19].result() == 19 and futures[-1].result() == 2
        assert futures[-2].cancelled() and isinstance(futures[-3].exception(), TypeError)
        refs = [weakref.ref(f) for f in [*futures, cancelled]]
        del futures, failed, cancelled, inputs
        gc.collect()
        assert [r for r in refs if r() is not None] == []


def test_result_whose_unpickling_raises_system_exit_fails_only_that_call():
    with Executor(max_workers=1, block_allocation=True) as exe:
        with pytest.raises(RuntimeError, match="could not be unpickled here.*SystemExit"):
            exe.submit(returns_exit_on_unpickle).result(timeout=60)
        assert exe.submit(add, 1, 2).result(timeout=60) == 3


def test_pickling_failures_are_picklingerrors():
    with Executor(max_workers=1, block_allocation=True) as exe:
        with pytest.raises(pickle.PicklingError):
            exe.submit(add, threading.Lock(), 1).result(timeout=60)
        with pytest.raises(pickle.PicklingError):
            exe.submit(returns_lock).result(timeout=60)
        assert exe.submit(add, 1, 2).result(timeout=60) == 3


def test_classmethod_travels_by_reference():
    with Executor(max_workers=1, block_allocation=True) as exe:
        assert exe.submit(Holder.runs_module_code).result(timeout=60) is True


def exit_once_released(release):
    wait_for(release)
    os._exit(6)


def test_worker_dying_during_shutdown_is_replaced_while_calls_wait(tmp_path):
    release = tmp_path / "release"
    exe = Executor(max_workers=1, block_allocation=True)
    dying = exe.submit(exit_once_released, str(release))
    queued = [exe.submit(add, i, 1) for i in range(3)]
    exe.shutdown(wait=False)
    release.touch()
    with pytest.raises(WorkerDiedError, match="exit code 6"):
        dying.result(timeout=60)
    assert [f.result(timeout=60) for f in queued] == [1, 2, 3]
    exe.shutdown(wait=True)
