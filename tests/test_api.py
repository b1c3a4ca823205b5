"""The public API that existing executorlib 0.x / 1.x scripts call, on the local backend
(the allocation backends: tests/allocation/test_api_allocation.py, tests/test_flux.py)."""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import subprocess
import sys
import threading
import warnings
from concurrent.futures import CancelledError, Future

import pytest
from api_functions import add, fail, pair, split3, total, touch, visible_gpus_of_worker

import executorlib
from executorlib import (
    BaseExecutor,
    Executor,
    FluxClusterExecutor,
    FluxJobExecutor,
    SingleNodeExecutor,
    SlurmClusterExecutor,
    SlurmJobExecutor,
    get_item_from_future,
    split_future,
)
from executorlib.options import SHARED

HERE = os.path.dirname(os.path.abspath(__file__))
_WAIT_S = 60


def _after_callbacks(future: Future) -> threading.Event:
    """An event set once the callbacks registered on ``future`` before it have run."""
    event = threading.Event()
    future.add_done_callback(lambda _: event.set())
    return event


# ------------------------------------------------------------ options in one place
@pytest.mark.parametrize("cls", [SingleNodeExecutor, SlurmJobExecutor, FluxJobExecutor])
def test_help_shows_the_shared_options(cls):
    parameters = inspect.signature(cls).parameters
    for name in SHARED:
        assert name in parameters, name
        assert f"    {name}: " in cls.__doc__, name
    assert "refresh_rate: accepted for compatibility" in cls.__doc__


def test_every_backend_class_is_importable_and_a_base_executor():
    assert executorlib.TestClusterExecutor is executorlib.LocalClusterExecutor
    with Executor(backend="local_submission", cache_directory="unused", plot_dependency_graph=True) as exe:
        assert type(exe) is executorlib.LocalClusterExecutor
        assert isinstance(exe, BaseExecutor) and isinstance(exe, Executor)


def test_unknown_keyword_is_a_type_error_listing_the_options():
    expected = r"unexpected keyword argument 'max_worker'; its options are: .*max_workers"
    with pytest.raises(TypeError, match=expected):
        Executor(max_worker=2)


def test_shared_options_are_built_by_keyword():
    with SingleNodeExecutor(
        max_workers=1, block_allocation=True, disable_dependencies=True, hostname_localhost=True
    ) as exe:
        info = exe.info
    assert (info["block_allocation"], info["disable_dependencies"], info["hostname_localhost"]) == (
        True, True, True,
    )


