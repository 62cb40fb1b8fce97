"""The invocation store: the only part of lambdaemon that speaks SQL.

- `sqlite.py`: `Store`, the one interface the rest of the daemon calls: connections, the
  group-commit writer and every named query;
- `batches.py`: how a batch of writes runs as one transaction in the database thread;
- `records.py`: the invocation record's rows and statements;
- `settle.py`: the final record of an invocation, written with the destination it routes to;
- `cron.py`: the cron trigger's last fires, marked in the transaction of their invocations;
- `outbox.py`: the mqtt: and webhook: destination records waiting for delivery;
- `history.py`: pages of invocation summaries by filter, newest first, keyed on the id;
- `usage.py`: the daily usage roll-ups (filled by a trigger in the schema) and their queries;
- `migrations.py`: the versioned schema, every table the daemon uses;
- `retention.py`: pruning by age and size, so a small disk never fills;
- `health.py`: whether the store can take writes now, for /health, the logs and systemd.
"""
