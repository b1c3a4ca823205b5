"""Workers inside a container: ``resource_dict={"container": {...}}``.

``Container.from_dict`` validates the user's dict once (``Resources.from_dict`` calls
it); :func:`container_argv` wraps a worker's command for the runtime, a pure function of
the spec; :func:`container_environment` adds what a runtime needs in the environment.
The wrapped command is the worker itself, so for MPI workers the container sits inside
the launcher (``srun ... apptainer exec IMAGE python ...``, ``mpiexec -n 4 bwrap ...``),
one container per rank, as HPC sites run MPI in containers::

    apptainer/singularity  exec [--bind H:C[:ro]] [options] IMAGE python -c ... ADDRESS ID
    podman                 run --rm --network=host --ipc=host [--userns=keep-id]
                           [--env NAME]... [-v H:C[:ro]] [options] IMAGE|--rootfs DIR python ...
    bubblewrap             bwrap --ro-bind ROOT / --proc /proc --dev /dev --bind /dev/shm /dev/shm
                           --tmpfs /tmp --die-with-parent [--(ro-)bind H C] [options] python ...

The launch keys and ``PYTHONPATH`` travel in the environment only, never in argv:
apptainer/singularity and bubblewrap pass the caller's environment on (their default;
``APPTAINERENV_``/``SINGULARITYENV_`` copies keep them through a ``--cleanenv`` in
``options``); podman gets ``--env NAME`` with the name alone, so it reads the value
from its own environment (also for what srun or mpiexec set: ``SLURM_*``, ``PMIX_*``,
``PMI_*``, ``OMPI_*``, the visible GPUs). The worker connects back over the host's network (podman:
``--network=host``; the others share it) and shares ``/dev/shm`` where it can.

Python inside: either the image ships Python with executorlib and its dependencies
(``python``: the interpreter there, default ``python3``), or ``host_python=True`` runs
the caller's own interpreter, with its installation and import path bound read-only at
the same paths (the image then needs only compatible system libraries).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

RUNTIMES = ("apptainer", "singularity", "podman", "bubblewrap")
KEYS = ("runtime", "image", "binds", "python", "host_python", "options")
# Variables a launcher (srun, mpiexec) sets for the ranks: podman passes them on too.
_LAUNCHER_VARIABLES = ("SLURM_*", "PMIX_*", "PMI_*", "OMPI_*", "CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")
_ENV_PREFIX = {"apptainer": "APPTAINERENV_", "singularity": "SINGULARITYENV_"}


@dataclass(frozen=True, slots=True)
class Bind:
    """A host folder or file seen at ``container`` inside (read-only with ``:ro``)."""

    host: str
    container: str
    read_only: bool = False


@dataclass(frozen=True, slots=True)
class Container:
    """Where and how a worker runs contained (see the module docstring)."""

    image: str
    runtime: str = "apptainer"
    binds: tuple[Bind, ...] = ()
    python: str | None = None  # None: "python3", or the caller's with host_python
    host_python: bool = False
    options: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, values: Any) -> Container:
        """Validate ``resource_dict["container"]``; a ValueError naming the problem and fix."""
        if isinstance(values, Container):
            return values
        if not isinstance(values, Mapping):
            _fail(f"must be a dict, e.g. {_EXAMPLE}, got {values!r}")
        unknown = sorted(set(values) - set(KEYS))
        if unknown:
            _fail(f"has unknown key(s) {', '.join(map(repr, unknown))}; valid keys are: {', '.join(KEYS)}")
        runtime = values.get("runtime", "apptainer")
        if runtime not in RUNTIMES:
            _fail(f"['runtime']={runtime!r} is not one of {', '.join(RUNTIMES)}")
        spec = cls(
            image=_image(values.get("image"), runtime), runtime=runtime,
            binds=_binds(values.get("binds") or {}), python=_python(values.get("python")),
            host_python=_host_python(values.get("host_python", False)),
            options=_options(values.get("options") or ()),
        )
        if spec.python is not None and spec.host_python:
            _fail("gives both 'python' and host_python=True; keep one: the image's interpreter, "
                  "or the caller's own bound into the container")
        return spec

    @property
    def interpreter(self) -> str:
        """The Python to start inside (the caller's own with ``host_python``)."""
        return sys.executable if self.host_python else self.python or "python3"

    def with_binds(self, extra: Iterable[Bind]) -> Container:
        """This spec with ``extra`` binds after its own (targets already bound are skipped)."""
        taken = {bind.container for bind in self.binds}
        return replace(self, binds=self.binds + tuple(b for b in extra if b.container not in taken))


_EXAMPLE = '{"runtime": "apptainer", "image": "/path/to/image.sif", "binds": {"/data": "/data"}}'


def _fail(problem: str) -> None:
    raise ValueError(f"resource_dict['container'] {problem}")


def _image(image: Any, runtime: str) -> str:
    if not isinstance(image, str) or not image:
        _fail(f"needs 'image': a non-empty string (a .sif file or URI for apptainer, an image name "
              f"or root directory for podman, a root directory for bubblewrap), got {image!r}")
    if runtime == "bubblewrap" and not os.path.isabs(image):
        _fail(f"['image']={image!r}: bubblewrap runs in a root directory; give its absolute path")
    return image


def _binds(binds: Any) -> tuple[Bind, ...]:
    if not isinstance(binds, Mapping):
        _fail(f"['binds'] must map host paths to container paths, e.g. {{'/data': '/data:ro'}}, "
              f"got {binds!r}")
    return tuple(_bind(host, target) for host, target in binds.items())


def _bind(host: Any, target: Any) -> Bind:
    if not isinstance(host, (str, os.PathLike)) or not isinstance(target, (str, os.PathLike)):
        _fail(f"['binds'] maps host path to container path, both strings; got {host!r}: {target!r}")
    host, target = os.fspath(host), os.fspath(target)
    read_only = target.endswith(":ro")
    target = target.removesuffix(":ro")
    for side, path in (("host", host), ("container", target)):
        if not os.path.isabs(path) or ":" in path or "," in path:
            _fail(f"['binds'] {host!r}: {target!r}: the {side} path {path!r} must be absolute, without "
                  "':' or ',' (only a trailing ':ro' on the container path, for read-only)")
    return Bind(os.path.normpath(host), os.path.normpath(target), read_only)


def _python(python: Any) -> str | None:
    if python is not None and (not isinstance(python, str) or not python):
        _fail(f"['python'] must name the interpreter inside the image, e.g. 'python3', got {python!r}")
    return python


def _host_python(value: Any) -> bool:
    if not isinstance(value, bool):
        _fail(f"['host_python'] must be True or False, got {value!r}")
    return value


def _options(options: Any) -> tuple[str, ...]:
    if isinstance(options, str) or not all(isinstance(item, str) for item in options):
        _fail(f"['options'] must be a list of strings, e.g. ['--nv'], got {options!r}")
    return tuple(options)


# ------------------------------------------------------------ the command line
def container_argv(spec: Container, argv: list[str], env_names: Iterable[str] = (),
                   *, rootless: bool = False) -> list[str]:
    """``argv`` (a Python command: ``argv[0]`` becomes ``spec.interpreter``) run in the
    container. ``env_names``: variables the worker needs (podman passes them by name);
    ``rootless``: podman maps the caller's uid into the container (``--userns=keep-id``)."""
    command = [spec.interpreter, *argv[1:]]
    if spec.runtime == "podman":
        return _podman(spec, command, env_names, rootless)
    if spec.runtime == "bubblewrap":
        return _bubblewrap(spec, command)
    binds = [f"--bind={_joined(bind)}" for bind in spec.binds]
    return [spec.runtime, "exec", *binds, *spec.options, spec.image, *command]


def _joined(bind: Bind) -> str:
    return f"{bind.host}:{bind.container}" + (":ro" if bind.read_only else "")


def _podman(spec: Container, command: list[str], env_names: Iterable[str], rootless: bool) -> list[str]:
    argv = ["podman", "run", "--rm", "--network=host", "--ipc=host"]
    argv += ["--userns=keep-id"] if rootless else []
    argv += [f"--env={name}" for name in dict.fromkeys([*env_names, *_LAUNCHER_VARIABLES])]
    argv += [f"--volume={_joined(bind)}" for bind in spec.binds]
    image = ["--rootfs", spec.image] if os.path.isabs(spec.image) else [spec.image]
    return [*argv, *spec.options, *image, *command]


def _bubblewrap(spec: Container, command: list[str]) -> list[str]:
    argv = ["bwrap", "--ro-bind", spec.image, "/", "--proc", "/proc", "--dev", "/dev",
            "--bind", "/dev/shm", "/dev/shm", "--tmpfs", "/tmp", "--die-with-parent"]
    for bind in spec.binds:
        argv += ["--ro-bind" if bind.read_only else "--bind", bind.host, bind.container]
    return [*argv, *spec.options, *command]


def container_environment(spec: Container, env: Mapping[str, str], names: Iterable[str]) -> dict[str, str]:
    """``env`` plus, for apptainer/singularity, ``APPTAINERENV_NAME`` copies of ``names``:
    the runtime sets them inside even under ``--cleanenv``."""
    extra = {copy: env[name] for name in names if name in env for copy in copies_of(spec, name)}
    return {**env, **extra}


def copies_of(spec: Container, name: str) -> list[str]:
    """The extra names under which the runtime wants variable ``name`` (apptainer and
    singularity: ``APPTAINERENV_NAME``, set inside even under ``--cleanenv``)."""
    prefix = _ENV_PREFIX.get(spec.runtime)
    return [f"{prefix}{name}"] if prefix else []


def host_python_binds(prefixes: Iterable[str], import_path: Iterable[str]) -> tuple[Bind, ...]:
    """Read-only binds, at the same paths, of the caller's Python installation
    (``prefixes``) and of the folders on its import path not under one of them."""
    paths = dict.fromkeys(os.path.normpath(path) for path in [*prefixes, *import_path])
    folders = [path for path in paths if path != "/" and os.path.isdir(path)]
    tops = [path for path in folders if not any(path.startswith(top + "/") for top in folders)]
    return tuple(Bind(path, path, read_only=True) for path in tops)
