"""The ssh command line that starts the agent's bridge on the cluster.

We run the system's OpenSSH client as a subprocess rather than an SSH library, so
``~/.ssh/config``, the ssh agent, ``ProxyJump``, ``ControlMaster`` and hardware keys work
exactly as they do at the user's terminal. Options we add and why:

- ``BatchMode=yes``: never prompt (there is no terminal); keys or the agent must work.
- ``StrictHostKeyChecking=yes``: an unknown or changed host key is an error, never
  accepted silently (overrides a user's ``accept-new``).
- ``ServerAliveInterval``: a dead link (laptop asleep, Wi-Fi gone) is noticed, so the
  client reconnects instead of waiting forever.

The remote command is one shell word list (``shlex.join``): the login shell parses it.
It starts ``remote_python`` with a tiny bootstrap that first prints its Python version
(so a mismatch is reported even where executorlib is missing), then imports executorlib.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

BANNER = "executorlib-agent"
# Runs under the remote Python; must stay valid for old Pythons, so no f-strings.
BOOTSTRAP = (
    "import sys; sys.path[:1] == [''] and sys.path.pop(0); "
    "sys.stdout.write('" + BANNER + " python %d.%d\\n' % sys.version_info[:2]); sys.stdout.flush()\n"
    "try:\n"
    "    from executorlib.remote.bridge import main\n"
    "except ImportError as error:\n"
    "    sys.stdout.write('" + BANNER + " missing %s\\n' % error); sys.exit(3)\n"
    "sys.stdout.write('" + BANNER + " ready\\n'); sys.stdout.flush()\n"
    "main(sys.argv[1:])\n"
)


@dataclass(frozen=True)
class SshTarget:
    """Where the agent runs and how to get there.

    host: ``user@host`` or a Host alias of ``~/.ssh/config`` (the login node).
    gateway: optional jump host (``ssh -J``). remote_python: the cluster's Python that
    has executorlib. ssh_args: extra arguments for ``ssh`` (e.g. ``("-F", "cfg")``).
    """

    host: str
    gateway: str | None = None
    remote_python: str = "python3"
    ssh_args: tuple[str, ...] = ()

    def argv(self, *agent_args: str) -> list[str]:
        """``ssh ... host -- '<remote_python> -c <bootstrap> AGENT_ARGS...'``."""
        argv = ["ssh", "-T", "-e", "none", "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=yes", "-o", "ServerAliveInterval=15",
                "-o", "ServerAliveCountMax=4", "-o", "ConnectTimeout=30"]
        if self.gateway:
            argv += ["-J", self.gateway]
        argv += [*self.ssh_args, self.host, "--"]
        return argv + [shlex.join([self.remote_python, "-c", BOOTSTRAP, *agent_args])]

    def describe(self) -> str:
        via = f" via {self.gateway}" if self.gateway else ""
        return f"{self.host}{via}"


def parse_banner(line: str, target: SshTarget, local: tuple[int, int]) -> None:
    """Check one of the bootstrap's two lines: the same Python minor version, executorlib there."""
    words = line.split()
    if words[:2] == [BANNER, "ready"]:
        return
    if len(words) < 3 or words[0] != BANNER:
        raise RuntimeError(
            f"{target.remote_python} on {target.describe()} did not start the executorlib agent "
            f"(it printed {line.strip()!r}); check remote_python= and that the login shell "
            "prints nothing for non-interactive sessions"
        )
    if words[1] == "missing":
        raise ModuleNotFoundError(
            f"executorlib is not installed for {target.remote_python} on {target.describe()} "
            f"({' '.join(words[2:])}); install it there (pip install executorlib with this "
            "version) or point remote_python= at a Python that has it"
        )
    if words[1] != "python":
        raise RuntimeError(f"unexpected line from the agent bootstrap: {line.strip()!r}")
    remote = tuple(int(part) for part in words[2].split("."))
    if remote != local:
        raise RuntimeError(
            f"Python {remote[0]}.{remote[1]} at {target.remote_python} on {target.describe()} but "
            f"Python {local[0]}.{local[1]} here: pickled functions need the same minor version "
            f"on both ends; use a Python {local[0]}.{local[1]} environment on one side or the other"
        )
