"""The HDF5 result cache through the public API: real files, real workers."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from executorlib import Executor, get_cache_data, get_future_from_cache


def record_and_add(marker, a, b=0):
    with open(marker, "a") as file:
        file.write(f"{a},{b}\n")
    return a + b


def record_and_fail(marker):
    with open(marker, "a") as file:
        file.write("ran\n")
    raise ValueError("not cached")


def big_array(n):
    return np.arange(n, dtype=np.float64)


def record_and_make(marker, size):
    record_and_add(marker, size)
    return bytes(range(256)) * (size // 256)


def runs(marker) -> int:
    return len(open(marker).read().splitlines()) if os.path.exists(marker) else 0


def h5_files(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(".h5"))


def test_second_run_is_served_from_files_without_a_worker(tmp_path):
    marker, cache = str(tmp_path / "marker"), str(tmp_path / "cache")
    for _ in range(2):
        with Executor(cache_directory=cache) as exe:
            futures = [exe.submit(record_and_add, marker, i, b=i) for i in range(1, 4)]
            assert [f.result(timeout=60) for f in futures] == [2, 4, 6]
    assert runs(marker) == 3
    assert len(h5_files(cache)) == 3
    assert all(name.startswith("record_and_add_") for name in h5_files(cache))


def test_resolved_dependency_values_make_the_key(tmp_path):
    marker, cache = str(tmp_path / "marker"), str(tmp_path / "cache")
    with Executor(cache_directory=cache) as exe:
        first = exe.submit(record_and_add, marker, 1, 1)
        assert exe.submit(record_and_add, marker, first, 1).result(timeout=60) == 3
        assert exe.submit(record_and_add, marker, 2, 1).result(timeout=60) == 3  # same call
        assert exe.submit(record_and_add, marker, 2, 2).result(timeout=60) == 4
    assert runs(marker) == 3


def one_entry(tmp_path, a: int) -> tuple[str, str, str]:
    """Marker, cache directory and the one file of ``record_and_add(marker, a)``."""
    marker, cache = str(tmp_path / "marker"), str(tmp_path / "cache")
    with Executor(cache_directory=cache) as exe:
        assert exe.submit(record_and_add, marker, a).result(timeout=60) == a
    (name,) = h5_files(cache)
    return marker, cache, os.path.join(cache, name)


def test_corrupt_file_is_reported_recomputed_and_overwritten(tmp_path):
    marker, cache, path = one_entry(tmp_path, 5)
    name = os.path.basename(path)
    with open(path, "r+b") as file:
        file.truncate(os.path.getsize(path) // 2)
    with Executor(cache_directory=cache) as exe, pytest.warns(RuntimeWarning, match=name):
        assert exe.submit(record_and_add, marker, 5).result(timeout=60) == 5
    assert runs(marker) == 2
    with Executor(cache_directory=cache) as exe:
        assert exe.submit(record_and_add, marker, 5).result(timeout=60) == 5
    assert runs(marker) == 2


def test_errors_are_not_cached(tmp_path):
    marker, cache = str(tmp_path / "marker"), str(tmp_path / "cache")
    for _ in range(2):
        with Executor(cache_directory=cache) as exe, pytest.raises(ValueError, match="not cached"):
            exe.submit(record_and_fail, marker).result(timeout=60)
    assert runs(marker) == 2
    assert h5_files(cache) == []


def test_cache_key_names_the_file_and_get_future_from_cache(tmp_path):
    marker, cache = str(tmp_path / "marker"), str(tmp_path / "cache")
    with Executor(cache_directory=cache) as exe:
        future = exe.submit(record_and_add, marker, 2, 3, resource_dict={"cache_key": "five"})
        assert future.result(timeout=60) == 5
        with pytest.raises(ValueError, match="plain file name"):
            exe.submit(record_and_add, marker, 1, resource_dict={"cache_key": "../b"}).result(timeout=60)
    assert h5_files(cache) == ["five.h5"]
    assert get_future_from_cache(cache, "five").result(timeout=0) == 5
    with pytest.raises(FileNotFoundError, match="no cached result 'six'"):
        get_future_from_cache(cache, "six")


def test_get_cache_data_is_ready_for_pandas(tmp_path):
    pandas = pytest.importorskip("pandas")
    marker, cache = str(tmp_path / "marker"), str(tmp_path / "cache")
    with Executor(cache_directory=cache) as exe:
        assert exe.submit(record_and_add, marker, 1, b=2).result(timeout=60) == 3
        assert exe.submit(big_array, 200_000).result(timeout=60).sum() == sum(range(200_000))
    frame = pandas.DataFrame(get_cache_data(cache)).sort_values("function")
    assert list(frame["function"]) == ["big_array", "record_and_add"]
    row = frame.iloc[1]
    assert row["args"] == (marker, 1) and row["kwargs"] == {"b": 2} and row["result"] == 3
    assert row["input_args"] == (marker, 1) and row["input_kwargs"] == {"b": 2} and row["output"] == 3
    assert row["queue_id"] is None  # not a queue job
    assert row["error"] is None and row["runtime"] > 0 and row["resources"]["cores"] == 1
    assert os.path.basename(row["filename"]).startswith("record_and_add_")
    assert np.array_equal(frame.iloc[0]["result"], big_array(200_000))  # > 1 MiB


SCRIPT = """
import os, sys
from executorlib import Executor

SCALE = 10

def scaled(marker, values, options):
    with open(marker, "a") as file:
        file.write("ran\\n")
    return max(map(len, values)) * SCALE + options["offset"]

if __name__ == "__main__":
    marker, cache = sys.argv[1], sys.argv[2]
    with Executor(cache_directory=cache) as exe:
        future = exe.submit(scaled, marker, {"x", "yy", "zzz"}, {"offset": 1})
        words = exe.submit(lambda s: "".join(sorted(s)), {"alpha", "beta", "gamma", "delta"})
        print(future.result(), words.result())
