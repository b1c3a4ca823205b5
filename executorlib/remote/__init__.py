"""From a laptop: run an executor's calls on a cluster reached by ssh.

``SlurmClusterExecutor(ssh="alice@login", ssh_gateway="alice@gw", remote_python=...,
cache_directory=...)`` (one job per call; with ``block_allocation=True`` a pilot pool
whose worker jobs connect back to the agent), or ``SingleNodeExecutor(ssh=...)`` for the
login node itself, returns a :class:`~executorlib.remote.client.RemoteExecutor`: an ordinary
``concurrent.futures.Executor`` whose calls run in an agent on the login node
(``executorlib.remote.agent``), reached through the system's ``ssh`` and a bridge
(``executorlib.remote.bridge``). Dependencies resolve on the cluster; the laptop needs
no inbound connection; a dropped connection is re-established and loses nothing.
"""

from __future__ import annotations

from typing import Any

from executorlib.remote.ssh import SshTarget

# Backends that make sense from a laptop: the login node itself, or queue jobs (one per
# call, or a pilot pool: ``block_allocation=True`` travels to the agent with the options).
REMOTE_BACKENDS = ("local", "slurm_submission", "flux_submission")
_CLIENT_OPTIONS = ("ssh_args", "reconnect_timeout", "idle_timeout")


def remote_executor(backend: str, args: tuple, options: dict[str, Any]) -> Any:
    """The executor for ``Executor.__new__`` when ``ssh=`` is given: the backend's
    options go to the agent; ``ssh``, ``ssh_gateway``, ``remote_python``, ``ssh_args``
    (extra ``ssh`` arguments), ``reconnect_timeout`` and ``idle_timeout`` stay here."""
    from executorlib.remote.client import RemoteExecutor

    if backend not in REMOTE_BACKENDS:
        raise ValueError(
            f"ssh= works with SingleNodeExecutor, SlurmClusterExecutor and FluxClusterExecutor, "
            f"not the {backend!r} backend: inside an allocation, run the executor there instead"
        )
    options = dict(options)
    if args:
        if len(args) > 1 or "max_workers" in options:
            raise TypeError("only max_workers may be given by position")
        options["max_workers"] = args[0]
    target = SshTarget(
        host=options.pop("ssh"), gateway=options.pop("ssh_gateway", None),
        remote_python=options.pop("remote_python", None) or "python3",
        ssh_args=tuple(options.pop("ssh_args", ()) or ()),
    )
    client = {name: options.pop(name) for name in _CLIENT_OPTIONS[1:] if name in options}
    return RemoteExecutor(backend, options, target, **client)
