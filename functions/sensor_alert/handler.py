"""Example MQTT handler: raise an alert when a sensor reports a temperature above a threshold.

Wire it to a topic such as `sensors/+/temperature`. The payload may be a bare number (`23.5`)
or JSON with a `celsius`, `temperature` or `temp` field (`{"celsius": 23.5}`). The threshold is
the function's `ALERT_ABOVE_C` environment variable (default 30).
"""

import os

THRESHOLD_C = float(os.environ.get("ALERT_ABOVE_C", "30"))  # read once per warm worker
FIELDS = ("celsius", "temperature", "temp")


def reading(payload):
    """The temperature in a payload, or None when there is none."""
    if isinstance(payload, dict):
        payload = next((payload[k] for k in FIELDS if k in payload), None)
    try:
        return float(payload) if not isinstance(payload, bool) else None
    except (TypeError, ValueError):
        return None


def handler(event, context):
    topic = event.get("topic", "")
    sensor = topic.split("/")[1] if topic.count("/") >= 2 else topic  # sensors/<id>/...
    celsius = reading(event.get("payload"))
    if celsius is None:
        print(f"{sensor}: no temperature in {event.get('payload')!r}; ignored")
        return {"sensor": sensor, "alert": False, "reason": "no reading"}
    alert = celsius > THRESHOLD_C
    if alert:
        # A real deployment would notify someone here: a webhook, a relay, a buzzer.
        print(f"ALERT {sensor}: {celsius:.1f} °C is above {THRESHOLD_C:.1f} °C")
    else:
        print(f"{sensor}: {celsius:.1f} °C, fine")
    return {
        "sensor": sensor,
        "celsius": celsius,
        "threshold_c": THRESHOLD_C,
        "alert": alert,
        "received_at": event.get("received_at"),
        "request_id": context.aws_request_id,
    }
