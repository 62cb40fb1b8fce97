"""Whether this host can run bubblewrap sandboxes, and the namespaces and system mounts every
sandbox shares (daemon/pool/sandbox.py builds the rest). Standard library only: loading a
config (daemon/config.py) asks it, and must not import the pool.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

SANDBOX_UID = SANDBOX_GID = 65534  # nobody, nogroup: who a root daemon's workers run as
_SYSTEM_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


def bwrap_binary() -> str | None:
    return shutil.which("bwrap")


@functools.cache
def unavailable() -> str | None:
    """Why no sandbox can be started here (bwrap missing, namespaces refused), or None."""
    bwrap = bwrap_binary()
    if bwrap is None:
        return "bubblewrap is not installed (bwrap not found on PATH; apt-get install bubblewrap)"
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed: a root daemon's workers could not drop root"
    argv = [bwrap, *namespaces(network=False), *system(), "--", "true"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bwrap could not start: {exc}"
    if done.returncode != 0:
        said = done.stderr.strip().splitlines()
        return f"bwrap cannot create its namespaces here: {said[-1] if said else done.returncode}"
    return None


def describe() -> dict[str, object]:
    """{available, reason} for /health, `lambdaemon check` and the start's log line."""
    why = unavailable()
    return {"available": why is None, "reason": why}


def namespaces(network: bool) -> list[str]:
    args = ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    args += ["--die-with-parent"]
    if not network:
        args.append("--unshare-net")
    if os.geteuid() != 0:
        args.append("--unshare-user")
    return args


@functools.cache
def _system_args() -> tuple[str, ...]:
    args = ["--ro-bind", "/usr", "/usr"]
    for name in _SYSTEM_LINKS:
        path = f"/{name}"
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    args += ["--ro-bind", "/etc", "/etc"]
    return tuple(args)


def system() -> list[str]:
    return list(_system_args())
