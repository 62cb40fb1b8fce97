import os
import time


def handler(event, context):
    # Holds its slot until the test creates the release file, so "busy" is a state, not a race.
    release = os.path.join(os.environ["GATE_DIR"], "release")
    deadline = time.monotonic() + 20
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
    return {"released": os.path.exists(release)}
