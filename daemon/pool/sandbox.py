"""A worker inside bubblewrap: what it sees, what it may do, and whether this host allows it.

`wrap(fn, argv)` turns the command of any worker (python, provided, nodejs: process.start_process)
into `bwrap ... -- argv`. Inside:

- the file system is built, not inherited: the system (/usr and its /bin, /lib, ... links, /etc)
  read-only; the Python the worker runs on (the venv and its base installation), the `daemon`
  package, the function's code folder, its dependency folder, the Node.js binary's folder and
  the folders of its file-drop triggers, each read-only at its own path; a fresh /dev and /proc;
  a private tmpfs on /tmp of `tmp_mb`. Nothing else of the host: data_dir, the config folder,
  secrets and other functions' folders are not mounted, and when one of them lies inside a tree
  that is (the config in /etc/lambdaemon), an empty tmpfs (a folder) or /dev/null (a file)
  covers it (FunctionConfig.hidden);
- its own PID namespace: bwrap's init is pid 1, the worker pid 2, and when bwrap dies (the
  daemon kills it, or the daemon dies: --die-with-parent) the kernel kills every process in the
  namespace, however it detached itself;
- its own IPC namespace, and with `network = false` its own network namespace (loopback only);
- no new privileges (bwrap sets PR_SET_NO_NEW_PRIVS) and no capabilities;
- the environment process.environment() built, and nothing else.

As a user, bwrap runs the worker in a user namespace of its own (unprivileged user namespaces).
As root, it needs none: it builds the sandbox with root's rights and `setpriv` drops the worker to
SANDBOX_UID/GID (nobody) with no groups and an empty capability bounding set, so no worker runs
as root.

daemon/bubblewrap.py tells whether this host can run a sandbox at all (bwrap installed, the
kernel allowing its namespaces), by starting one once per process.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

from daemon.bubblewrap import SANDBOX_GID, SANDBOX_UID, bwrap_binary, namespaces, system
from daemon.config import FunctionConfig, node_binary

_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the `daemon` package
_SYSTEM_TREES = ("/usr", "/etc")


def wrap(fn: FunctionConfig, argv: list[str]) -> list[str]:
    """`argv` as the command of a sandbox for `fn` (see the module doc)."""
    assert fn.code is not None
    bwrap = bwrap_binary() or "bwrap"
    args = [bwrap, *namespaces(fn.network), *system()]
    args += ["--proc", "/proc", "--dev", "/dev"]
    args += ["--perms", "1777", "--size", str(fn.tmp_mb * 1024 * 1024), "--tmpfs", "/tmp"]
    for hidden in fn.hidden:
        if not any(_inside(hidden, tree) for tree in _SYSTEM_TREES):
            continue  # not mounted in the first place
        if os.path.isdir(hidden):
            args += ["--tmpfs", hidden]
        else:
            args += ["--ro-bind", "/dev/null", hidden]
    mounts = _mounts(fn)
    # The folders bwrap creates for mount points are 0700 when it runs as root: the worker
    # (nobody) must be able to pass through them.
    for parent in sorted({p for path in mounts for p in _parents(path)}):
        if not any(_inside(parent, tree) for tree in _SYSTEM_TREES) or any(
            _inside(parent, hidden) for hidden in fn.hidden
        ):
            args += ["--perms", "0755", "--dir", parent]
    for path, how in mounts.items():
        args += [how, path, path]
    args += ["--chdir", fn.code]
    if os.geteuid() == 0:
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--"]
        args += [shutil.which("setpriv") or "setpriv"]
        args += [f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_GID}", "--clear-groups"]
        args += ["--inh-caps=-all", "--bounding-set=-all"]
    return [*args, "--", *argv]


def worker_returncode(fn: FunctionConfig, code: int | None) -> int | None:
    """A worker's exit status as the pool reports it (asyncio's: -N for signal N): bwrap exits
    with 128 + N when the worker in it died of signal N, as a shell reports it, so a sandboxed
    worker's segfault is a segfault (and its own exit(139) one too: docs/sandbox.md)."""
    if fn.sandbox and code is not None and 128 < code < 128 + signal.NSIG:
        return -(code - 128)
    return code


def _mounts(fn: FunctionConfig) -> dict[str, str]:
    """The host paths a worker of `fn` sees, each at its own path, with bwrap's option for it:
    read-only, but for its write_paths; a folder before what it holds."""
    assert fn.code is not None
    paths = [sys.prefix, sys.base_prefix, str(_ROOT / "daemon")]
    if fn.runtime == "nodejs" and (node := node_binary()) is not None:
        paths.append(os.path.dirname(os.path.realpath(node)))
    if fn.deps:
        paths.append(fn.deps)
    mounts: dict[str, str] = {}
    for path in paths:
        mounts[os.path.abspath(path)] = "--ro-bind"
    for path in fn.visible:  # a trigger's folder may not exist yet: it is then left out
        mounts[path] = "--ro-bind-try"
    for path in fn.read_paths:
        mounts[path] = "--ro-bind"
    for path in fn.write_paths:
        _make_folder(path)
        mounts[path] = "--bind"
    mounts[fn.code] = "--ro-bind"  # the code stays read-only, whatever holds it
    shown = sorted(
        (path for path in mounts if not _inside(path, "/usr")), key=lambda path: path.count("/")
    )
    return {path: mounts[path] for path in shown}


def _make_folder(path: str) -> None:
    """Create a missing write_paths folder for the worker: a root daemon's worker (nobody)
    owns it, as it owns what it writes there."""
    if os.path.isdir(path):
        return
    os.makedirs(path, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(path, SANDBOX_UID, SANDBOX_GID)


def _inside(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip("/") + "/")


def _parents(path: str) -> list[str]:
    parents = []
    parent = os.path.dirname(path)
    while parent not in ("/", ""):
        parents.append(parent)
        parent = os.path.dirname(parent)
    return parents
