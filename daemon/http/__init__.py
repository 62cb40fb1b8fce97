"""The daemon's HTTP listeners: the Invoke/admin API, and the fast request path both listeners use.

`api.py` serves Lambda's Invoke API and /health, `admin.py` the JSON endpoints under /v1/,
`idempotency.py` keeps a re-sent synchronous call to one run, and `wire.py` frames plain
requests without aiohttp's per-request machinery. The webhook routes are a trigger source
(triggers/webhook.py) on a listener of their own.
"""
