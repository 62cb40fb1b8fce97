"""Handlers for the pool tests; each test picks one with `handler = "handler.<name>"`."""

import asyncio
import ctypes
import decimal
import fcntl
import json
import logging
import os
import subprocess
import sys
import threading
import time

calls = 0


def count(event, context):
    global calls
    calls += 1
    return {"calls": calls, "pid": os.getpid()}


def echo(event, context):
    return event


async def async_echo(event, context):
    await asyncio.sleep(0)
    return {"event": event, "async": True, "loop_id": id(asyncio.get_running_loop())}


def fail(event, context):
    raise ValueError(f"boom {event.get('n', 0)}")


def sleep(event, context):
    time.sleep(event["s"])
    return {"slept": event["s"]}


def crash(event, context):
    if event.get("how") == "segfault":
        ctypes.string_at(0)
    if event.get("how") == "exit":
        os._exit(3)
    return {"survived": True}


def allocate(event, context):
    chunks = []
    for _ in range(event["mb"]):
        chunks.append(bytearray(1024 * 1024))
    return {"allocated_mb": len(chunks)}


def allocate_once(event, context):
    return {"len": len(bytearray(event["mb"] * 1024 * 1024))}


def output(event, context):
    print("printed line")
    os.write(1, b"fd1 line\n")
    os.write(2, b"fd2 line\n")
    print("stderr line", file=sys.stderr)
    logger = logging.getLogger("fixture")
    logger.setLevel(logging.INFO)
    logger.info("logged %s", "line")
    subprocess.run(["sh", "-c", "echo subprocess line; echo subprocess stderr >&2"], check=True)
    context.log("context line\n")
    return {"ok": True}


def spam(event, context):
    line = "x" * 99 + "\n"
    for _ in range(event["lines"]):
        sys.stdout.write(line)
    time.sleep(event.get("s", 0))
    return {"ok": True}


def late_output(event, context):
    """With "go" and "done" paths: a thread prints a line once the test opens the gate at "go"
    (tests/daemon_proc.py, Gate), then makes "done"."""
    if "go" not in event:
        return {"ok": True}

    def later():
        gate = os.open(event["go"], os.O_RDONLY)
        fcntl.flock(gate, fcntl.LOCK_SH)  # blocks while the test holds the gate shut
        os.close(gate)
        print("late line")
        open(event["done"], "w").close()

    threading.Thread(target=later, daemon=True).start()
    return {"ok": True}


def environment(event, context):
    return {"env": dict(os.environ), "cwd": os.getcwd(), "sys_path0": sys.path[0]}


def describe_context(event, context):
    cc, identity = context.client_context, context.identity
    return {
        "function_name": context.function_name,
        "function_version": context.function_version,
        "invoked_function_arn": context.invoked_function_arn,
        "memory_limit_in_mb": context.memory_limit_in_mb,
        "aws_request_id": context.aws_request_id,
        "log_group_name": context.log_group_name,
        "log_stream_name": context.log_stream_name,
        "identity": [identity.cognito_identity_id, identity.cognito_identity_pool_id],
        "client_context": None
        if cc is None
        else {
            "custom": cc.custom,
            "env": cc.env,
            "installation_id": cc.client.installation_id,
        },
        "remaining_ms": context.get_remaining_time_in_millis(),
    }


def returns(event, context):
    kind = event["kind"]
    if kind == "bytes":
        return b"\x00raw bytes"
    if kind == "decimal":
        return {"price": decimal.Decimal("12.50")}
    if kind == "none":
        return None
    if kind == "decimals":  # DynamoDB-style numbers, nested, with digits a float would lose
        big = decimal.Decimal("12345678901234567890.10")
        return {"items": [{"n": big}, decimal.Decimal("1E+3")], "f": 0.5, "text": "é€ 日本"}
    if kind == "nan":
        return {"x": float("nan")}
    if kind == "surrogate":  # a file name decoded with surrogateescape
        return {"name": b"caf\xe9".decode("utf-8", "surrogateescape")}
    return object()


def fail_surrogate(event, context):
    name = b"caf\xe9".decode("utf-8", "surrogateescape")
    raise FileNotFoundError(f"no such file: {name}")


def spawn_sleeper(event, context):
    child = subprocess.Popen(["sleep", "60"], start_new_session=False)
    return {"child": child.pid}


def sleep_with_child(event, context):
    child = subprocess.Popen(["sleep", "60"])
    print(f"child {child.pid}")
    time.sleep(event["s"])
    return {"child": child.pid}


kept = []


def leak(event, context):
    # Keeps what it allocates, as a leaking handler would (touched, so it is resident).
    kept.append(bytearray(b"x") * (event["mb"] * 1024 * 1024))
    return {"kept_mb": event["mb"] * len(kept), "pid": os.getpid()}


