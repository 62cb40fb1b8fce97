import fcntl
import os


def handler(event, context):
    # Holds its slot until the test opens the gate (tests/daemon_proc.py, Gate), so "busy" is a
    # state, not a race. The function's timeout_s bounds the wait.
    gate = os.open(os.path.join(os.environ["GATE_DIR"], "gate"), os.O_RDONLY)
    fcntl.flock(gate, fcntl.LOCK_SH)
    os.close(gate)
    return {"released": True}
