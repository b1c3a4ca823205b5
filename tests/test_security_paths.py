"""A worker's import path mirrors the caller's: a module another user planted in a
shared, world-writable working directory is never imported by a worker."""

from __future__ import annotations

import os
import pathlib
import shutil
import sys
import tempfile

import pytest

from executorlib import Executor


def _where_is_zmq() -> str:
    import zmq

    return zmq.__file__


def _sys_path() -> list[str]:
    return list(sys.path)


@pytest.fixture
def shared_dir(monkeypatch, other_user):
    """A sticky, world-writable folder in /tmp holding a zmq.py that another user
    planted; it would create a marker file if it were ever imported. We work in it."""
    shared = pathlib.Path(tempfile.mkdtemp(prefix="exlib-shared-", dir="/tmp"))
    shared.chmod(0o1777)
    marker = shared / "PLANTED-CODE-RAN"
    planted = f"open({str(marker)!r}, 'w').close()\nraise ImportError('planted')\n"
    done = other_user.run(["sh", "-c", f"cat > {shared}/zmq.py", ], input=planted)
    assert done.returncode == 0, done.stderr
    assert (shared / "zmq.py").stat().st_uid == other_user.uid
    monkeypatch.chdir(shared)
    yield shared
    shutil.rmtree(shared)


@pytest.mark.parametrize("block_allocation", [False, True])
def test_a_module_planted_in_the_working_directory_is_not_imported(shared_dir, block_allocation):
    with Executor(max_workers=1, block_allocation=block_allocation) as exe:
        where = exe.submit(_where_is_zmq).result(timeout=60)
        worker_path = exe.submit(_sys_path).result(timeout=60)
    assert not (shared_dir / "PLANTED-CODE-RAN").exists()
    assert not where.startswith(str(shared_dir))
    assert str(shared_dir) not in worker_path and "" not in worker_path


def test_the_callers_import_path_reaches_the_worker(tmp_path, monkeypatch):
    """What the caller can import by name (here a folder it appended), the worker can."""
    package = tmp_path / "mylib"
    package.mkdir()
    (package / "shapes_mod.py").write_text("def area(w, h):\n    return w * h\n")
    monkeypatch.syspath_prepend(str(package))
    import shapes_mod

    with Executor(max_workers=1) as exe:
        assert exe.submit(shapes_mod.area, 3, 4).result(timeout=60) == 12
        assert str(package) in exe.submit(_sys_path).result(timeout=60)
    assert os.getcwd() != str(package)