def sized(event, context):
    """A result whose JSON is event["bytes"] bytes long: a string of event["char"] (one or more
    bytes of UTF-8 each) between its two quotes, or with "raw" that many bytes returned as is.
    From a webhook, those fields are the request's JSON body."""
    if "rawPath" in event:
        event = json.loads(event["body"])
    if event.get("raw"):
        return b"r" * event["bytes"]
    char = event.get("char", "x")
    return char * ((event["bytes"] - 2) // len(char.encode()))


def fail_long(event, context):
    raise ValueError("m" * event["chars"])


def double_fork(event, context):
    """Leave a grandchild in a session of its own (fork, setsid, fork, the middle one exits):
    it writes its pid to event["pidfile"] and sleeps; with "env": false it also clears its
    environment (a process that carries no mark of its worker); it sleeps
    event["grandchild_s"] (300 s by default) and exits. The handler goes on once the
    pid is written (told through a pipe); then it exits with "exit", or sleeps event["s"]."""
    written, told = os.pipe()
    pidfile = event["pidfile"]
    middle = os.fork()
    if middle == 0:
        os.setsid()
        if os.fork() == 0:
            if event.get("env") is False:
                os.environ.clear()
                os.set_inheritable(told, True)
                script = f"echo $$ > {pidfile}.tmp && mv {pidfile}.tmp {pidfile} && echo >&{told}"
                os.execv("/bin/sh", ["sh", "-c", f"{script} && exec sleep 300 {told}>&-"])
            with open(pidfile + ".tmp", "w") as out:
                out.write(str(os.getpid()))
            os.rename(pidfile + ".tmp", pidfile)
            os.write(told, b"\n")
            os.close(told)
            time.sleep(event.get("grandchild_s", 300))
            os._exit(0)
        os._exit(0)
    os.close(told)
    os.waitpid(middle, 0)
    os.read(written, 1)  # the grandchild has written its pid
    os.close(written)
    if event.get("exit"):
        os._exit(3)
    time.sleep(event.get("s", 0))
    return {"middle": middle}


def setsid_child(event, context):
    """A child in a new session that stays the worker's child; its pid in event["pidfile"]
    (the handler goes on once it is written, told through a pipe)."""
    written, told = os.pipe()
    pidfile = event["pidfile"]
    script = f"echo $$ > {pidfile}.tmp && mv {pidfile}.tmp {pidfile} && echo >&{told}"
    child = subprocess.Popen(
        ["sh", "-c", f"{script} && exec sleep 300 {told}>&-"],
        start_new_session=True,
        pass_fds=(told,),
    )
    os.close(told)
    os.read(written, 1)
    os.close(written)
    time.sleep(event.get("s", 0))
    return {"child": child.pid}


def descriptors(event, context):
    """The worker's open descriptors that are sockets (its channel), and whether inheritable."""
    sockets = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:"):
            sockets[name] = os.get_inheritable(int(name))
    return {"sockets": sockets, "argv": sys.argv, "pid": os.getpid()}


def scribble(event, context):
    """Write event["bytes"] (latin-1 text) to every descriptor from 3 to 99 that takes it, as
    a handler guessing at inherited descriptors would; then to fd 1 and 2."""
    garbage = event["bytes"].encode("latin-1")
    hit = []
    for fd in range(3, 100):
        try:
            os.write(fd, garbage)
            hit.append(fd)
        except OSError:
            pass
    os.write(1, garbage + b"\n")
    os.write(2, garbage + b"\n")
    return {"hit": hit, "pid": os.getpid()}


def corrupt_channel(event, context):
    """Find the worker's channel (its only socket) and write event["bytes"] (latin-1) to it."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                os.write(int(name), event["bytes"].encode("latin-1"))
        except OSError:
            pass
    time.sleep(event.get("s", 0))
    return {"wrote": True}


def break_state(event, context):
    """Leave the worker as event["how"] says; every call reports the state it found."""
    import signal

    found = {
        "pid": os.getpid(),
        "cwd": os.getcwd(),
        "alarm": signal.alarm(0),
        "stdout_ok": sys.stdout is sys.__stdout__ or not sys.stdout.closed,
    }
    print("output of this call")
    logging.getLogger("fixture").warning("logged by this call")
    how = event.get("how")
    if how == "chdir":
        os.chdir("/")
    elif how == "alarm":
        signal.alarm(30)
    elif how == "close_fds":
        os.close(1)
        os.close(2)
    elif how == "replace_fds":
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        os.close(null)
    elif how == "sys_stdout":
        sys.stdout.close()
    elif how == "sys_stderr":
        sys.stderr.close()
    return found


async def stop_loop(event, context):
    """Stop the worker's event loop from inside the handler, then return normally."""
    loop = asyncio.get_running_loop()
    if event.get("how") == "later":
        loop.call_soon(loop.stop)
        await asyncio.sleep(0.01)
    elif event.get("how") == "now":
        loop.stop()
    return {"pid": os.getpid()}


def corrupt_channel_later(event, context):
    """With a "go" path: a thread writes garbage to the worker's channel once the test opens
    the gate there (after this call's reply), then stays: a thread that is not a daemon keeps
    the worker's process alive after its main loop ends."""
    if "go" not in event:
        return {"pid": os.getpid()}

    def later():
        gate = os.open(event["go"], os.O_RDONLY)
        fcntl.flock(gate, fcntl.LOCK_SH)  # blocks while the test holds the gate shut
        os.close(gate)
        corrupt_channel({"bytes": "between calls\n"}, None)
        time.sleep(300)

    threading.Thread(target=later, daemon=False).start()
    return {"pid": os.getpid()}
