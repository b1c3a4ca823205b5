"""From a laptop over SSH (issue 14), through real OpenSSH servers on the test cluster.

``scripts/ssh-test-hosts`` runs sshd in namespace node n1 (the login node: it has the
Slurm commands) and n2 (the gateway); n1 accepts ssh only from n2, so every test
reaches the login node through the jump host. Keys and known_hosts are made per test
session. The "remote Python" is a small wrapper around this machine's Python whose
import path holds this checkout and the tests (the cluster side needs the functions'
modules, as a real cluster would need them installed); it also points the agent's
private socket directory at this session's own folder, so the checks below see only
this session's processes (agent, bridge, a pilot pool's guardian and worker jobs: they
inherit it), and passes on the test session's marker, so conftest's check of workers
covers the cluster side too. After every test, no such process (on the login node n1 or
elsewhere) and no Slurm job of the test is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import CancelledError, as_completed
from pathlib import Path

import psutil
import pytest

from executorlib import SingleNodeExecutor, SlurmClusterExecutor
from executorlib.errors import RemoteTraceback

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "ssh-test-hosts"
_WAIT_S = 240.0  # generous: on a shared test cluster a job may queue behind others

pytestmark = pytest.mark.skipif(shutil.which("sbatch") is None, reason="needs the Slurm test cluster")


# ---------------------------------------------------------------- functions run remotely
def add(a, b):
    return a + b


def where():
    return socket.gethostname(), os.environ.get("SLURM_JOB_ID")


def wait_for(flag, started, value):
    """Say it started, then hold until the test creates ``flag`` (no timing involved)."""
    Path(started).touch()
    deadline = time.monotonic() + 300
    while not os.path.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.1)
    return value


def fail_here(text):
    raise KeyError(text)


def mpi_ranks():
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()


# ---------------------------------------------------------------- fixtures
class Hosts:
    """The test ssh set-up: how to reach the login node through the gateway."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.config = directory / "ssh_config"
        self.python = directory / "python"
        self.run = directory / "run"

    def options(self, **extra):
        return {"ssh": "login", "remote_python": str(self.python),
                "ssh_args": ("-F", str(self.config)), **extra}

    def agents(self) -> list[psutil.Process]:
        """This session's executorlib processes on the cluster side: agents, bridges,
        pilot guardians and workers, on n1 or any node (one process table here)."""
        found = []
        for process in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(process.info["cmdline"] or [])
            if "executorlib" in cmdline:
                with contextlib.suppress(psutil.Error):
                    if process.environ().get("XDG_RUNTIME_DIR") == str(self.run):
                        found.append(process)
        return found

    def agent(self) -> psutil.Process:
        """The one agent running now (started through ssh on n1)."""
        (agent,) = [p for p in self.agents() if "executorlib.remote.agent" in " ".join(p.cmdline())]
        return agent

    def agent_state(self, agent: psutil.Process) -> str:
        """The agent's own account of its sessions (``kill -USR2``: a line in its log)."""
        socket_path = next(arg for arg in agent.cmdline() if arg.endswith(".sock"))
        log = Path(socket_path[: -len(".sock")] + ".log")
        before = log.read_text().count("\n")
        agent.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 60
        while (lines := log.read_text().splitlines())[before:] == [] and time.monotonic() < deadline:
            time.sleep(0.05)
        return next(line for line in lines[before:] if line.startswith(f"agent {agent.pid}:"))


