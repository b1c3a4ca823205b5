"""Fresh local workers forked from the executor's zygote (executorlib/interactive/zygote.py):
each call still gets a fresh process that inherits no other launch's keys and none of
the zygote's sockets; the zygote starts only with an executor of fresh serial workers
and ends with it, or with the caller's process."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

from executorlib import Executor
from executorlib.errors import WorkerDiedError

_MARK = []


def _process_facts() -> dict:
    """This worker: pid, parent, whether it saw an earlier call's state, its key
    variables (environment and original environment block) and socket inodes."""
    seen = bool(_MARK)
    _MARK.append(1)
    with open(f"/proc/{os.getpid()}/environ", "rb") as file:
        block = file.read()
    sockets = _socket_inodes(psutil.Process())
    return {
        "pid": os.getpid(), "ppid": os.getppid(), "seen": seen, "sid": os.getsid(0),
        "keys": os.environ.get("EXECUTORLIB_KEYS"), "block_has_keys": b"EXECUTORLIB_KEYS" in block,
        "sockets": sockets, "cwd": os.getcwd(), "stdin": os.readlink("/proc/self/fd/0"),
    }


def _kill_myself() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _zygotes() -> list[psutil.Process]:
    return [c for c in psutil.Process().children() if "executorlib.backend.zygote" in " ".join(c.cmdline())]


def _the_zygote() -> psutil.Process:
    zygotes = _zygotes()
    assert len(zygotes) == 1, [(p.pid, p.status(), p.cmdline()) for p in zygotes]
    return zygotes[0]


def _socket_inodes(process: psutil.Process) -> set[str]:
    links = set()
    for fd in os.listdir(f"/proc/{process.pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor
            links.add(os.readlink(f"/proc/{process.pid}/fd/{fd}"))
    return {link for link in links if link.startswith("socket:")}


def test_each_call_gets_a_fresh_forked_process_without_keys_or_zygote_sockets(tmp_path):
    with Executor(max_cores=2) as exe:
        facts = [exe.submit(_process_facts).result(timeout=60) for _ in range(4)]
        facts.append(exe.submit(_process_facts, resource_dict={"cwd": str(tmp_path)}).result(timeout=60))
        zygote = _the_zygote()
        zygote_sockets = _socket_inodes(zygote)
        with open(f"/proc/{zygote.pid}/environ", "rb") as file:
            zygote_block = file.read()
    assert len({f["pid"] for f in facts}) == 5 and not any(f["seen"] for f in facts)
    assert all(f["ppid"] == zygote.pid and f["sid"] == f["pid"] for f in facts)
    assert all(f["keys"] is None and not f["block_has_keys"] for f in facts)
    assert b"EXECUTORLIB_KEYS" not in zygote_block
    assert all(not (f["sockets"] & zygote_sockets) for f in facts)
    assert all(f["stdin"] == "/dev/null" for f in facts)
    assert facts[-1]["cwd"] == str(tmp_path)


def test_the_zygote_starts_only_with_an_executor_of_fresh_serial_workers_and_ends_with_it():
    assert _zygotes() == [], "a zygote before any executor"
    with Executor(max_workers=1, block_allocation=True) as exe:
        exe.submit(os.getpid).result(timeout=60)
        assert _zygotes() == [], "a zygote in a block-allocation executor"
    exe = Executor(max_cores=1)
    zygote = _the_zygote()
    exe.submit(os.getpid).result(timeout=60)
    exe.shutdown()
    gone, alive = psutil.wait_procs([zygote], timeout=30)
    assert gone and not alive


def test_a_worker_with_other_interpreter_settings_starts_without_the_zygote():
    """With one core, each such call first stops the forked spare holding it (a spare
    stopped right after its fork must still end: it is in its own session by then)."""
    settings = {"env": {"PYTHONHASHSEED": "7"}}
    with Executor(max_cores=1) as exe:
        for _ in range(3):
            facts = exe.submit(_process_facts, resource_dict=settings).result(timeout=60)
            assert facts["ppid"] == os.getpid() and facts["keys"] is None
            assert exe.submit(_process_facts).result(timeout=60)["ppid"] != os.getpid()


def test_how_a_forked_worker_ended_reaches_the_error():
    with Executor(max_cores=1) as exe:
        with pytest.raises(WorkerDiedError, match="exit code 3"):
            exe.submit(os._exit, 3).result(timeout=60)
        with pytest.raises(WorkerDiedError, match="SIGKILL"):
            exe.submit(_kill_myself).result(timeout=60)
        assert exe.submit(abs, -2).result(timeout=60) == 2


_CALLER = textwrap.dedent("""
    import os, sys, time
    from executorlib import Executor
    exe = Executor(max_cores=1)
    future = exe.submit(time.sleep, 600)
    while not future.running():
        time.sleep(0.05)
    import psutil
    print(*[p.pid for p in psutil.Process().children(recursive=True)], flush=True)
    time.sleep(600)
