"""Shared test set-up: every test is time-bounded (pytest-timeout, see pyproject.toml)
and must leave no process behind: after each test, the test's child processes and any
new executorlib worker of this test session (wherever it runs: srun steps and orphans
included, recognised by a session marker in their environment) must be gone within a
grace period. Workers of other sessions on the same machine are left alone."""

from __future__ import annotations

import contextlib
import os
import time
import uuid

import psutil
import pytest

_GRACE_S = 15.0
# tests/allocation runs inside a real salloc (scripts/run-allocation-tests), not here;
# tests/flux_instance inside a real Flux instance (flux start, see scripts/run-tests).
collect_ignore = [] if os.environ.get("SLURM_JOB_ID") else ["allocation"]
if not os.environ.get("FLUX_URI"):
    collect_ignore.append("flux_instance")


_SESSION = os.environ.setdefault("EXECUTORLIB_TEST_SESSION", uuid.uuid4().hex)


def _workers() -> set[int]:
    """PIDs of this session's executorlib worker processes on this machine (any parent)."""
    found = set()
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if any("executorlib.backend" in part for part in cmdline):
            with contextlib.suppress(psutil.Error):
                if process.environ().get("EXECUTORLIB_TEST_SESSION") == _SESSION:
                    found.add(process.info["pid"])
    return found


def _leftovers(before: set[int]) -> list[psutil.Process]:
    me = psutil.Process()
    pids = {child.pid for child in me.children(recursive=True)} | (_workers() - before)
    alive = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.fixture(autouse=True)
def no_leftover_processes():
    """Fail a test that leaves child processes or executorlib workers running."""
    before = _workers()
    yield
    deadline = time.monotonic() + _GRACE_S
    while (left := _leftovers(before)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        description = [f"{p.pid}: {' '.join(p.cmdline())[:200]}" for p in left]
        for process in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        pytest.fail("the test left processes running:\n" + "\n".join(description))


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run the test in its own temporary working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def pytest_configure(config):
    # Workers started by tests must find the test modules (functions travel by reference).
    here = os.path.dirname(__file__)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))


class OtherUser:
    """A real second Unix user on this machine, for cross-user security tests."""

    def __init__(self, name: str) -> None:
        import pwd

        entry = pwd.getpwnam(name)
        self.name, self.uid, self.gid, self.home = name, entry.pw_uid, entry.pw_gid, entry.pw_dir

    def run(self, argv: list[str], timeout: float = 60, **kwargs):
        """Run ``argv`` as this user (setpriv: their uid, gid, no supplementary groups)."""
        import subprocess

        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.home}
        env.update(kwargs.pop("env", {}))
        prefix = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--"]
        return subprocess.run(
            prefix + argv, env=env, timeout=timeout, capture_output=True, text=True, **kwargs
        )


@pytest.fixture(scope="session")
def other_user() -> OtherUser:
    """A second Unix user, ``exlib-other``, created with useradd when missing (needs root)."""
    import pwd
    import subprocess

    name = "exlib-other"
    try:
        pwd.getpwnam(name)
    except KeyError:
        if os.geteuid() != 0:
            pytest.skip("cross-user tests create a second Unix user and need root")
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)
    return OtherUser(name)
