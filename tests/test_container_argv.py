"""``resource_dict["container"]``: the spec's validation and the pure command builder.

The exact command line of every runtime is asserted here; apptainer and singularity are
not installed on the test machine (not in Debian 12), so for them this is the only test.
Workers that really run in a container (bubblewrap) are in test_container.py.
"""

from __future__ import annotations

import sys

import pytest

from executorlib import SingleNodeExecutor, SlurmClusterExecutor
from executorlib.container import Bind, Container, container_argv, container_environment, host_python_binds
from executorlib.resources import Resources

WORKER = [sys.executable, "-c", "start the worker", "tcp://10.0.0.1:5555", "3"]
COMMAND = ["python3", "-c", "start the worker", "tcp://10.0.0.1:5555", "3"]


def spec(**values):
    return Resources.from_dict({"container": values}).container


# ------------------------------------------------------------------ validation
def test_a_valid_spec_is_frozen_and_hashable_inside_resources():
    resources = Resources.from_dict({"container": {
        "runtime": "podman", "image": "docker.io/library/python:3.11",
        "binds": {"/data": "/data:ro", "/scratch/": "/work"}, "options": ["--gpus=all"],
    }})
    assert resources.container == Container(
        image="docker.io/library/python:3.11", runtime="podman",
        binds=(Bind("/data", "/data", True), Bind("/scratch", "/work", False)), options=("--gpus=all",),
    )
    assert hash(resources) == hash(Resources.from_dict({"container": resources.container}))
    with pytest.raises(AttributeError):
        resources.container.image = "other"  # frozen


def test_runtime_defaults_to_apptainer():
    assert spec(image="/images/app.sif").runtime == "apptainer"


@pytest.mark.parametrize(("values", "problem"), [
    ({"image": "a.sif", "bind": {}}, "unknown key(s) 'bind'; valid keys are: runtime, image, binds"),
    ({"runtime": "docker", "image": "x"}, "['runtime']='docker' is not one of apptainer, singularity"),
    ({"runtime": "podman"}, "needs 'image'"),
    ({"image": ""}, "needs 'image'"),
    ({"runtime": "bubblewrap", "image": "rootfs"}, "give its absolute path"),
    ({"image": "a.sif", "binds": {"data": "/data"}}, "the host path 'data' must be absolute"),
    ({"image": "a.sif", "binds": {"/data": "data:ro"}}, "the container path 'data' must be absolute"),
    ({"image": "a.sif", "binds": {"/a,b": "/a"}}, "without ':' or ','"),
    ({"image": "a.sif", "binds": ["/data"]}, "['binds'] must map host paths to container paths"),
    ({"image": "a.sif", "options": "--nv"}, "['options'] must be a list of strings"),
    ({"image": "a.sif", "host_python": "yes"}, "['host_python'] must be True or False"),
    ({"image": "a.sif", "python": "python3", "host_python": True}, "keep one"),
])
def test_a_bad_spec_is_one_error_naming_the_problem(values, problem):
    with pytest.raises(ValueError, match="^resource_dict\\['container'\\]") as error:
        Resources.from_dict({"container": values})
    assert problem in str(error.value)


def test_a_container_that_is_not_a_dict_shows_an_example():
    with pytest.raises(ValueError, match="must be a dict, e.g."):
        Resources.from_dict({"container": "image.sif"})


# ------------------------------------------------------------- the command line
def test_apptainer_exec_with_binds_and_options_before_the_image():
    container = spec(image="/images/app.sif", binds={"/data": "/data:ro", "/home/me": "/home/me"},
                     options=["--nv"])
    assert container_argv(container, WORKER, ["EXECUTORLIB_KEYS"]) == [
        "apptainer", "exec", "--bind=/data:/data:ro", "--bind=/home/me:/home/me", "--nv",
        "/images/app.sif", *COMMAND,
    ]


def test_singularity_is_the_same_command_under_its_own_name():
    container = spec(runtime="singularity", image="docker://python:3.11", python="/opt/py/bin/python")
    assert container_argv(container, WORKER) == [
        "singularity", "exec", "docker://python:3.11", "/opt/py/bin/python", *COMMAND[1:],
    ]