""")


def test_the_zygote_and_its_workers_die_with_the_callers_process():
    caller = subprocess.Popen([sys.executable, "-c", _CALLER], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(pid) for pid in caller.stdout.readline().split()]
        processes = [psutil.Process(pid) for pid in pids]
        assert len(processes) >= 2  # the zygote and the sleeping worker (maybe spares)
    finally:
        caller.kill()
        caller.wait()
    gone, alive = psutil.wait_procs(processes, timeout=40)  # a worker: within 16 s
    assert not alive


def _descriptor_targets(pid: int) -> set[str]:
    targets = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            targets.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return targets


def test_the_zygote_and_its_workers_hold_no_descriptor_the_caller_left_inheritable():
    """The zygote starts by posix_spawn, which (unlike Popen) passes on every descriptor
    not marked close-on-exec: it closes them itself."""
    read_end, write_end = os.pipe()
    os.set_inheritable(read_end, True)
    os.set_inheritable(write_end, True)
    try:
        leaked = f"pipe:[{os.fstat(read_end).st_ino}]"
        with Executor(max_cores=1) as exe:
            worker_pid = exe.submit(os.getpid).result(timeout=60)
            zygote_fds = _descriptor_targets(_the_zygote().pid)
            worker_fds = exe.submit(_descriptor_targets, "self").result(timeout=60)
        assert worker_pid and leaked not in zygote_fds and leaked not in worker_fds
    finally:
        os.close(read_end)
        os.close(write_end)


def _leave_work_for_the_exit(folder: str) -> None:
    """State that only the worker's interpreter shutdown writes out: an open file kept
    alive (flushed as its module is torn down) and an atexit handler."""
    import atexit
    import builtins

    builtins._executorlib_test_file = open(os.path.join(folder, "kept"), "w")  # noqa: SIM115
    builtins._executorlib_test_file.write("kept open")
    atexit.register(_write, os.path.join(folder, "atexit"), "ran")


def _write(path: str, text: str) -> None:
    with open(path, "w") as file:
        file.write(text)


def test_a_worker_that_ends_still_flushes_its_files_and_runs_its_atexit_handlers(tmp_path):
    """The worker shortens its interpreter's shutdown (gc.freeze after one collection):
    nothing the interpreter's own shutdown would write out may be lost."""
    with Executor(max_cores=1) as exe:
        exe.submit(_leave_work_for_the_exit, str(tmp_path)).result(timeout=60)
    contents = {name: (tmp_path / name).read_text() for name in ("kept", "atexit")}
    assert contents == {"kept": "kept open", "atexit": "ran"}


def _signal_state() -> dict:
    """This worker's SIGCHLD disposition and blocked signals, and whether a child it
    starts is waited for as usual."""
    return {
        "sigchld": signal.getsignal(signal.SIGCHLD),
        "blocked": signal.pthread_sigmask(signal.SIG_BLOCK, []),
        "child": subprocess.run([sys.executable, "-c", "raise SystemExit(3)"], check=False).returncode,
    }


def test_a_forked_worker_gets_the_default_sigchld_handling_not_the_zygotes():
    """The zygote reaps its children in a SIGCHLD handler and blocks SIGCHLD while it
    forks: neither may reach a worker, whose own children would be reaped (and reported)
    by the zygote's handler, or never signalled."""
    with Executor(max_cores=2) as exe:
        states = [exe.submit(_signal_state).result(timeout=60) for _ in range(4)]
        exe.submit(_kill_myself)  # an ended worker is still reported: the next call runs
        states.append(exe.submit(_signal_state).result(timeout=60))
    assert states == [{"sigchld": signal.SIG_DFL, "blocked": set(), "child": 3}] * 5
