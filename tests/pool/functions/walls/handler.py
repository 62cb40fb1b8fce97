"""Tries one thing a sandbox forbids (tests/pool/test_sandbox.py) and says what happened."""

import os
import socket
import subprocess
import sys
import time


def handler(event, context):
    action = event["action"]
    if action == "echo":
        return {"echo": event.get("value"), "pid": os.getpid(), "uid": os.getuid()}
    if action == "read":
        return _attempt(lambda: open(event["path"], "rb").read(16))
    if action == "list":
        return _attempt(lambda: os.listdir(event["path"]))
    if action == "write":
        return _attempt(lambda: _write(event["path"], event.get("mb", 0)))
    if action == "keep":  # a file that stays
        return _attempt(lambda: open(event["path"], "w").write("kept\n") and None)
    if action == "die":  # of a signal, or by exit(), as the event says
        if "signal" in event:
            os.kill(os.getpid(), event["signal"])
        os._exit(event["exit"])
    if action == "connect":
        return _attempt(lambda: socket.create_connection((event["host"], event["port"]), 2).close())
    if action == "namespaces":
        kinds = ("pid", "ipc", "uts", "net", "mnt")
        return {kind: os.readlink(f"/proc/self/ns/{kind}") for kind in kinds}
    if action == "processes":
        pids = sorted(int(entry) for entry in os.listdir("/proc") if entry.isdigit())
        return {"pids": pids}
    if action == "self":
        with open("/proc/self/status") as status:
            fields = dict(line.split(":", 1) for line in status.read().splitlines() if ":" in line)
        return {
            "uid": os.getuid(),
            "euid": os.geteuid(),
            "groups": os.getgroups(),
            "no_new_privs": fields["NoNewPrivs"].strip(),
            "cap_eff": fields["CapEff"].strip(),
            "env": sorted(os.environ),
            "ppid": os.getppid(),
            "uid_map": open("/proc/self/uid_map").read().split(),
        }
    if action == "detach":  # a setsid() grandchild that outlives its worker unless stopped
        script = "import time; time.sleep(3600)"
        child = os.fork()
        if child == 0:
            os.setsid()
            subprocess.Popen([sys.executable, "-c", script, event["marker"]])
            os._exit(0)
        os.waitpid(child, 0)
        time.sleep(3600)
    raise ValueError(f"unknown action {action!r}")


def _write(path, mb):
    with open(path, "wb") as file:
        for _ in range(max(mb, 1)):
            file.write(b"x" * (1024 * 1024 if mb else 1))
    os.remove(path)


def _attempt(call):
    try:
        value = call()
    except OSError as exc:
        return {"ok": False, "errno": exc.errno, "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": True, "value": value if isinstance(value, list) else None}