def test_podman_passes_variables_by_name_only_and_uses_the_host_network():
    container = spec(runtime="podman", image="localhost/worker:1", binds={"/data": "/data:ro"})
    argv = container_argv(container, WORKER, ["EXECUTORLIB_KEYS", "PYTHONPATH"], rootless=True)
    assert argv == [
        "podman", "run", "--rm", "--network=host", "--ipc=host", "--userns=keep-id",
        "--env=EXECUTORLIB_KEYS", "--env=PYTHONPATH",
        "--env=SLURM_*", "--env=PMIX_*", "--env=PMI_*", "--env=OMPI_*",
        "--env=CUDA_VISIBLE_DEVICES", "--env=ROCR_VISIBLE_DEVICES",
        "--volume=/data:/data:ro", "localhost/worker:1", *COMMAND,
    ]
    assert not any("=" in arg and arg.startswith("--env=") and arg.count("=") > 1 for arg in argv)


def test_podman_as_root_keeps_its_user_namespace_and_takes_a_root_directory():
    container = spec(runtime="podman", image="/srv/rootfs", options=["--security-opt=label=disable"])
    assert container_argv(container, WORKER, []) == [
        "podman", "run", "--rm", "--network=host", "--ipc=host",
        "--env=SLURM_*", "--env=PMIX_*", "--env=PMI_*", "--env=OMPI_*",
        "--env=CUDA_VISIBLE_DEVICES", "--env=ROCR_VISIBLE_DEVICES",
        "--security-opt=label=disable", "--rootfs", "/srv/rootfs", *COMMAND,
    ]


def test_bubblewrap_binds_the_root_read_only_and_shares_dev_shm():
    container = spec(runtime="bubblewrap", image="/srv/rootfs",
                     binds={"/usr": "/usr:ro", "/data": "/mnt/data"}, options=["--unshare-pid"])
    assert container_argv(container, WORKER, ["EXECUTORLIB_KEYS"]) == [
        "bwrap", "--ro-bind", "/srv/rootfs", "/", "--proc", "/proc", "--dev", "/dev",
        "--bind", "/dev/shm", "/dev/shm", "--tmpfs", "/tmp", "--die-with-parent",
        "--ro-bind", "/usr", "/usr", "--bind", "/data", "/mnt/data", "--unshare-pid", *COMMAND,
    ]


def test_host_python_runs_the_callers_interpreter_with_its_folders_bound_read_only(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tests").mkdir()
    binds = host_python_binds([str(tmp_path / "lib")], [
        str(tmp_path / "src" / "tests"), str(tmp_path / "lib" / "site"), str(tmp_path / "src"),
        str(tmp_path / "gone"), "/",
    ])  # a folder under another one is bound with it, whatever the order
    assert binds == (Bind(str(tmp_path / "lib"), str(tmp_path / "lib"), True),
                     Bind(str(tmp_path / "src"), str(tmp_path / "src"), True))
    container = spec(runtime="bubblewrap", image="/srv/rootfs", host_python=True,
                     binds={str(tmp_path / "src"): str(tmp_path / "src")}).with_binds(binds)
    argv = container_argv(container, WORKER)
    assert argv[-len(WORKER):] == WORKER  # the caller's own python
    assert argv.count(str(tmp_path / "src")) == 2  # the user's bind wins over the same target


def test_apptainer_gets_copies_of_the_worker_variables_that_survive_cleanenv():
    env = {"EXECUTORLIB_KEYS": "secret", "PYTHONPATH": "/src", "HOME": "/root"}
    names = ["EXECUTORLIB_KEYS", "PYTHONPATH", "OMP_NUM_THREADS"]
    assert container_environment(spec(image="a.sif"), env, names) == {
        **env, "APPTAINERENV_EXECUTORLIB_KEYS": "secret", "APPTAINERENV_PYTHONPATH": "/src",
    }
    assert container_environment(spec(runtime="singularity", image="a.sif"), env, names)[
        "SINGULARITYENV_EXECUTORLIB_KEYS"] == "secret"
    assert container_environment(spec(runtime="podman", image="x"), env, names) == env


# ------------------------------------------------------- where it is refused
def test_one_job_per_call_refuses_a_container_and_says_what_to_use(tmp_path):
    with pytest.raises(ValueError, match="use block_allocation=True"):
        SlurmClusterExecutor(cache_directory=str(tmp_path), resource_dict={
            "container": {"image": "/images/app.sif"}})


def test_a_block_pool_takes_the_container_per_executor_not_per_call():
    with SingleNodeExecutor(max_workers=1, block_allocation=True) as exe, pytest.raises(
        ValueError, match="per-call resource_dict must match the executor's"
    ):
        exe.submit(sum, [1], resource_dict={"container": {"image": "/images/app.sif"}})
