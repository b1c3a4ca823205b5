"""The behaviour every backend that runs workers must show, written once.

A backend's test module subclasses :class:`BehaviourSuite` and sets ``backend`` (and
``extra`` options); pytest collects the subclass (``Test...``) and runs every test on it.
The functions the tests submit live at module level, so workers import them by reference.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import time
from concurrent.futures import CancelledError, Future

import pytest

from executorlib import Executor
from executorlib.errors import RemoteTraceback, WorkerDiedError


def add(a, b=0):
    return a + b


def total(values):
    return sum(values)


def fail(message):
    raise KeyError(message)


def sleep_then(seconds, value=None):
    time.sleep(seconds)
    return value


def wait_for(path, timeout=120):
    """Wait until the file ``path`` exists (an event a call or the test makes)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)


def started_then_wait(started, release, value=None):
    """Signal that the call runs, then hold its worker until ``release`` exists."""
    open(started, "a").close()
    wait_for(release)
    return value


def worker_connections():
    """This worker's connection to its executor: over ZeroMQ or a socket pair."""
    from executorlib.interactive.pipe import PipeConnection

    kinds = (PipeConnection,)
    if "zmq" in sys.modules:  # a local serial worker never imports it
        from executorlib.interactive.channel import WorkerConnection

        kinds = (PipeConnection, WorkerConnection)
    return [o for o in gc.get_objects() if isinstance(o, kinds)]


def lose_connection_then_exit(started, release):
    """The dead-worker window: the connection to the executor is closed while the
    process lives on (as when mpiexec or srun outlive rank 0 for a moment)."""
    real_exit = os._exit
    os._exit = lambda code: None  # the watchdog must not end this process yet
    for connection in worker_connections():
        connection.close()
    open(started, "a").close()
    wait_for(release)
    real_exit(3)


def die(code):
    os._exit(code)


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def write_stderr_and_die(text):
    import sys

    sys.stderr.write(text + "\n")
    sys.stderr.flush()
    os._exit(7)


def environment(*names):
    return {name: os.environ.get(name) for name in names}


def where_am_i():
    return os.getcwd()


def pid():
    return os.getpid()


def interval(seconds):
    start = time.time()
    time.sleep(seconds)
    return start, time.time()


def mpi_ranks(i):
    from mpi4py import MPI

    return i, MPI.COMM_WORLD.Get_size(), MPI.COMM_WORLD.Get_rank()


def mpi_fail_on_rank_one():
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() == 1:
        raise ValueError("rank one says no")
    return MPI.COMM_WORLD.Get_rank()


def init_values():
    return {"j": 4, "k": 3, "l": 2}


def with_preload(i, j, k):
    return i + j + k


