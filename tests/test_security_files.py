"""Files on a shared machine: another user can neither make us unpickle their data (a
cache directory they own or can write, a planted entry), nor make us write through a
planted symlink, nor read what we store; ``executorlib status`` never unpickles, never
blocks on a FIFO; job scripts quote every value. Cross-user cases use a real second
Unix user (``other_user``); job scripts run on the real Slurm test cluster."""

from __future__ import annotations

import os
import pathlib
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest

from executorlib import Executor, SlurmClusterExecutor, get_future_from_cache
from executorlib.files import KEY_FILE_VARIABLE, UntrustedFileError
from executorlib.h5file import write_file
from executorlib.queue import SubmissionError
from executorlib.submission import LocalClusterExecutor

REPO = pathlib.Path(__file__).resolve().parent.parent


def add(a, b):
    return a + b


def count_and_add(marker, a, b):
    with open(marker, "a") as file:
        file.write("ran\n")
    return a + b


class _Touch:
    """Unpickling this creates ``path``: the stand-in for code an attacker runs as us."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def poisoned_entry(path: pathlib.Path, marker: pathlib.Path, blob: str = "result") -> None:
    """A well-formed cache file whose ``blob`` runs code (creates ``marker``) when unpickled."""
    import pickle

    blobs = {blob: pickle.dumps(_Touch(str(marker)))}
    write_file(str(path), blobs, "add")


@pytest.fixture
def shared_tmp():
    """A sticky, world-writable folder in /tmp (like /tmp itself), removed afterwards."""
    shared = pathlib.Path(tempfile.mkdtemp(prefix="exlib-files-", dir="/tmp"))
    shared.chmod(0o1777)
    yield shared
    shutil.rmtree(shared)


@pytest.fixture
def their_cache(shared_tmp, other_user, tmp_path):
    """A cache directory the other user created and filled with a poisoned entry."""
    marker = shared_tmp / "POISON-RAN"
    poisoned_entry(tmp_path / "poisoned.h5", marker)
    cache = shared_tmp / "cache"
    done = other_user.run(["sh", "-c", f"mkdir -m 755 {cache} && cat > {cache}/poisoned.h5"],
                          input=(tmp_path / "poisoned.h5").read_bytes().decode("latin-1"),
                          encoding="latin-1")
    assert done.returncode == 0, done.stderr
    assert cache.stat().st_uid == other_user.uid
    return cache, marker


# ------------------------------------------------------------ cache poisoning
def test_a_cache_directory_of_another_user_is_refused(their_cache, other_user):
    cache, marker = their_cache
    for make in (lambda: Executor(cache_directory=str(cache)),
                 lambda: LocalClusterExecutor(cache_directory=str(cache))):
        with pytest.raises(UntrustedFileError) as info, make() as exe:
            exe.submit(add, 1, 2, resource_dict={"cache_key": "poisoned"}).result(timeout=60)
        message = str(info.value)
        assert str(cache) in message and other_user.name in message
        assert KEY_FILE_VARIABLE in message and "a directory of your own" in message
    with pytest.raises(UntrustedFileError, match="owned by exlib-other"):
        get_future_from_cache(str(cache), "poisoned")
    assert not marker.exists()


def test_a_directory_others_can_write_is_refused_and_planted_entries_never_load(
        shared_tmp, other_user, tmp_path):
    cache, marker = shared_tmp / "mine", shared_tmp / "POISON-RAN"
    cache.mkdir()
    cache.chmod(0o777)  # ours, but anyone may plant a file in it
    poisoned_entry(tmp_path / "poisoned.h5", marker)
    planted = other_user.run(["sh", "-c", f"cat > {cache}/poisoned.h5"],
                             input=(tmp_path / "poisoned.h5").read_bytes().decode("latin-1"),
                             encoding="latin-1")
    assert planted.returncode == 0, planted.stderr
    with pytest.raises(UntrustedFileError, match=r"drwxrwxrwx.*chmod go-w"):
        Executor(cache_directory=str(cache))
    cache.chmod(0o700)  # the fix the message gives: now the planted file itself is refused
    refused = pytest.warns(RuntimeWarning, match="owned by exlib-other")
    with Executor(cache_directory=str(cache)) as exe, refused:
        assert exe.submit(add, 1, 2, resource_dict={"cache_key": "poisoned"}).result(timeout=60) == 3
    assert not marker.exists()
    assert (cache / "poisoned.h5").stat().st_uid == os.geteuid()  # recomputed, ours now


def _key_file(directory: pathlib.Path, mode: int = 0o600) -> pathlib.Path:
    key = directory / "team.key"
    key.write_bytes(os.urandom(32))
    key.chmod(mode)
    return key


def test_a_shared_cache_serves_only_entries_authenticated_with_the_key(
        shared_tmp, other_user, tmp_path, monkeypatch):
    cache, marker, runs = shared_tmp / "team", shared_tmp / "POISON-RAN", tmp_path / "runs"
    cache.mkdir()
    cache.chmod(0o777)
    monkeypatch.setenv(KEY_FILE_VARIABLE, str(_key_file(tmp_path)))
    for _ in range(2):  # the second run is served from the authenticated entries
        with Executor(cache_directory=str(cache)) as exe:
            assert exe.submit(count_and_add, str(runs), 1, 2).result(timeout=60) == 3
    assert runs.read_text().split() == ["ran"]
    (ours,) = cache.glob("count_and_add_*.h5")
    # The other user swaps our authenticated entry for a poisoned one of the same name.
    poisoned_entry(tmp_path / "poisoned.h5", marker)
    swapped = other_user.run(["sh", "-c", f"cat > {cache}/new && mv -f {cache}/new {ours}"],
                             input=(tmp_path / "poisoned.h5").read_bytes().decode("latin-1"),
                             encoding="latin-1")
    assert swapped.returncode == 0, swapped.stderr
    with Executor(cache_directory=str(cache)) as exe, pytest.warns(RuntimeWarning, match="not authenticated"):
        assert exe.submit(count_and_add, str(runs), 1, 2).result(timeout=60) == 3
    assert not marker.exists()
    assert runs.read_text().split() == ["ran", "ran"]
    with pytest.raises(ValueError, match="submission mode keeps each call's job files private"):
        LocalClusterExecutor(cache_directory=str(cache))


def test_a_key_file_others_can_read_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_FILE_VARIABLE, str(_key_file(tmp_path, 0o644)))
    cache = tmp_path / "team"
    cache.mkdir()
    cache.chmod(0o770)
    with pytest.raises(UntrustedFileError, match=r"only you\s+can read.*chmod 600"):
        Executor(cache_directory=str(cache))


# ------------------------------------------------------------ temporary files
def test_a_symlink_at_the_old_temporary_name_is_never_followed(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("precious data\n")
    cache = tmp_path / "cache"
    (cache / "jobs").mkdir(parents=True, mode=0o700)
    cache.chmod(0o700)
    for planted in (cache / f"five.h5.{os.getpid()}.tmp", cache / "jobs" / f"six.job.{os.getpid()}.tmp"):
        planted.symlink_to(victim)
    with Executor(cache_directory=str(cache)) as exe:
        assert exe.submit(add, 2, 3, resource_dict={"cache_key": "five"}).result(timeout=60) == 5
    with LocalClusterExecutor(cache_directory=str(cache)) as exe:
        assert exe.submit(add, 3, 3, resource_dict={"cache_key": "six"}).result(timeout=60) == 6
    assert victim.read_text() == "precious data\n"
    for written in (cache / "five.h5", cache / "jobs" / "six.job", cache / "six.h5"):
        assert stat.S_ISREG(written.lstat().st_mode)


# ------------------------------------------------------------ file modes
def test_everything_we_create_is_private_even_with_a_permissive_umask(tmp_path):
    cache = tmp_path / "cache"
    old = os.umask(0o000)
    try:
        with Executor(cache_directory=str(cache)) as exe:
            assert exe.submit(add, 1, 1).result(timeout=60) == 2
        with LocalClusterExecutor(cache_directory=str(cache)) as exe:
            assert exe.submit(add, 2, 2).result(timeout=60) == 4
    finally:
        os.umask(old)
    created = [cache, *cache.rglob("*")]
    assert len(created) == 8  # cache, jobs/, two results, task file, script, job id, output
    for path in created:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), f"{path}: {oct(mode)}"


# ------------------------------------------------------------ executorlib status
def _status(directory: pathlib.Path, timeout: float = 60):
    return subprocess.run([sys.executable, "-m", "executorlib.cli", "status", str(directory), "--json"],
                          capture_output=True, text=True, timeout=timeout)


def test_status_never_unpickles_never_blocks_and_reports_malformed_entries(tmp_path):
    import json

    cache, marker = tmp_path / "cache", tmp_path / "POISON-RAN"
    (cache / "jobs").mkdir(parents=True)
    poisoned_entry(cache / "stored_error.h5", marker, blob="error")  # an error without traceback
    os.mkfifo(cache / "jobs" / "fifo_call.job")  # opened for reading, it would block forever
    os.mkfifo(cache / "fifo_result.h5")
    (cache / "jobs" / "bad_id.job").write_text("local-not-a-pid")
    (cache / "jobs" / "bad_id.task.h5").write_bytes(b"")
    done = _status(cache)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    rows = {row["key"]: row for row in json.loads(done.stdout)}
    assert not marker.exists()
    assert rows["stored_error"]["state"] == "failed" and "not unpickled" in rows["stored_error"]["error"]
    assert rows["fifo_call"]["state"] == "lost" and "not a regular file" in rows["fifo_call"]["error"]
    assert rows["fifo_result"]["state"] == "failed" and "not a regular file" in rows["fifo_result"]["error"]
    assert rows["bad_id"]["state"] == "lost"
    assert "malformed job id 'local-not-a-pid'" in rows["bad_id"]["error"]
    for row in rows.values():
        assert "\n" not in row["error"]


# ------------------------------------------------------------ job scripts
def test_template_values_are_quoted_in_the_job_script(in_tmp):
    marker = in_tmp / "INJECTED"
    template = "#!/bin/bash\necho partition {{ partition }}\n{{ command }}\n"
    with LocalClusterExecutor(cache_directory="cache") as exe:
        future = exe.submit(add, 1, 2, resource_dict={
            "submission_template": template, "partition": f"debug; touch {marker}"})
        assert future.result(timeout=60) == 3
    (output,) = (in_tmp / "cache" / "jobs").glob("*.out")
    assert f"partition debug; touch {marker}" in output.read_text()
    assert not marker.exists()


@pytest.fixture(scope="module")
def slurm():
    """The test cluster: started (idempotent) if ``sinfo`` does not answer."""
    if subprocess.run(["sinfo"], capture_output=True).returncode != 0:
        subprocess.run([str(REPO / "scripts" / "slurm-test-cluster"), "start"], check=True)


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_a_line_break_in_a_job_value_is_refused_before_sbatch(slurm, in_tmp):
    marker = in_tmp / "INJECTED"
    with SlurmClusterExecutor(cache_directory="cache") as exe:
        for key, value in (("partition", f"debug\ntouch {marker}"), ("cwd", f"{in_tmp}\ntouch {marker}")):
            with pytest.raises(SubmissionError, match=rf"{key}=.*line break"):
                exe.submit(add, 1, 2, resource_dict={key: value}).result(timeout=200)
        with pytest.raises(ValueError, match="plain file name"):
            exe.submit(add, 1, 2, resource_dict={"cache_key": f"k\ntouch {marker}"}).result(timeout=200)
    assert not list((in_tmp / "cache" / "jobs").glob("*.job"))  # nothing was submitted
    assert not marker.exists()


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_slurm_submission_from_a_directory_with_a_space(slurm, tmp_path, monkeypatch):
    here = tmp_path / "my project"
    here.mkdir()
    monkeypatch.chdir(here)
    with SlurmClusterExecutor(cache_directory="cache") as exe:
        assert exe.submit(add, 1, 2).result(timeout=250) == 3
    (output,) = (here / "cache" / "jobs").glob("*.out")
    assert stat.S_IMODE(output.stat().st_mode) == 0o600  # Slurm's --output file is private
    (script,) = (here / "cache" / "jobs").glob("*.sh")
    assert f"--chdir='{here}'" in script.read_text()


def test_pysqa_refuses_values_it_would_write_unquoted(tmp_path, monkeypatch):
    pytest.importorskip("pysqa")
    config = tmp_path / "pysqa"
    config.mkdir()
    (config / "queue.yaml").write_text(
        "queue_type: SLURM\nqueue_primary: debug\n"
        "queues:\n  debug: {cores_max: 8, cores_min: 1, run_time_max: 3600, script: slurm.sh}\n")
    (config / "slurm.sh").write_text("#!/bin/bash\n#SBATCH --chdir={{working_directory}}\n{{command}}\n")
    here = tmp_path / "my project"
    here.mkdir()
    monkeypatch.chdir(here)
    with SlurmClusterExecutor(cache_directory="cache", pysqa_config_directory=str(config)) as exe:
        with pytest.raises(SubmissionError, match=r"working_directory=.*unquoted"):
            exe.submit(add, 1, 2).result(timeout=60)
        with pytest.raises(SubmissionError, match=r"partition=.*line break"):
            bad = {"partition": "debug\ntouch INJECTED", "cwd": str(tmp_path)}
            exe.submit(add, 1, 2, resource_dict=bad).result(timeout=60)
