"""The daemon's HTTP listeners: the Invoke/admin API, the webhook routes, and the fast request path.

`api.py` serves Lambda's Invoke API and /health, `admin.py` the JSON endpoints under /v1/,
`idempotency.py` keeps a re-sent synchronous call to one run, and `wire.py` frames plain
requests without aiohttp's per-request machinery. `webhooks.py` serves the webhook trigger
source's routes (triggers/webhook.py: settings, auth, route table) on a listener of their own.
"""