class BehaviourSuite:
    """Subclass per backend: set ``backend`` and any ``extra`` executor options."""

    backend = "local"
    extra: dict = {}

    def executor(self, **options):
        return Executor(backend=self.backend, **{**self.extra, **options})

    # ------------------------------------------------------------------ basics
    def test_submit_and_map(self):
        with self.executor() as exe:
            assert exe.submit(sum, [1, 1]).result(timeout=60) == 2
            assert list(exe.map(total, [[5, 5], [6, 6]], timeout=60)) == [10, 12]

    def test_lambda_and_closure_run_in_worker(self):
        offset = 7
        with self.executor() as exe:
            assert exe.submit(lambda x: x + offset, 1).result(timeout=60) == 8
            assert exe.submit(pid).result(timeout=60) != os.getpid()

    def test_block_allocation_with_init_function(self):
        options = {"max_workers": 2, "block_allocation": True, "init_function": init_values}
        with self.executor(**options) as exe:
            assert exe.submit(with_preload, 2, j=5).result(timeout=60) == 10
            assert len({exe.submit(pid).result(timeout=60) for _ in range(20)}) <= 2

    def test_long_queue_resolves_every_call_on_its_own(self):
        """Many waiting calls travel in batches; each still succeeds or fails alone."""
        import threading

        with self.executor(max_workers=1, block_allocation=True) as exe:
            futures = [
                exe.submit(fail, f"no {i}") if i % 10 == 3 else exe.submit(add, i, 1) for i in range(200)
            ]
            futures[50] = exe.submit(add, threading.Lock(), 1)  # cannot be pickled
            futures += [exe.submit(add, i, 1) for i in range(200, 240)]
            for i, future in enumerate(futures):
                if i == 50:
                    with pytest.raises(TypeError, match="cannot be pickled"):
                        future.result(timeout=60)
                elif i % 10 == 3 and i < 200:
                    with pytest.raises(KeyError, match=f"no {i}"):
                        future.result(timeout=60)
                else:
                    assert future.result(timeout=60) == i + 1

    def test_one_worker_per_call_gets_a_fresh_process(self):
        with self.executor() as exe:
            pids = [exe.submit(pid).result(timeout=60) for _ in range(3)]
        assert len(set(pids)) == 3

    # ------------------------------------------------------------ dependencies
    def test_future_chain_and_nested_containers(self):
        with self.executor() as exe:
            future = 0
            for i in range(1, 4):
                future = exe.submit(lambda a, b: a + b, i, future)
            assert future.result(timeout=60) == 6
            first = exe.submit(add, 1, 1)
            nested = exe.submit(lambda x: x, {"a": [first, (first, 3)], "b": first})
            assert nested.result(timeout=60) == {"a": [2, (2, 3)], "b": 2}
            foreign = Future()
            waiting = exe.submit(add, foreign, 1)
            foreign.set_result(41)
            assert waiting.result(timeout=60) == 42

    def test_failed_input_fails_dependent_at_once(self):
        with self.executor() as exe:
            slow = exe.submit(sleep_then, 30, 1)
            broken = exe.submit(fail, "upstream")
            dependent = exe.submit(add, broken, slow)
            with pytest.raises(KeyError, match="upstream"):
                dependent.result(timeout=15)  # long before `slow` is done
            exe.shutdown(wait=False, cancel_futures=True)

    def test_cancelled_input_cancels_dependent(self):
        with self.executor() as exe:
            foreign = Future()
            dependent = exe.submit(add, foreign, 1)
            foreign.cancel()
            with pytest.raises(CancelledError):
                dependent.result(timeout=15)

    def test_disable_dependencies_rejects_future(self):
        with self.executor(disable_dependencies=True) as exe:
            with pytest.raises(TypeError, match="disable_dependencies"):
                exe.submit(add, Future(), 1)
            assert exe.submit(add, 1, 2).result(timeout=60) == 3

    # ------------------------------------------------------------------ errors
    def test_exception_keeps_type_message_and_remote_traceback(self):
        with self.executor() as exe:
            future = exe.submit(fail, "boom")
            with pytest.raises(KeyError, match="boom") as info:
                future.result(timeout=60)
            assert isinstance(info.value.__cause__, RemoteTraceback)
            assert "in fail" in str(info.value.__cause__)

    @pytest.mark.parametrize("block", [False, True])
    def test_dead_worker_is_reported_and_replaced(self, block):
        with self.executor(block_allocation=block, max_workers=1) as exe:
            with pytest.raises(WorkerDiedError, match=r"exit code 3") as info:
                exe.submit(die, 3).result(timeout=60)
            assert "die" in str(info.value)
            with pytest.raises(WorkerDiedError, match="SIGKILL"):
                exe.submit(kill_self).result(timeout=60)
            with pytest.raises(WorkerDiedError, match="last words"):
                exe.submit(write_stderr_and_die, "last words").result(timeout=60)
            assert exe.submit(add, 2, 3).result(timeout=60) == 5

    def test_unpicklable_argument_fails_only_that_call(self):
        import threading

        with self.executor() as exe:
            bad = exe.submit(add, threading.Lock(), 1)
            with pytest.raises(TypeError, match="cannot be pickled"):
                bad.result(timeout=60)
            assert exe.submit(add, 1, 1).result(timeout=60) == 2

    def test_worker_that_cannot_start_fails_its_call(self, tmp_path):
        not_a_dir = tmp_path / "file"
        not_a_dir.write_text("")
        with self.executor() as exe:
            with pytest.raises(OSError):
                exe.submit(add, 1, resource_dict={"cwd": str(not_a_dir / "sub")}).result(timeout=60)
            assert exe.submit(add, 1, 1).result(timeout=60) == 2

    # ------------------------------------------------------- contract, options
    def test_shutdown_contract(self):
        exe = self.executor()
        assert exe.submit(add, 1, 1).result(timeout=60) == 2
        exe.shutdown()
        exe.shutdown()
        with pytest.raises(RuntimeError, match="after shutdown"):
            exe.submit(add, 1, 1)

    def test_cancel_futures_cancels_queued_calls(self, tmp_path):
        started, release = tmp_path / "started", tmp_path / "release"
        exe = self.executor(max_workers=1, block_allocation=True)
        running = exe.submit(started_then_wait, str(started), str(release), "done")
        queued = [exe.submit(add, i) for i in range(5)]
        wait_for(started)  # however long a worker takes to start here
        exe.shutdown(wait=False, cancel_futures=True)
        release.touch()
        exe.shutdown(wait=True)
        assert running.result(timeout=60) == "done"
        # a busy worker holds one call sent ahead (as ProcessPoolExecutor does): that one runs
        assert sum(not f.cancelled() for f in queued) <= 1
        assert all(f.result(timeout=5) == i for i, f in enumerate(queued) if not f.cancelled())

    def test_resource_dict_validation(self):
        requested = {"cores": 1, "threads_per_core": 2}
        copy = dict(requested)
        with self.executor(max_cores=2) as exe:
            with pytest.raises(ValueError, match="'coress'.*valid keys are: cores"):
                exe.submit(add, 1, resource_dict={"coress": 1})
            with pytest.raises(ValueError, match="positive int"):
                exe.submit(add, 1, resource_dict={"cores": -1})
            with pytest.raises(ValueError, match="max_cores is 2"):
                exe.submit(add, 1, resource_dict={"cores": 3})
            assert exe.submit(add, 1, resource_dict=requested).result(timeout=60) == 1
        assert requested == copy

    def test_block_allocation_rejects_other_resources(self):
        with self.executor(block_allocation=True, max_workers=1) as exe, pytest.raises(
            ValueError, match="block_allocation"
        ):
            exe.submit(add, 1, resource_dict={"threads_per_core": 2})

    def test_threads_env_and_cwd(self, tmp_path):
        target = tmp_path / "made" / "here"
        before = dict(os.environ)
        resources = {"threads_per_core": 2, "env": {"MY_FLAG": "on"}, "cwd": str(target)}
        with self.executor(max_cores=2) as exe:
            seen = exe.submit(environment, "OMP_NUM_THREADS", "MKL_NUM_THREADS", "MY_FLAG",
                              resource_dict=resources).result(timeout=60)
            cwd = exe.submit(where_am_i, resource_dict=resources).result(timeout=60)
        assert seen == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "MY_FLAG": "on"}
        assert os.path.realpath(cwd) == os.path.realpath(target)
        assert dict(os.environ) == before

    def test_max_cores_limits_concurrent_calls(self):
        with self.executor(max_cores=1) as exe:
            spans = [f.result(timeout=60) for f in [exe.submit(interval, 0.5) for _ in range(3)]]
        spans.sort()
        assert all(spans[i][1] <= spans[i + 1][0] for i in range(len(spans) - 1))

    def test_plot_dependency_graph_runs_nothing_and_draws(self, tmp_path):
        target = tmp_path / "graph.png"
        with self.executor(plot_dependency_graph=True, plot_dependency_graph_filename=str(target)) as exe:
            first = exe.submit(die, 1)
            second = exe.submit(add, first, 2)
            assert second.result(timeout=5) is None
        assert target.stat().st_size > 1000

    # -------------------------------------------------- the dead-worker window
    @pytest.mark.parametrize("cores", [1, 2])
    def test_call_sent_while_connection_is_closed_runs_elsewhere(self, tmp_path, cores):
        """With mpiexec or srun, a worker's connection closes a moment before its
        process ends; a call sent then runs on the next worker, the executor goes on.
        (A local serial worker's socket pair has no such window: the executor stops a
        worker as soon as it hangs up, maybe before the call signals ``started``.)"""
        started, release = tmp_path / "started", tmp_path / "release"
        options = {"max_workers": 1, "block_allocation": True, "max_cores": cores,
                   "resource_dict": {"cores": cores}}
        expect = (lambda value: value) if cores == 1 else (lambda value: [value] * cores)
        with self.executor(**options) as exe:
            try:
                lost = exe.submit(lose_connection_then_exit, str(started), str(release))
                deadline = time.monotonic() + 120
                while not (started.exists() or lost.done()):
                    assert time.monotonic() < deadline, "the call neither started nor ended"
                    time.sleep(0.01)
                later = exe.submit(add, 1, 2)  # sent into the closed connection, or queued
                release.touch()
                with pytest.raises(WorkerDiedError):
                    lost.result(timeout=90)
                assert later.result(timeout=90) == expect(3)
                assert exe.submit(add, 2, 2).result(timeout=90) == expect(4)
            finally:
                release.touch()

    # --------------------------------------------------------------------- MPI
    def test_mpi_call_returns_one_result_per_rank(self):
        with self.executor(resource_dict={"cores": 2}, max_cores=2) as exe:
            assert exe.submit(mpi_ranks, 3).result(timeout=90) == [(3, 2, 0), (3, 2, 1)]

    def test_mpi_error_on_one_rank_names_the_rank(self):
        with self.executor(max_cores=2) as exe:
            future = exe.submit(mpi_fail_on_rank_one, resource_dict={"cores": 2})
            with pytest.raises(ValueError, match="rank one says no") as info:
                future.result(timeout=90)
            assert "MPI rank 1 of 2" in str(info.value.__cause__)
