import time


def handler(event, context):
    time.sleep(event.get("sleep_s", 0.2))
    return {"slept": event.get("sleep_s", 0.2), "n": event.get("n")}