# ----------------------------------------------- only the backend parameter changes
def test_seed_hpc_allocation_examples_run_unchanged_on_local(tmp_path):
    script = os.path.join(HERE, "seed_scripts", "hpc_allocation.py")
    done = subprocess.run(
        [sys.executable, script, "local", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert [json.loads(line) for line in done.stdout.splitlines()] == [
        {"mpi": [[3, 2, 0], [3, 2, 1]]}, {"preload": 10}, {"threads": [1, "2"]},
        {"dependencies": 6}, {"map": [5, 7, 9]}, {"cache": [2, 4, 6]}, {"cache": [2, 4, 6]},
    ]
    # seven executors got flux_executor_pmi_mode: one warning that says why it is ignored
    assert done.stderr.count("flux_executor_pmi_mode='pmix' is ignored: it chooses the PMI") == 1


@pytest.mark.parametrize("keyword", ["flux_executor_nesting", "flux_log_files", "pysqa_config_directory"])
def test_other_backends_options_are_ignored_with_a_reason(keyword):
    value = "cfg" if keyword == "pysqa_config_directory" else True
    from executorlib import options

    options._WARNED.discard(("SingleNodeExecutor", keyword))
    with pytest.warns(UserWarning, match=rf"SingleNodeExecutor: {keyword}=.* is ignored: only"):
        exe = Executor(**{keyword: value})
    with exe:
        assert exe.submit(add, 1, 2).result(timeout=_WAIT_S) == 3


def test_resource_keys_the_backend_cannot_apply_warn_once_per_executor():
    with Executor() as exe:
        with pytest.warns(UserWarning, match=r"resource_dict\['run_time_max'\]=60 is ignored"):
            first = exe.submit(add, 1, 1, resource_dict={"run_time_max": 60})
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            second = exe.submit(add, 2, 2, resource_dict={"run_time_max": 60})
        assert (first.result(timeout=_WAIT_S), second.result(timeout=_WAIT_S)) == (2, 4)


def test_cluster_executor_takes_block_allocation_false_and_explains_true(tmp_path):
    with SlurmClusterExecutor(
        cache_directory=str(tmp_path), block_allocation=False, plot_dependency_graph=True
    ) as exe:
        assert exe.submit(add, 1, 2).result(timeout=_WAIT_S) is None
    with pytest.raises(NotImplementedError, match=r"block_allocation=True\) would keep long-lived"):
        FluxClusterExecutor(cache_directory=str(tmp_path), block_allocation=True)
    # Slurm has pilot pools (tests/test_pilot.py); in graph mode nothing is submitted
    with SlurmClusterExecutor(
        cache_directory=str(tmp_path), block_allocation=True, plot_dependency_graph=True
    ) as exe:
        assert type(exe).__name__ == "SlurmPilotExecutor" and isinstance(exe, SlurmClusterExecutor)
        assert exe.submit(add, 1, 2).result(timeout=_WAIT_S) is None


def test_cluster_executor_ignores_allocation_options_with_a_reason(tmp_path):
    from executorlib import options

    options._WARNED.discard(("SlurmClusterExecutor", "max_cores"))
    with pytest.warns(UserWarning, match=r"SlurmClusterExecutor: max_cores=4 is ignored: each call"):
        exe = SlurmClusterExecutor(cache_directory=str(tmp_path), max_cores=4, plot_dependency_graph=True)
    with exe:
        assert exe.info["max_cores"] is None and exe.info["queue"] == "Slurm"


# ------------------------------------------------------------- futures of futures
def test_split_future_and_get_item_are_dependencies():
    with Executor() as exe:
        parts = split_future(exe.submit(split3, 10), 3)
        item = get_item_from_future(exe.submit(pair, 5), "d")
        result = exe.submit(total, [*parts, item])
        assert [p.result(timeout=_WAIT_S) for p in parts] == [10, 11, 12]
        assert result.result(timeout=_WAIT_S) == 10 + 11 + 12 + 10


def test_split_future_propagates_errors_wrong_lengths_and_cancels():
    with Executor() as exe:
        failed = split_future(exe.submit(fail, 1), 2)
        with pytest.raises(ValueError, match="failing on purpose with 1"):
            failed[1].result(timeout=_WAIT_S)
        wrong = split_future(exe.submit(split3, 1), 2)
        with pytest.raises(ValueError, match=r"split_future\(\.\.\., n=2\) got a result of 3 items"):
            wrong[0].result(timeout=_WAIT_S)
        missing = get_item_from_future(exe.submit(pair, 1), "x")
        with pytest.raises(KeyError, match="cannot take item 'x'"):
            missing.result(timeout=_WAIT_S)
    never = Future()
    derived = [*split_future(never, 2), get_item_from_future(never, 0)]
    never.cancel()
    assert all(future.cancelled() for future in derived)


def test_batched_results_in_completion_order_with_remainder():
    inputs = [Future() for _ in range(5)]
    with Executor() as exe:
        batches = exe.batched(inputs, 2)
        assert len(batches) == 3
        summed = exe.submit(total, batches[2])
        for value in (4, 0, 3, 1, 2):  # completion order, not list order
            inputs[value].set_result(value * 10)
        assert [b.result(timeout=_WAIT_S) for b in batches] == [[40, 0], [30, 10], [20]]
        assert summed.result(timeout=_WAIT_S) == 20


def test_batched_fails_the_batch_an_error_joins():
    inputs = [Future() for _ in range(4)]
    with Executor() as exe:
        batches = exe.batched(inputs, 2)
    inputs[0].set_result(1)
    inputs[1].set_exception(RuntimeError("input broke"))
    inputs[2].set_result(3)
    inputs[3].set_result(4)
    with pytest.raises(RuntimeError, match="input broke"):
        batches[0].result(timeout=_WAIT_S)
    assert batches[1].result(timeout=_WAIT_S) == [3, 4]


# ------------------------------------------------------------------- len and info
def test_len_counts_calls_not_finished():
    gate = Future()
    with Executor() as exe:
        waiting = exe.submit(add, gate, 1)
        assert len(exe) == 1
        gate.set_result(1)
        assert waiting.result(timeout=_WAIT_S) == 2
        assert len(exe) == 0


def test_info_is_json_with_the_effective_settings():
    with Executor(max_workers=2, block_allocation=True, init_function=dict,
                  resource_dict={"threads_per_core": 1}) as exe:
        info = json.loads(json.dumps(exe.info))
    assert info["backend"] == "local" and info["max_workers"] == 2 and info["max_cores"] == 2
    assert info["init_function"] == "dict" and info["resource_dict"]["threads_per_core"] == 1


# ------------------------------------------------------------- logging and errors
def test_log_obj_size_logs_call_and_result_sizes(caplog):
    caplog.set_level(logging.INFO, logger="executorlib")
    with Executor(log_obj_size=True) as exe:
        future = exe.submit(add, "a" * 10_000, "b")
        logged = _after_callbacks(future)
        assert future.result(timeout=_WAIT_S) == "a" * 10_000 + "b"
        assert logged.wait(_WAIT_S)
    sizes = {m.split(":")[0]: int(re.search(r"(\d+) bytes", m)[1]) for m in caplog.messages}
    assert sizes["call of add"] > 10_000 and sizes["result of add"] > 10_000


def test_error_log_file_gets_function_arguments_and_traceback(tmp_path):
    log = tmp_path / "errors.log"
    with Executor(resource_dict={"error_log_file": str(log)}) as exe:
        ok = exe.submit(add, 1, 2)
        futures = [exe.submit(fail, i, note="tagged") for i in (7, 8)]
        events = [_after_callbacks(f) for f in futures]
        assert ok.result(timeout=_WAIT_S) == 3
        for future, event in zip(futures, events, strict=True):
            with pytest.raises(ValueError):
                future.result(timeout=_WAIT_S)
            assert event.wait(_WAIT_S)
    text = log.read_text()
    assert text.count(" fail failed") == 2 and "add" not in text
    assert "args: (7,)" in text and "kwargs: {'note': 'tagged'}" in text
    assert "ValueError: failing on purpose with 8" in text and "api_functions.py" in text
    assert oct(os.stat(log).st_mode & 0o777) == "0o600"


# ------------------------------------------------------------------------- map
def test_map_takes_future_elements_and_a_future_iterable():
    with Executor() as exe:
        first = exe.submit(add, 1, 1)
        assert list(exe.map(add, [first, 10], [1, first])) == [3, 12]
        listed = exe.submit(split3, 0)
        assert list(exe.map(add, listed, [1, 1, 1])) == [1, 2, 3]


# ----------------------------------------------------------------- graph modes
def test_plot_filename_alone_switches_graph_mode_on(tmp_path):
    pytest.importorskip("networkx")
    marker = tmp_path / "ran"
    with Executor(plot_dependency_graph_filename=str(tmp_path / "graph.png")) as exe:
        assert exe.submit(touch, str(marker)).result(timeout=_WAIT_S) is None
    assert (tmp_path / "graph.png").stat().st_size > 0 and not marker.exists()


def test_export_workflow_is_read_back_by_the_packages_own_loader(tmp_path):
    pytest.importorskip("python_workflow_definition")
    from python_workflow_definition.purepython import load_workflow_json

    def build(exe):
        a = exe.submit(add, 1, y=2)
        p = exe.submit(pair, a)
        b = exe.submit(add, get_item_from_future(p, "s"), get_item_from_future(p, "d"))
        first, second, _ = split_future(exe.submit(split3, b), 3)
        return exe.submit(total, [a, first, second, 4], extra=1)

    filename = str(tmp_path / "wf.json")
    with Executor(export_workflow_filename=filename) as exe:
        assert build(exe).result(timeout=_WAIT_S) is None
    with Executor() as exe:
        expected = build(exe).result(timeout=_WAIT_S)
    assert load_workflow_json(filename) == expected == 3 + 9 + 10 + 4 + 1
    with open(filename) as file:
        kinds = [node["type"] for node in json.load(file)["nodes"]]
    # five calls, a get_list for [a, first, second, 4], a get_item for each split item used
    assert kinds.count("function") == 8 and kinds.count("output") == 1


def test_export_workflow_refuses_what_the_format_cannot_name(tmp_path):
    pytest.importorskip("python_workflow_definition")
    with Executor(export_workflow_filename=str(tmp_path / "wf.json")) as exe:
        with pytest.raises(ValueError, match=r"cannot be named as 'module.function'"):
            exe.submit(lambda x: x, 1)
        with pytest.raises(ValueError, match=r"argument 'x' of add is a object; the workflow format"):
            exe.submit(add, object(), 1)
        exe.submit(add, 1, 2)


# ------------------------------------------------------------------------ GPUs
def test_gpus_per_core_on_local_is_placed_or_refused():
    from executorlib.gpus import visible_gpus

    if not visible_gpus():
        with pytest.raises(ValueError, match=r"needs 1 GPU\(s\), but the local backend finds no GPU"):
            Executor(resource_dict={"gpus_per_core": 1})
        with Executor() as exe, pytest.raises(ValueError, match="finds no GPU"):
            exe.submit(visible_gpus_of_worker, resource_dict={"gpus_per_core": 1})
        return
    gpus = visible_gpus()
    with Executor(max_workers=len(gpus), resource_dict={"gpus_per_core": 1}) as exe:
        seen = [f.result(timeout=_WAIT_S) for f in [exe.submit(visible_gpus_of_worker) for _ in gpus]]
    assert all(s in gpus for s in seen)


def test_gpus_are_taken_from_cuda_visible_devices_one_set_per_running_call(tmp_path):
    script = os.path.join(HERE, "seed_scripts", "local_gpus.py")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "3,5"}
    done = subprocess.run([sys.executable, script, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert sorted(json.loads(done.stdout)["workers"]) == ["3", "5"]


def test_cancelled_input_cancels_its_batch():
    source = Future()
    with Executor() as exe:
        batches = exe.batched([source], 1)
    source.cancel()
    with pytest.raises(CancelledError):
        batches[0].result(timeout=_WAIT_S)