"""


@pytest.mark.timeout(120)
def test_key_is_stable_across_processes_for_main_functions(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    marker, cache = str(tmp_path / "marker"), str(tmp_path / "cache")
    for seed in ("1", "2"):  # different str hashes: set order differs between the runs
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, str(script), marker, cache], env=env,
                              capture_output=True, text=True, timeout=100)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["31", "alphabetadeltagamma"]
    assert runs(marker) == 1
    assert len(h5_files(cache)) == 2


class Adder:
    """A callable object: its key must not hold its memory address."""

    def __init__(self, offset):
        self.offset = offset

    def __call__(self, marker, a):
        return record_and_add(marker, a, self.offset)


def test_partial_and_callable_objects_hit_the_cache(tmp_path):
    marker, cache = str(tmp_path / "marker"), str(tmp_path / "cache")
    kept = []  # alive, so each round's objects live at new addresses
    for _ in range(2):
        kept += [functools.partial(record_and_add, marker, b=1), Adder(2)]
        with Executor(cache_directory=cache) as exe:
            assert exe.submit(kept[-2], 1).result(timeout=60) == 2
            assert exe.submit(kept[-1], marker, 1).result(timeout=60) == 3
    assert runs(marker) == 2
    assert sorted(name.split("_")[0] for name in h5_files(cache)) == ["Adder", "record"]


def test_cache_key_per_call_with_block_allocation(tmp_path):
    marker, cache = str(tmp_path / "marker"), str(tmp_path / "cache")
    for _ in range(2):
        with Executor(max_workers=1, block_allocation=True, cache_directory=cache) as exe:
            future = exe.submit(record_and_add, marker, 2, 3, resource_dict={"cache_key": "five"})
            assert future.result(timeout=60) == 5
    assert runs(marker) == 1 and h5_files(cache) == ["five.h5"]


def test_cache_key_with_sub_directories(tmp_path):
    marker, cache = str(tmp_path / "marker"), tmp_path / "cache"
    for _ in range(2):
        with Executor(cache_directory=str(cache)) as exe:
            future = exe.submit(record_and_add, marker, 1, 2, resource_dict={"cache_key": "run1/step3"})
            assert future.result(timeout=60) == 3
            for bad in ("../outside", "run1/.hidden", "jobs/x", "/absolute"):
                with pytest.raises(ValueError, match="plain file name"):
                    exe.submit(record_and_add, marker, 1, resource_dict={"cache_key": bad}).result(timeout=60)
    assert runs(marker) == 1
    assert (cache / "run1" / "step3.h5").is_file() and oct((cache / "run1").stat().st_mode & 0o777) == "0o700"
    assert get_future_from_cache(str(cache), "run1/step3").result(timeout=0) == 3
    (row,) = get_cache_data(str(cache))
    assert row["filename"] == str(cache / "run1" / "step3.h5") and row["output"] == 3


def test_a_small_entry_is_plain_hdf5_with_its_index_in_the_user_block(tmp_path):
    h5py = pytest.importorskip("h5py")
    _, _, path = one_entry(tmp_path, 3)
    with h5py.File(path, "r") as file:
        assert file.userblock_size >= 512 and list(file.attrs) == ["blobs"]
        packed = file.attrs["blobs"].tobytes()
    raw = pathlib.Path(path).read_bytes()
    assert raw.startswith(b"executorlib cache file\n")
    index = json.loads(raw.splitlines()[1])
    assert index["name"] == "record_and_add" and index["runtime"] > 0
    start, length = index["blobs"]["result"]
    assert pickle.loads(packed[start:start + length]) == 3


def test_an_entry_changed_after_writing_is_reported_and_recomputed(tmp_path):
    marker, cache, path = one_entry(tmp_path, 7)
    raw = bytearray(pathlib.Path(path).read_bytes())
    index = json.loads(bytes(raw).splitlines()[1])
    start, length = index["blobs"]["result"]
    raw[index["base"] + start + length - 2] ^= 0xFF  # inside the pickled result
    with open(path, "r+b") as file:
        file.write(raw)
    with Executor(cache_directory=cache) as exe, pytest.warns(RuntimeWarning, match="digest"):
        assert exe.submit(record_and_add, marker, 7).result(timeout=60) == 7
    assert runs(marker) == 2


def test_a_cache_directory_removed_while_the_executor_runs_is_made_again(tmp_path):
    marker, cache = str(tmp_path / "marker"), tmp_path / "cache"
    with Executor(cache_directory=str(cache)) as exe:
        assert exe.submit(record_and_add, marker, 1).result(timeout=60) == 1
        shutil.rmtree(cache)
        assert exe.submit(record_and_add, marker, 2).result(timeout=60) == 2
        assert exe.submit(record_and_add, marker, 2).result(timeout=60) == 2
    assert runs(marker) == 2 and len(h5_files(cache)) == 1
    assert oct(cache.stat().st_mode & 0o777) == "0o700"


@pytest.mark.parametrize("size", [256, 40 * 1024, 1024 * 1024 - 1024, 1024 * 1024 + 4096])
def test_results_of_every_size_are_served_again(tmp_path, size):
    """Around both layouts' limits: an attribute, a dataset, packed just under 1 MiB,
    one object per blob above."""
    marker, cache = str(tmp_path / "marker"), str(tmp_path / "cache")
    expected = bytes(range(256)) * (size // 256)
    for _ in range(2):
        with Executor(cache_directory=cache) as exe:
            assert exe.submit(record_and_make, marker, size).result(timeout=60) == expected
    assert runs(marker) == 1
