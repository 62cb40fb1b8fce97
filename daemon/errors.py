"""The daemon's exception hierarchy: one root, a subclass only where a caller catches it."""


class LambdaemonError(Exception):
    """Root of every error lambdaemon raises on purpose."""


class ConfigError(LambdaemonError, ValueError):
    """The configuration is invalid; the message names the file, the key path and the reason."""

    def __init__(self, path: object, key: str, reason: str) -> None:
        self.path = str(path)
        self.key = key
        self.reason = reason
        where = f"{self.path}: {key}" if key else self.path
        super().__init__(f"{where}: {reason}")


class EventRejectedError(LambdaemonError, ValueError):
    """An input a trigger source cannot turn into an event; the message says why."""


class StoreUnavailableError(LambdaemonError, OSError):
    """The invocation store cannot accept writes (disk full, read-only, closed)."""


class StoreReplacedError(StoreUnavailableError):
    """The database file was deleted or replaced while the store had it open: the store's writes
    would go to a file nobody will read again, so it takes none until the daemon restarts."""


class StoreOpenError(LambdaemonError, OSError):
    """The database file exists but cannot be used as the store (not a database, corrupt)."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        super().__init__(f"{path}: cannot be opened as lambdaemon's database: {reason}")


class UnknownFunctionError(LambdaemonError, KeyError):
    """No function of that name is configured (or a reload removed it)."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"function {name!r} is not configured")


class BatchReplayError(LambdaemonError, ValueError):
    """A batch invocation was asked to be replayed: its items are, one by one."""

    def __init__(self, invocation_id: str) -> None:
        super().__init__(
            f"{invocation_id} is a batch invocation; replay its items"
            f" (lambdaemon show {invocation_id} lists them)"
        )


class QueueFullError(LambdaemonError):
    """A function's bounded wait queue is full; the caller should retry later."""

    def __init__(self, function: str, limit: int) -> None:
        self.function = function
        self.limit = limit
        super().__init__(
            f"function {function!r} is at its concurrency limit and {limit} callers wait"
        )


class ListenError(LambdaemonError, OSError):
    """A listener could not bind its address (in use, not ours, bad permissions)."""


class ShuttingDownError(LambdaemonError):
    """The daemon is draining: nothing new starts; the caller should retry after the restart."""


class PoolClosedError(LambdaemonError, RuntimeError):
    """The worker pool is not running (not started yet, or closed): nothing more runs on it."""


class ApiError(LambdaemonError):
    """A CLI command's request to the running daemon failed: unreachable, or refused (4xx/5xx)."""


class MqttPublishError(LambdaemonError, ConnectionError):
    """A message the broker did not acknowledge; `permanent` when it refused it for good."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class PackageError(LambdaemonError, ValueError):
    """A deployment package, or the requirements it lists, that cannot be used: `code` and
    `status` are the Lambda error to answer with, `message` says what was wrong and where."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.message = message
