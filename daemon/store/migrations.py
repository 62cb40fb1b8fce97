"""The store's schema, one entry per version; daemon/store/batches.py applies them in order.

Append a new entry for every change; never edit one that has shipped.
"""

from __future__ import annotations

from daemon.models import Status

_STATUSES = ", ".join(f"'{s.value}'" for s in Status)

# One entry per schema version; each runs in its own transaction together with its version bump.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        f"""CREATE TABLE invocations (
            id TEXT PRIMARY KEY,
            function TEXT NOT NULL,
            function_version TEXT NOT NULL,
            trigger TEXT NOT NULL,
            trigger_id TEXT,
            invocation_type TEXT NOT NULL CHECK (invocation_type IN ('sync', 'async')),
            status TEXT NOT NULL CHECK (status IN ({_STATUSES})),
            attempt INTEGER NOT NULL DEFAULT 0,
            dedupe_key TEXT UNIQUE,
            queued_at REAL NOT NULL,
            started_at REAL, ended_at REAL, next_attempt_at REAL,
            duration_ms REAL, billed_duration_ms INTEGER, init_duration_ms REAL,
            max_memory_mb REAL,
            error_type TEXT, error_message TEXT, exit_code INTEGER, signal INTEGER,
            worker_pid INTEGER,
            recoveries INTEGER NOT NULL DEFAULT 0,
            parent_id TEXT,
            event BLOB NOT NULL,
            result BLOB,
            logs TEXT
        )""",
        "CREATE INDEX invocations_status_next ON invocations (status, next_attempt_at)",
        "CREATE INDEX invocations_function_queued ON invocations (function, queued_at)",
        "CREATE INDEX invocations_queued ON invocations (queued_at)",
        # load_queued pages through queued rows only; the rest of the table can be huge.
        "CREATE INDEX invocations_waiting ON invocations (queued_at, id) WHERE status = 'queued'",
        f"""CREATE TABLE attempts (
            invocation_id TEXT NOT NULL REFERENCES invocations (id) ON DELETE CASCADE,
            attempt INTEGER NOT NULL,
            status TEXT NOT NULL CHECK (status IN ({_STATUSES})),
            started_at REAL, ended_at REAL, duration_ms REAL,
            error_type TEXT, error_message TEXT, exit_code INTEGER, signal INTEGER,
            worker_pid INTEGER,
            PRIMARY KEY (invocation_id, attempt)
        ) WITHOUT ROWID""",
    ),
    # v2: async retries and dead letters. A dead letter keeps its final status and gains a
    # reason; a redrive starts a fresh retry budget (retry_base) and age (redriven_at) on the
    # same row, so attempt numbers keep counting up and every attempt stays in `attempts`.
    (
        "ALTER TABLE invocations ADD COLUMN dead_letter_reason TEXT",
        "ALTER TABLE invocations ADD COLUMN dead_lettered_at REAL",
        "ALTER TABLE invocations ADD COLUMN redrives INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE invocations ADD COLUMN retry_base INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE invocations ADD COLUMN redriven_at REAL",
        # The dead-letter list pages through dead letters only, newest first.
        "CREATE INDEX invocations_dead ON invocations (dead_lettered_at, id)"
        " WHERE dead_letter_reason IS NOT NULL",
        # What each attempt printed, so a retried failure's output is not overwritten.
        "ALTER TABLE attempts ADD COLUMN logs TEXT",
    ),
    # v3: destinations. `hops` counts the destination hops from the chain's first invocation,
    # so a function that triggers itself is stopped (daemon/destinations/routing.py). The outbox
    # holds the mqtt: and webhook: destination records until their target acknowledges them; a
    # row is written in the same transaction as the invocation's final record and deleted once
    # delivered, or kept as 'failed' when the target refused it for good. No foreign key:
    # pruning an old invocation must never take an undelivered record with it.
    (
        "ALTER TABLE invocations ADD COLUMN hops INTEGER NOT NULL DEFAULT 0",
        """CREATE TABLE outbox (
            id INTEGER PRIMARY KEY,
            invocation_id TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            condition TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('mqtt', 'webhook')),
            target TEXT NOT NULL,
            record BLOB NOT NULL,
            created_at REAL NOT NULL,
            status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'failed')),
            attempts INTEGER NOT NULL DEFAULT 0,
            last_attempt_at REAL,
            last_error TEXT,
            UNIQUE (invocation_id, attempt)
        )""",
        "CREATE INDEX outbox_pending ON outbox (id) WHERE status = 'pending'",
    ),
    # v4: the tables the cron trigger and the store health probe used to create on first use.
    # `cron_fires` holds each cron trigger's last nominal fire, committed with its invocation;
    # `store_probe` is the one row the health probe rewrites. IF NOT EXISTS: a database that an
    # earlier release gave them already keeps them (and their rows) as they are.
    (
        "CREATE TABLE IF NOT EXISTS cron_fires"
        " (trigger_id TEXT PRIMARY KEY, last_nominal TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS store_probe"
        " (id INTEGER PRIMARY KEY CHECK (id = 1), written_at REAL NOT NULL)",
    ),
    # v5: deployed code, published versions, aliases and their history (daemon/versions.py).
    # Each row's body is one msgspec-encoded struct of daemon/store/deploys.py; the keys are
    # columns so a lookup or a delete names them. `version_counters` holds the last version
    # number given out per function, so a deleted version's number is never given again.
    (
        "CREATE TABLE deployed_code (function TEXT PRIMARY KEY, body BLOB NOT NULL)",
        "CREATE TABLE function_versions (function TEXT NOT NULL, version INTEGER NOT NULL,"
        " body BLOB NOT NULL, PRIMARY KEY (function, version))",
        "CREATE TABLE function_aliases (function TEXT NOT NULL, name TEXT NOT NULL,"
        " body BLOB NOT NULL, PRIMARY KEY (function, name))",
        "CREATE TABLE version_counters (function TEXT PRIMARY KEY, last INTEGER NOT NULL)",
        "CREATE TABLE deploy_history (id INTEGER PRIMARY KEY, function TEXT NOT NULL,"
        " at REAL NOT NULL, body BLOB NOT NULL)",
        "CREATE INDEX deploy_history_by_function ON deploy_history (function, id)",
    ),
    # v6: batches (daemon/batches.py). A batch invocation is a row of its own (trigger 'batch',
    # batch_id = its own id) holding what the handler got and returned; each item keeps its own
    # row and retry budget, and `batch_id` names the batch its latest attempt ran in, each
    # attempts row the batch of that attempt. The partial index lists a batch's items without
    # costing anything to invocations that never ran in one.
    (
        "ALTER TABLE invocations ADD COLUMN batch_id TEXT",
        "ALTER TABLE attempts ADD COLUMN batch_id TEXT",
        "CREATE INDEX attempts_by_batch ON attempts (batch_id) WHERE batch_id IS NOT NULL",
    ),
)
