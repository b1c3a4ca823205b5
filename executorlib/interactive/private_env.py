"""Per-launch secrets through a private file, for launchers that record the environment.

A local process or an ``srun`` step gets the executor's secret (and any other key
material) in its environment, which only its owner can read. A Flux job does not: its
environment is part of the jobspec, which the instance owner (on a system instance: the
``flux`` user and the site's admins) reads with ``flux job info``, and which job archives
keep. For such launchers the spawner moves the per-launch variables into a file:

    executor:  ~/.cache/executorlib/flux-PID-XXXX/   0700, made by mkdtemp
                   w-<worker id>-<random>             0600, O_CREAT|O_EXCL|O_NOFOLLOW
               environment of the job: EXECUTORLIB_PRIVATE_ENV=<that path>
    worker:    load(): read the file into os.environ, unlink it, before it connects

The directory must be on a file system the worker's node sees (home directories are, on
clusters); ``EXECUTORLIB_PRIVATE_DIR`` chooses another. Only the standard library is
imported: workers load this module on their start-up path.
"""

from __future__ import annotations

import contextlib
import os
import stat

PATH_ENV = "EXECUTORLIB_PRIVATE_ENV"  # in the job's environment: where the file is
DIR_ENV = "EXECUTORLIB_PRIVATE_DIR"  # the executor's choice of base directory


def per_launch(environment: dict[str, str], inherited: dict[str, str]) -> dict[str, str]:
    """The executorlib variables of ``environment`` that this launch added or changed
    (the secret, key material): everything ``EXECUTORLIB_*`` not inherited as is."""
    return {
        name: value for name, value in environment.items()
        if name.startswith("EXECUTORLIB_") and inherited.get(name) != value
    }


def base_directory() -> str:
    """``$EXECUTORLIB_PRIVATE_DIR``, else ``$XDG_CACHE_HOME/executorlib`` or
    ``~/.cache/executorlib``: created 0700, and refused unless it is ours and private."""
    base = os.environ.get(DIR_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "executorlib"
    )
    os.makedirs(base, mode=0o700, exist_ok=True)
    info = os.lstat(base)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise PermissionError(
            f"{base} (for the workers' private key files) must be a directory owned by uid "
            f"{os.geteuid()} and writable by nobody else; fix it (chmod 700) or set {DIR_ENV}"
        )
    return base


class PrivateDirectory:
    """A 0700 directory of one executor's private environment files."""

    def __init__(self) -> None:
        import shutil
        import tempfile
        import weakref

        self.path = tempfile.mkdtemp(prefix=f"flux-{os.getpid()}-", dir=base_directory())
        # removed at close(), garbage collection or interpreter exit, whichever comes first
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.path, ignore_errors=True)

    def write(self, worker_id: int, variables: dict[str, str]) -> str:
        """A new 0600 file holding ``variables``; its path."""
        lines = []
        for name, value in variables.items():
            if "=" in name or "\n" in name + value:
                raise ValueError(f"environment variable {name!r} cannot go through a private file")
            lines.append(f"{name}={value}\n")
        import secrets  # the executor's side only: workers start without it

        path = os.path.join(self.path, f"w-{worker_id}-{secrets.token_hex(8)}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write("".join(lines))
        return path

    def close(self) -> None:
        """Remove the directory and whatever workers did not read."""
        self._finalizer()


def discard(path: str | None) -> None:
    """Remove a file a worker never read (its job ended before it started)."""
    if path:
        with contextlib.suppress(FileNotFoundError):  # the worker read (and removed) it
            os.unlink(path)


def load(environ: os._Environ | dict = os.environ) -> None:
    """Worker side: move the variables of the file named by ``EXECUTORLIB_PRIVATE_ENV``
    into ``environ`` and delete the file; nothing when the variable is not set."""
    path = environ.pop(PATH_ENV, None)
    if not path:
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SystemExit(
            f"executorlib worker on {os.uname().nodename}: its private environment file {path} "
            f"does not exist: this node does not see that directory (set {DIR_ENV} to a "
            "directory on a file system shared with the executor's node), or the executor "
            "already stopped"
        ) from None
    with os.fdopen(fd) as file:
        if os.fstat(file.fileno()).st_uid != os.geteuid():
            raise SystemExit(f"executorlib worker: {path} is not owned by this user; refusing it")
        text = file.read()
    os.unlink(path)
    for line in text.splitlines():
        name, _, value = line.partition("=")
        environ[name] = value