def _node_of(process: psutil.Process) -> str:
    """The namespace node whose network a process lives in (as ``ip netns exec`` sees it)."""
    net = os.stat(f"/proc/{process.pid}/ns/net").st_ino
    return next((n for n in ("n1", "n2") if os.stat(f"/run/netns/{n}").st_ino == net), "vm")


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    if not Path("/run/netns/n1").exists():
        pytest.fail("namespace nodes missing: scripts/slurm-test-cluster start --nodes 2")
    directory = tmp_path_factory.mktemp("ssh")
    subprocess.run([str(SCRIPT), "start", str(directory)], check=True, timeout=300)
    found = Hosts(directory)
    found.run.mkdir(mode=0o700)
    found.python.write_text(
        "#!/bin/sh\n"
        f"export PYTHONPATH='{REPO}:{REPO / 'tests'}' XDG_RUNTIME_DIR='{found.run}' "
        f"EXECUTORLIB_TEST_SESSION='{os.environ['EXECUTORLIB_TEST_SESSION']}'\n"
        f"exec '{sys.executable}' \"$@\"\n"
    )
    found.python.chmod(0o755)
    try:
        yield found
    finally:
        subprocess.run([str(SCRIPT), "stop", str(directory)], check=False, timeout=60)


@pytest.fixture
def remote(hosts, tmp_path):
    """The hosts; afterwards: no agent/bridge and no Slurm job of this test remains."""
    yield hosts
    deadline = time.monotonic() + _WAIT_S
    while (left := hosts.agents() or _jobs_under(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:
        where = []
        for process in hosts.agents():
            with contextlib.suppress(psutil.Error, OSError):
                where.append(f"{process.pid} on {_node_of(process)}: {' '.join(process.cmdline())[-120:]}")
                process.kill()
        subprocess.run(["scancel", *[line.split()[0] for line in _jobs_under(tmp_path)]], check=False)
        pytest.fail(f"left behind on the cluster side: {where or left}")


def _jobs_under(directory: Path) -> list[str]:
    """The test's jobs in squeue: their command or output file lies under ``directory``
    (a pilot pool's worker jobs get their script on stdin; their output goes there)."""
    out = subprocess.run(["squeue", "-h", "-O", "JobID:20,Command:1000,StdOut:1000"],
                         capture_output=True, text=True, timeout=30).stdout
    return [" ".join(line.split()) for line in out.splitlines() if str(directory) in line]


def _wait_file(path: Path) -> None:
    deadline = time.monotonic() + _WAIT_S
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {_WAIT_S} s"
        time.sleep(0.1)


def _ssh_children() -> list[psutil.Process]:
    """The ssh clients this process started (not their ProxyJump helpers)."""
    return [p for p in psutil.Process().children() if p.name() == "ssh"]


# ---------------------------------------------------------------- the tests
@pytest.mark.timeout(480)
def test_submission_mode_with_dependencies_through_the_gateway(remote, tmp_path):
    with SlurmClusterExecutor(**remote.options(cache_directory=str(tmp_path / "cache"),
                                               resource_dict={"partition": "multi"})) as exe:
        first = exe.submit(add, 1, 2)
        second = exe.submit(add, first, 10)  # resolved on the cluster (afterok)
        third = exe.submit(add, [first.result()], [second])
        host, job_id = exe.submit(where).result(timeout=300)
        assert second.result(timeout=300) == 13
        assert third.result(timeout=300) == [3, 13]
    assert host in ("n1", "n2") and job_id  # ran as a Slurm job on the namespace nodes
    assert len(list((tmp_path / "cache" / "jobs").glob("*.job"))) == 4


@pytest.mark.timeout(480)
@pytest.mark.parametrize("where_it_runs", ["slurm job", "login node"])
def test_a_killed_ssh_connection_loses_nothing(remote, tmp_path, where_it_runs):
    """Queue jobs outlive the agent; login-node calls live in the agent, which keeps
    their results for the client's return."""
    flag, started = tmp_path / "go", tmp_path / "started"
    if where_it_runs == "slurm job":
        executor = SlurmClusterExecutor(**remote.options(cache_directory=str(tmp_path / "cache")))
    else:
        executor = SingleNodeExecutor(**remote.options())
    with executor as exe:
        held = exe.submit(wait_for, str(flag), str(started), "held")
        try:
            _wait_file(started)  # the job is running on the cluster
            (before,) = _ssh_children()
            before.kill()
            later = exe.submit(add, 20, 22)  # submitted while the connection is down
        finally:
            flag.touch()  # also when the test fails: let the job end
        assert held.result(timeout=300) == "held"
        assert later.result(timeout=300) == 42
        assert [p.pid for p in _ssh_children()] != [before.pid]  # a new connection


@pytest.mark.timeout(480)
def test_a_rerun_after_a_killed_notebook_reattaches(remote, tmp_path):
    flag, started, cache = tmp_path / "go", tmp_path / "started", tmp_path / "cache"
    cells = (
        f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]\n"
        "from executorlib import SlurmClusterExecutor\n"
        "from test_ssh import add, wait_for\n"
        f"exe = SlurmClusterExecutor(ssh='login', remote_python={str(remote.python)!r}, "
        f"ssh_args=('-F', {str(remote.config)!r}), cache_directory={str(cache)!r})\n"
        f"held = exe.submit(wait_for, {str(flag)!r}, {str(started)!r}, 5)\n"
        "total = exe.submit(add, held, 1)\n"
    )
    notebook = subprocess.Popen([sys.executable, "-c", cells + "import time; time.sleep(600)\n"])
    try:
        _wait_file(started)
        jobs = sorted(p.read_text() for p in (cache / "jobs").glob("*.job"))
        assert len(jobs) == 2
    except BaseException:
        flag.touch()
        raise
    finally:
        notebook.send_signal(signal.SIGKILL)  # the kernel dies without a word
        notebook.wait()
    namespace: dict = {}
    try:
        exec(cells, namespace)  # the same cells, re-run in a new "kernel"
    finally:
        flag.touch()
    with namespace["exe"] as exe:
        assert namespace["total"].result(timeout=300) == 6
        assert exe.submit(add, namespace["held"], 0).result(timeout=300) == 5
    found = sorted(p.read_text() for p in (cache / "jobs").glob("*.job"))
    assert set(jobs) <= set(found) and len(found) == 3  # the first two jobs were found again


@pytest.mark.timeout(120)
def test_the_login_node_executor(remote):
    # The login node by address with ssh_gateway= (-J), not through the config's alias;
    # two long-lived workers there: a process per call is slow on a busy node.
    options = remote.options(ssh="root@10.77.0.11", ssh_gateway="gateway", block_allocation=True,
                             max_workers=2)
    with SingleNodeExecutor(**options) as exe:
        host, _ = exe.submit(where).result(timeout=60)
        chain = exe.submit(add, exe.submit(add, 1, 1), 40)
        failing = exe.submit(fail_here, "broken on purpose")
        awaited = asyncio.run(_await(exe.submit(add, 2, 3)))
        done = [f.result() for f in as_completed([exe.submit(add, i, i) for i in range(10)], timeout=60)]
        assert chain.result(timeout=60) == 42
        with pytest.raises(KeyError, match="broken on purpose") as raised:
            failing.result(timeout=60)
    assert host == "n1"
    assert awaited == 5 and sorted(done) == [2 * i for i in range(10)]
    assert isinstance(raised.value.__cause__, RemoteTraceback)
    assert "fail_here" in raised.value.__cause__.text


async def _await(future):
    return await asyncio.wrap_future(future)


@pytest.mark.timeout(480)
def test_a_pilot_pool_through_ssh(remote, tmp_path):
    """The agent on n1 runs a pilot pool whose worker jobs run on n2 and connect back to
    n1's address; a killed connection loses nothing; the pool's jobs and processes end."""
    flag, started = tmp_path / "go", tmp_path / "started"
    # Not on n1 itself: the workers must reach the agent's executor over the network.
    # Our own job name: other sessions' pilot tests clean up jobs named executorlib-pilot.
    pool = {"partition": "multi", "slurm_cmd_args": ["--exclude=n1", "--job-name=executorlib-ssh-test"]}
    with SlurmClusterExecutor(**remote.options(block_allocation=True, max_workers=2, resource_dict=pool,
                                               cache_directory=str(tmp_path / "cache"))) as exe:
        held = exe.submit(wait_for, str(flag), str(started), 5)
        chain = exe.submit(add, exe.submit(add, held, 1), 10)  # resolved in the agent
        try:
            _wait_file(started)  # a worker job runs on n2 and reached the agent on n1
            agent = remote.agent()
            assert _node_of(agent) == "n1"
            (before,) = _ssh_children()
            before.kill()
            later = exe.submit(add, 20, 22)  # submitted while the connection is down
        finally:
            flag.touch()
        assert held.result(timeout=300) == 5 and chain.result(timeout=300) == 16
        assert later.result(timeout=300) == 42
        hosts = {exe.submit(where).result(timeout=300)[0] for _ in range(4)}
        assert [p.pid for p in _ssh_children()] != [before.pid]  # a new connection
    assert hosts == {"n2"}
    # the remote fixture checks that no worker job, guardian, agent or bridge is left


@pytest.mark.timeout(180)
def test_the_agent_forgets_outcomes_the_laptop_has(remote):
    """Results delivered (and acknowledged) are not kept by the agent: a long session does
    not grow. A later call that depends on such a result still gets it."""
    with SingleNodeExecutor(**remote.options(block_allocation=True, max_workers=2)) as exe:
        first = exe.submit(add, 1, 2)
        many = [exe.submit(add, i, 1) for i in range(50)]
        assert [f.result(timeout=60) for f in many] == list(range(1, 51))
        assert first.result(timeout=60) == 3
        agent = remote.agent()
        deadline = time.monotonic() + 60
        while "0 calls kept" not in (state := remote.agent_state(agent)):
            assert time.monotonic() < deadline, state  # the acks never arrived
        assert exe.submit(add, first, 1).result(timeout=60) == 4  # first's value comes from here


@pytest.mark.timeout(180)
def test_cancel_of_a_running_login_node_call_says_false(remote, tmp_path):
    """As concurrent.futures: cancel() of a call that runs returns False and the call
    finishes; a call still queued behind it is cancelled and never runs."""
    flag, started, second = tmp_path / "go", tmp_path / "started", tmp_path / "second"
    # One process per call, one at a time (a pool of one worker would take the second call
    # ahead, which then counts as running, as in the standard library's process pool).
    with SingleNodeExecutor(**remote.options(max_workers=1)) as exe:
        held = exe.submit(wait_for, str(flag), str(started), "held")
        queued = exe.submit(wait_for, str(flag), str(second), "queued")
        try:
            _wait_file(started)
            assert held.cancel() is False
            assert held.running() and not held.cancelled()
            assert queued.cancel() is True
            assert queued.cancelled()
        finally:
            flag.touch()
        assert held.result(timeout=60) == "held"
        assert exe.submit(add, 1, 1).result(timeout=60) == 2  # the worker is free again
    assert not second.exists()  # the queued call never started


@pytest.mark.timeout(480)
def test_an_mpi_call_in_submission_mode(remote, tmp_path):
    with SlurmClusterExecutor(**remote.options(cache_directory=str(tmp_path / "cache"))) as exe:
        ranks = exe.submit(mpi_ranks, resource_dict={"cores": 2}).result(timeout=300)
    assert sorted(ranks) == [(0, 2), (1, 2)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("known", ["unknown", "changed"])
def test_an_unknown_or_changed_host_key_is_refused(remote, tmp_path, known):
    lines = (remote.directory / "known_hosts").read_text().splitlines()
    gateway = [line for line in lines if line.startswith("10.77.0.12 ")]
    login = []
    if known == "changed":  # someone else's key for the login node's address
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True)
        login = ["10.77.0.11 " + " ".join((tmp_path / "k.pub").read_text().split()[:2])]
    (tmp_path / "known_hosts").write_text("\n".join(gateway + login) + "\n")
    config = tmp_path / "ssh_config"
    config.write_text(remote.config.read_text().replace(str(remote.directory / "known_hosts"),
                                                       str(tmp_path / "known_hosts")))
    with pytest.raises(ConnectionError, match="host key") as raised:
        SingleNodeExecutor(**remote.options(ssh_args=("-F", str(config))))
    assert "login" in str(raised.value)
    assert "10.77.0.11" not in (tmp_path / "known_hosts").read_text() or known == "changed"


@pytest.mark.timeout(120)
def test_a_remote_python_without_executorlib_is_refused(remote):
    with pytest.raises(ModuleNotFoundError, match="executorlib is not installed for /usr/bin/python3"):
        SingleNodeExecutor(**remote.options(remote_python="/usr/bin/python3"))


@pytest.mark.timeout(120)
def test_a_remote_python_of_another_minor_version_is_refused(remote):
    other = next((p for p in sorted(Path("/root/.pyenv/versions").glob("3.*/bin/python3"))
                  if not p.parent.parent.name.startswith(f"3.{sys.version_info[1]}.")), None)
    if other is None:
        pytest.skip("no Python of another minor version on this machine")
    with pytest.raises(RuntimeError, match=r"Python 3\.\d+ at .* but Python 3\.\d+ here") as raised:
        SingleNodeExecutor(**remote.options(remote_python=str(other)))
    assert f"{sys.version_info[0]}.{sys.version_info[1]}" in str(raised.value)


@pytest.mark.timeout(120)
def test_options_the_agent_refuses_fail_at_construction(remote, tmp_path):
    with pytest.raises(ValueError, match="refused 'slurm_submission'.*no_such_key"):
        SlurmClusterExecutor(**remote.options(cache_directory=str(tmp_path / "cache"),
                                              resource_dict={"no_such_key": 1}))


@pytest.mark.timeout(120)
def test_a_socket_directory_planted_by_another_user_is_refused(remote, tmp_path, other_user):
    runtime = tmp_path / "xdg"
    planted = runtime / "executorlib"
    planted.mkdir(parents=True)
    planted.chmod(0o777)
    os.chown(planted, other_user.uid, other_user.gid)  # as if they had made it first
    python = tmp_path / "python"
    python.write_text(remote.python.read_text().replace(str(remote.run), str(runtime)))
    python.chmod(0o755)
    with pytest.raises(ConnectionError, match="not a private directory") as raised:
        SingleNodeExecutor(**remote.options(remote_python=str(python)))
    assert str(planted) in str(raised.value)
    assert list(planted.iterdir()) == []  # no socket, lock or log was put there


@pytest.mark.timeout(180)
def test_executorlib_hello_over_ssh(remote):
    argv = [sys.executable, "-m", "executorlib.cli", "hello", "--ssh", "login",
            "--remote-python", str(remote.python), "--ssh-arg=-F", f"--ssh-arg={remote.config}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=170,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "host n1" in done.stdout and "ranks 0, 1 of 2 on n1" in done.stdout


@pytest.mark.timeout(480)
def test_cancelling_from_the_laptop_cancels_the_job(remote, tmp_path):
    flag, started = tmp_path / "never", tmp_path / "started"
    with SlurmClusterExecutor(**remote.options(cache_directory=str(tmp_path / "cache"))) as exe:
        held = exe.submit(wait_for, str(flag), str(started), "held")
        after = exe.submit(add, held, 1)
        try:
            _wait_file(started)  # the job runs on the cluster
            assert held.cancel()
        finally:
            if not held.cancelled():
                flag.touch()
        with pytest.raises(CancelledError):
            after.result(timeout=300)  # cancelled on the cluster, as its input was
    # the remote fixture checks that the job left the queue (scancel) without the flag
