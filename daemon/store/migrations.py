"""The store's schema, one entry per version; daemon/store/batches.py applies them in order.

Append a new entry for every change; never edit one that has shipped.
"""

from __future__ import annotations

from daemon.models import Status

_STATUSES = ", ".join(f"'{s.value}'" for s in Status)
# An attempt's UTC day (days since the epoch) and billed milliseconds, in SQL, for `row`.
_DAY = "CAST(COALESCE({row}.ended_at, {row}.started_at, 0) / 86400 AS INTEGER)"
_BILLED = (
    "CASE WHEN {row}.duration_ms IS NULL THEN 0 ELSE max(1, CAST({row}.duration_ms AS INTEGER)"
    " + ({row}.duration_ms > CAST({row}.duration_ms AS INTEGER))) END"
)

# Each node of the store: when it started, its lease (until `lease_until`, on the database's
# clock), what it runs now (`load`, JSON) and when it stopped cleanly (NULL: running, or dead).
NODES_TABLE = """CREATE TABLE nodes (
    node_id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at {real} NOT NULL,
    heartbeat_at {real} NOT NULL,
    lease_s {real} NOT NULL,
    lease_until {real} NOT NULL,
    stopped_at {real},
    load TEXT
)"""

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
    # v7: history queries and usage metering (daemon/store/history.py, daemon/store/usage.py).
    # History pages go newest first by (queued_at, rowid): one (column, queued_at) index per
    # filter, beside (function, queued_at) and (queued_at) from v1. (status, queued_at) replaces
    # (status, next_attempt_at), which no query needs: every status lookup is an equality.
    (
        "CREATE INDEX invocations_status_queued ON invocations (status, queued_at)",
        "CREATE INDEX invocations_trigger_queued ON invocations (trigger, queued_at)",
        "CREATE INDEX invocations_version_queued ON invocations (function_version, queued_at)",
        "DROP INDEX invocations_status_next",
        # One row per UTC day (days since 1970-01-01) and function: what its attempts used.
        # mb_ms sums memory_mb x billed_ms per attempt, so GB-seconds stay exact across a
        # change of memory_mb. Pruning records never touches it.
        """CREATE TABLE usage_daily (
            day INTEGER NOT NULL,
            function TEXT NOT NULL,
            requests INTEGER NOT NULL DEFAULT 0,
            errors INTEGER NOT NULL DEFAULT 0,
            duration_ms REAL NOT NULL DEFAULT 0,
            billed_ms INTEGER NOT NULL DEFAULT 0,
            mb_ms INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (day, function)
        ) WITHOUT ROWID""",
        # Each function's memory_mb as configured, written at start and on every change.
        "CREATE TABLE usage_memory (function TEXT PRIMARY KEY, memory_mb INTEGER NOT NULL)"
        " WITHOUT ROWID",
        # Counts an attempt as its attempts row is first written, in that write's transaction:
        # a commit holds both or neither, and a repeated write of the same attempt (INSERT OR
        # REPLACE after an ambiguous commit, a late sync final) finds its row and adds nothing.
        # BEFORE: the row a REPLACE would delete is still there to be found. Billed as Lambda
        # bills: the duration rounded up to the next millisecond, 1 ms at least; an attempt
        # that a daemon crash interrupted has no measured duration and bills nothing. A batch
        # (v6) is one request, its own row's: its items' attempts, whose rows name the batch
        # they ran in, count nothing of their own.
        f"""CREATE TRIGGER usage_count BEFORE INSERT ON attempts
        WHEN NEW.status NOT IN ('queued', 'running') AND NOT EXISTS (
            SELECT 1 FROM attempts WHERE invocation_id = NEW.invocation_id
            AND attempt = NEW.attempt)
        BEGIN
            INSERT INTO usage_daily (day, function, requests, errors, duration_ms, billed_ms,
                mb_ms)
            SELECT day, function, 1, NEW.status != 'succeeded', COALESCE(NEW.duration_ms, 0),
                billed, billed * COALESCE(
                    (SELECT memory_mb FROM usage_memory m WHERE m.function = f.function), 128)
            FROM (SELECT {_DAY.format(row="NEW")} AS day,
                    (SELECT function FROM invocations WHERE id = NEW.invocation_id
                        AND (batch_id IS NULL OR batch_id = id)) AS function,
                    {_BILLED.format(row="NEW")} AS billed) f
            WHERE function IS NOT NULL
            ON CONFLICT (day, function) DO UPDATE SET requests = requests + 1,
                errors = errors + excluded.errors,
                duration_ms = duration_ms + excluded.duration_ms,
                billed_ms = billed_ms + excluded.billed_ms, mb_ms = mb_ms + excluded.mb_ms;
        END""",
        # What the records already kept, counted once (at 128 MB: memory_mb was not recorded).
        f"""INSERT INTO usage_daily (day, function, requests, errors, duration_ms, billed_ms,
            mb_ms)
        SELECT {_DAY.format(row="a")}, i.function, count(*), sum(a.status != 'succeeded'),
            sum(COALESCE(a.duration_ms, 0)), sum({_BILLED.format(row="a")}),
            128 * sum({_BILLED.format(row="a")})
        FROM attempts a JOIN invocations i ON i.id = a.invocation_id
        WHERE a.status NOT IN ('queued', 'running') AND a.batch_id IS NULL
        GROUP BY 1, 2""",
    ),
    # v8: failures of one function, the history query people make most (`lambdaemon
    # invocations --function F --status failed`), walk their own index: with only (status, ...)
    # or (function, ...) to walk, a rare combination stepped over most of a function's records.
    ("CREATE INDEX invocations_function_status ON invocations (function, status, queued_at)",),
    # v9: the fleet (docs/store.md): `node` names the node that owns an invocation (it runs it)
    # and the node that ran each attempt; `nodes` holds each node's lease and load. On SQLite
    # the store has one node: its row in `nodes`, and `node` stays empty in the records.
    (
        "ALTER TABLE invocations ADD COLUMN node TEXT",
        "ALTER TABLE attempts ADD COLUMN node TEXT",
        NODES_TABLE.format(real="REAL"),
    ),
)
