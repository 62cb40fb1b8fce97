"""Where an async invocation's outcome goes after its final record.

`routing.py` decides, inside the final write, what each outcome's destinations become (a new
queued invocation, or an outbox row), so the outcome and its routing commit together.
`relay.py` delivers the outbox's rows to their MQTT and webhook targets, store and forward.
"""
