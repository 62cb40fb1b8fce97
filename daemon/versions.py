"""Deployed code, published versions and aliases: Lambda's deploy model over the config's functions.

- `$LATEST` is what the config gives (`code`, `handler`, `timeout_s`, ...) until a deploy
  (UpdateFunctionCode, `lambdaemon deploy`) replaces its code; the deployed code then stays
  `$LATEST`'s, across restarts and reloads, until the next deploy. Settings always come from the
  config.
- A published version (PublishVersion) is an immutable snapshot of `$LATEST`'s code and of the
  settings a handler sees (handler, timeout, memory, environment), numbered 1, 2, 3 ... per
  function; a number is never given twice.
- An alias names a version (or `$LATEST`), optionally with a second version that takes a share
  of the calls (`RoutingConfig.AdditionalVersionWeights`). Triggers may target an alias, so a
  rollback is one alias update.

Code is unpacked content-addressed under `data_dir/code` (daemon/packages.py), written to a
temporary folder and renamed, and the store commits the change afterwards: a power cut in
between leaves the old code running and, at worst, an unreferenced folder the next collection
removes. Every change is one store transaction with its history entry (who, what, when).

A qualifier resolves per invocation (`resolve`): an async invocation is bound to the version it
resolved to when it was accepted, so its retries run the same code.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from types import ModuleType

import msgspec
import structlog

from daemon.config import ALIAS_NAME, VERSION_NUMBER, FunctionConfig
from daemon.store.deploys import Alias, Change, Code, DeployState, Latest, Settings, Version
from daemon.store.sqlite import Store

log = structlog.get_logger("lambdaemon.versions")


def _packages() -> ModuleType:
    """daemon/packages.py, imported on first use: zipfile, ctypes and pip's helpers stay out
    of a daemon that never deploys (about 1 MB of its idle memory)."""
    from daemon import packages

    return packages


LATEST = "$LATEST"
_REVISIONS = uuid.UUID("5f0b7d0e-6a43-4f5e-9a57-4c2d3f0a1b6e")  # namespace of $LATEST's ids


class DeployError(Exception):
    """A management call refused: Lambda's error code, its HTTP status and what was wrong."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code, self.status, self.message = code, status, message


def not_found(message: str) -> DeployError:
    return DeployError("ResourceNotFoundException", message, 404)


def conflict(message: str) -> DeployError:
    return DeployError("ResourceConflictException", message, 409)


def invalid(message: str) -> DeployError:
    return DeployError("InvalidParameterValueException", message, 400)


def settings_of(fn: FunctionConfig) -> Settings:
    return Settings(fn.handler, fn.timeout_s, fn.memory_mb, dict(fn.env))


def latest_revision(fn: FunctionConfig) -> str:
    """`$LATEST`'s RevisionId: derived from what it runs, so it changes with every deploy or
    settings change and stays the same across restarts."""
    identity = msgspec.json.encode([fn.code, fn.deps, settings_of(fn)])
    return str(uuid.uuid5(_REVISIONS, identity.decode()))


class Resolved(msgspec.Struct, frozen=True):
    """What a qualifier names now: the settings to run and, for an alias, the alias."""

    fn: FunctionConfig
    alias: Alias | None = None


class Versions:
    """The deploy state of every function, in memory and in the store.

    `apply` is called after a change to `$LATEST`'s code, to hand `effective()` of the config's
    functions to the dispatcher and the pool (the service does that, as after a reload).
    `in_use` names the code folders live workers run from, which a collection must keep;
    `retire` stops the workers of a version that is deleted.
    """

    def __init__(
        self,
        store: Store,
        data_dir: Path,
        *,
        keep_versions: int = 10,
        wheelhouse: Path | None = None,
        apply: Callable[[], Awaitable[None]] | None = None,
        in_use: Callable[[], Iterable[str]] = tuple,
        retire: Callable[[str, str], None] | None = None,
    ) -> None:
        self._store = store
        self._data_dir = data_dir
        self.keep_versions = keep_versions
        self._wheelhouse = wheelhouse
        self._apply = apply
        self._in_use = in_use
        self._retire = retire  # the pool's: a deleted version's workers stop
        self._latest: dict[str, Latest] = {}
        self._versions: dict[str, dict[int, Version]] = {}
        self._aliases: dict[str, dict[str, Alias]] = {}
        self._counters: dict[str, int] = {}
        # (name, number) -> (the $LATEST settings it was made from, the version's settings)
        self._configs: dict[tuple[str, int], tuple[FunctionConfig, FunctionConfig]] = {}
        self._lock = asyncio.Lock()  # one change at a time

    async def load(self) -> None:
        state: DeployState = await self._store.load_deployments()
        self._latest = {row.function: row for row in state.latest}
        for version in state.versions:
            self._versions.setdefault(version.function, {})[version.number] = version
        for alias in state.aliases:
            self._aliases.setdefault(alias.function, {})[alias.name] = alias
        self._counters = dict(state.counters)
        for latest in await asyncio.to_thread(self._missing):
            log.error(
                "deployed_code_missing",
                function=latest.function,
                path=latest.code.path,
                detail="the config's code runs instead until the next deploy",
            )

    def _missing(self) -> list[Latest]:
        return [row for row in self._latest.values() if not Path(row.code.path).is_dir()]

    # --- what runs ----------------------------------------------------------------------------

    def effective(self, functions: Mapping[str, FunctionConfig]) -> dict[str, FunctionConfig]:
        """The config's functions with their deployed `$LATEST` code in place of `code`."""
        result = dict(functions)
        for name, latest in self._latest.items():
            fn = functions.get(name)
            if fn is not None and Path(latest.code.path).is_dir():
                result[name] = msgspec.structs.replace(
                    fn, code=latest.code.path, deps=latest.code.deps
                )
        return result

    def resolve(self, fn: FunctionConfig, qualifier: str | None) -> Resolved:
        """The settings a call of `fn` (its `$LATEST`) with `qualifier` runs; a weighted alias
        picks its version here, once per call. Raises DeployError (not found)."""
        if qualifier is None or qualifier == LATEST:
            return Resolved(fn)
        if VERSION_NUMBER.match(qualifier):
            return Resolved(self.version_config(fn, int(qualifier)))
        alias = self._aliases.get(fn.name, {}).get(qualifier)
        if alias is None:
            raise not_found(f"Function not found: {fn.arn}:{qualifier}")
        version = alias.version
        for extra, weight in alias.weights.items():
            if random.random() < weight:
                version = extra
        target = fn if version == LATEST else self.version_config(fn, int(version))
        return Resolved(target, alias)

    def describe(self, fn: FunctionConfig, qualifier: str | None) -> Resolved:
        """As resolve, without the weighted pick: an alias describes its main version."""
        if qualifier is not None and ALIAS_NAME.match(qualifier) and qualifier != LATEST:
            alias = self._aliases.get(fn.name, {}).get(qualifier)
            if alias is None:
                raise not_found(f"Function not found: {fn.arn}:{qualifier}")
            return Resolved(self.resolve(fn, alias.version).fn, alias)
        return self.resolve(fn, qualifier)

    def version_config(self, fn: FunctionConfig, number: int) -> FunctionConfig:
        """Version `number` of `fn` as settings to run (the same object while `fn` is)."""
        cached = self._configs.get((fn.name, number))
        if cached is not None and cached[0] is fn:
            return cached[1]
        version = self._versions.get(fn.name, {}).get(number)
        if version is None:
            raise not_found(f"Function not found: {fn.arn}:{number}")
        s = version.settings
        config = msgspec.structs.replace(
            fn,
            version=str(number),
            code=version.code.path,
            deps=version.code.deps,
            handler=s.handler,
            timeout_s=s.timeout_s,
            memory_mb=s.memory_mb,
            env=dict(s.env),
        )
        self._configs[(fn.name, number)] = (fn, config)
        return config

    def deployed(self, name: str) -> Latest | None:
        return self._latest.get(name)

    def version(self, name: str, number: int) -> Version | None:
        return self._versions.get(name, {}).get(number)

    def versions(self, name: str) -> list[Version]:
        return [v for _, v in sorted(self._versions.get(name, {}).items())]

    def aliases(self, name: str) -> list[Alias]:
        return [a for _, a in sorted(self._aliases.get(name, {}).items())]

    def alias(self, fn: FunctionConfig, name: str) -> Alias:
        alias = self._aliases.get(fn.name, {}).get(name)
        if alias is None:
            raise not_found(f"Alias not found: {fn.arn}:{name}")
        return alias

    async def code_of(self, fn: FunctionConfig) -> Code:
        """`$LATEST`'s code: the deployed package, or the config's folder as a package would
        describe it (its CodeSha256 is that of the zip `lambdaemon deploy` would send)."""
        latest = self._latest.get(fn.name)
        if latest is not None and latest.code.path == fn.code:
            return latest.code
        assert fn.code is not None
        data = await asyncio.to_thread(_packages().zip_folder, Path(fn.code))
        return Code(package_sha256(data), len(data), fn.code, fn.deps)

    async def history(self, name: str, limit: int = 100, before: int | None = None) -> list[Change]:
        return await self._store.deploy_history(name, limit, before)

    # --- changes ------------------------------------------------------------------------------

    async def deploy(
        self,
        fn: FunctionConfig,
        zip_bytes: bytes,
        *,
        actor: str,
        revision_id: str | None = None,
        publish: bool = False,
    ) -> Version | None:
        """UpdateFunctionCode: unpack, build its environment, then make it `$LATEST`'s code.
        Warm workers of the old code finish their calls and are replaced. With `publish`, a
        version of the new code is published too (and returned)."""
        async with self._lock:
            if revision_id is not None and revision_id != latest_revision(fn):
                raise precondition(fn, revision_id, latest_revision(fn))
            code = await self._unpack(zip_bytes)
            previous = self._latest.get(fn.name)
            latest = Latest(fn.name, code, time.time(), str(uuid.uuid4()))
            change = Change(
                fn.name,
                latest.deployed_at,
                "deploy",
                actor,
                version=LATEST,
                previous=previous.code.sha256 if previous else None,
                detail={"code_sha256": code.sha256, "code_size": code.size},
            )
            await self._store.save_latest(latest, change)
            self._latest[fn.name] = latest
            log.info(
                "function_deployed",
                function=fn.name,
                code_sha256=code.sha256,
                code_size=code.size,
                deps=code.deps is not None,
                actor=actor,
            )
            if self._apply is not None:
                await self._apply()
        published = None
        if publish:
            # What apply made $LATEST now: the new code with the config's settings.
            fn = msgspec.structs.replace(fn, code=code.path, deps=code.deps)
            published = await self.publish(fn, actor=actor)
        await self.collect()
        return published

    async def publish(
        self,
        fn: FunctionConfig,
        *,
        actor: str,
        code_sha256: str | None = None,
        description: str = "",
        revision_id: str | None = None,
    ) -> Version:
        """PublishVersion: snapshot `$LATEST` as the next number; nothing new when the newest
        version already has the same code and settings (it is returned, as Lambda does)."""
        async with self._lock:
            if revision_id is not None and revision_id != latest_revision(fn):
                raise precondition(fn, revision_id, latest_revision(fn))
            deployed = self._latest.get(fn.name)
            data = None
            if deployed is not None and deployed.code.path == fn.code:
                code = deployed.code
            else:  # the config's folder, which can change under us: the version gets a copy
                assert fn.code is not None
                data = await asyncio.to_thread(_packages().zip_folder, Path(fn.code))
                code = Code(package_sha256(data), len(data), fn.code, fn.deps)
            if code_sha256 is not None and code_sha256 != code.sha256:
                raise invalid(
                    f"CodeSHA256 ({code_sha256}) is different from current CodeSHA256 in"
                    f" $LATEST ({code.sha256}). Please try again with the current CodeSHA256."
                )
            settings = settings_of(fn)
            for newest in self.versions(fn.name)[-1:]:
                if newest.code.sha256 == code.sha256 and newest.settings == settings:
                    return newest
            if data is not None:
                code = await self._unpack(data)
            number = max([self._counters.get(fn.name, 0), *self._versions.get(fn.name, {})])
            version = Version(
                fn.name,
                number + 1,
                code,
                settings,
                description,
                time.time(),
                str(uuid.uuid4()),
            )
            change = Change(
                fn.name,
                version.published_at,
                "publish",
                actor,
                version=str(version.number),
                detail={"code_sha256": code.sha256, "description": description},
            )
            await self._store.save_version(version, change)
            self._versions.setdefault(fn.name, {})[version.number] = version
            self._counters[fn.name] = version.number
            log.info(
                "version_published",
                function=fn.name,
                version=version.number,
                code_sha256=code.sha256,
                actor=actor,
            )
        await self.collect()
        return version

    async def put_alias(
        self,
        fn: FunctionConfig,
        name: str,
        *,
        actor: str,
        version: str | None = None,
        weights: dict[str, float] | None = None,
        description: str | None = None,
        revision_id: str | None = None,
        create: bool,
        action: str | None = None,
    ) -> Alias:
        """CreateAlias (`create`) or UpdateAlias: fields left None keep their value."""
        async with self._lock:
            if not ALIAS_NAME.match(name):
                raise invalid(
                    f"alias name {name!r} must be 1-128 letters, digits, '-' or '_', not all digits"
                )
            old = self._aliases.get(fn.name, {}).get(name)
            if create and old is not None:
                raise conflict(f"Alias already exists: {fn.arn}:{name}")
            if not create and old is None:
                raise not_found(f"Alias not found: {fn.arn}:{name}")
            if old is not None and revision_id is not None and revision_id != old.revision_id:
                raise precondition(fn, revision_id, old.revision_id)
            version = version if version is not None else (old.version if old else None)
            if version is None:
                raise invalid("FunctionVersion is required")
            self._check_target(fn, version)
            weights = weights if weights is not None else (old.weights if old else {})
            self._check_weights(fn, version, weights)
            alias = Alias(
                fn.name,
                name,
                version,
                dict(weights),
                description if description is not None else (old.description if old else ""),
                time.time(),
                str(uuid.uuid4()),
            )
            action = action or ("create_alias" if create else "update_alias")
            change = Change(
                fn.name,
                alias.updated_at,
                action,
                actor,
                version=version,
                alias=name,
                previous=old.version if old else None,
                detail={"weights": alias.weights} if alias.weights else {},
            )
            await self._store.save_alias(alias, change)
            self._aliases.setdefault(fn.name, {})[name] = alias
            log.info(
                "alias_changed",
                function=fn.name,
                alias=name,
                version=version,
                weights=alias.weights or None,
                previous=change.previous,
                actor=actor,
            )
        await self.collect()
        return alias

    async def rollback(self, fn: FunctionConfig, name: str, *, actor: str) -> Alias:
        """Alias `name` one step back: a canary (weights) is dropped first; otherwise the alias
        goes back to the version it named before, and a second rollback goes further back."""
        alias = self.alias(fn, name)
        if alias.weights:
            target = alias.version
        else:
            changes = await self._store.deploy_history(fn.name, limit=10_000)
            stack: list[str] = []
            for change in reversed(changes):  # oldest first
                if change.alias != name or change.version is None:
                    continue
                if change.action == "rollback":
                    # one that only dropped a canary left the version where it was
                    if stack and change.previous != change.version:
                        stack.pop()
                elif change.action == "delete_alias":
                    stack.clear()
                elif not stack or stack[-1] != change.version:
                    stack.append(change.version)
            if len(stack) < 2:
                raise conflict(f"alias {name} of {fn.name} has no earlier version to roll back to")
            target = stack[-2]
            if target != LATEST and int(target) not in self._versions.get(fn.name, {}):
                raise conflict(
                    f"alias {name} of {fn.name} named version {target} before, and that version"
                    f" is deleted (keep_versions = {self.keep_versions} keeps the newest"
                    " unless an alias needs an older one)"
                )
        return await self.put_alias(
            fn,
            name,
            actor=actor,
            version=target,
            weights={},
            revision_id=alias.revision_id,
            create=False,
            action="rollback",
        )

    async def delete_alias(self, fn: FunctionConfig, name: str, *, actor: str) -> None:
        async with self._lock:
            old = self.alias(fn, name)
            change = Change(
                fn.name,
                time.time(),
                "delete_alias",
                actor,
                version=old.version,
                alias=name,
                previous=old.version,
            )
            await self._store.delete_alias(fn.name, name, change)
            del self._aliases[fn.name][name]
            log.info("alias_deleted", function=fn.name, alias=name, actor=actor)
        await self.collect()

    async def delete_version(self, fn: FunctionConfig, number: int, *, actor: str) -> None:
        """DeleteFunction with a version qualifier; refused while an alias or a queued
        invocation still needs it."""
        async with self._lock:
            if number not in self._versions.get(fn.name, {}):
                raise not_found(f"Function not found: {fn.arn}:{number}")
            if users := self._alias_users(fn.name, str(number)):
                raise conflict(
                    "Unable to delete version because the following aliases reference it: "
                    f"[{', '.join(users)}]"
                )
            if str(number) in await self._store.pending_versions(fn.name):
                raise conflict(
                    f"Unable to delete version {number}: queued invocations are bound to it"
                )
            change = Change(fn.name, time.time(), "delete_version", actor, version=str(number))
            await self._store.delete_versions(fn.name, [number], change)
            self._drop_versions(fn.name, [number])
            log.info("version_deleted", function=fn.name, version=number, actor=actor)
        await self.collect()

    async def collect(self) -> list[Path]:
        """Delete unreferenced versions beyond `keep_versions` (the newest are kept), then the
        code and environments nothing refers to any more."""
        async with self._lock:
            for name, versions in self._versions.items():
                numbers = sorted(versions)
                old = numbers[: max(0, len(numbers) - self.keep_versions)]
                if not old:
                    continue
                pending = await self._store.pending_versions(name)
                gone = [
                    n for n in old if not self._alias_users(name, str(n)) and str(n) not in pending
                ]
                if gone:
                    change = Change(
                        name,
                        time.time(),
                        "delete_version",
                        "lambdaemon (keep_versions)",
                        detail={"versions": gone},
                    )
                    await self._store.delete_versions(name, gone, change)
                    self._drop_versions(name, gone)
                    log.info("versions_collected", function=name, versions=gone)
            keep = {Path(p) for p in self._in_use() if p}
            for latest in self._latest.values():
                keep.update(_paths(latest.code))
            for versions in self._versions.values():
                for version in versions.values():
                    keep.update(_paths(version.code))
            removed: list[Path] = await asyncio.to_thread(
                _packages().collect_garbage, self._data_dir, keep
            )
        if removed:
            log.info("code_collected", removed=[str(p) for p in removed])
        return removed

    # --- helpers ------------------------------------------------------------------------------

    async def _unpack(self, zip_bytes: bytes) -> Code:
        package = await asyncio.to_thread(_packages().store_package, zip_bytes, self._data_dir)
        deps = await _packages().build_environment(package.path, self._data_dir, self._wheelhouse)
        return Code(package.sha256, package.size, str(package.path), str(deps) if deps else None)

    def _check_target(self, fn: FunctionConfig, version: str) -> None:
        if version == LATEST:
            return
        if not VERSION_NUMBER.match(version):
            raise invalid(f"FunctionVersion {version!r} is not $LATEST or a version number")
        if int(version) not in self._versions.get(fn.name, {}):
            raise not_found(f"Function not found: {fn.arn}:{version}")

    def _check_weights(self, fn: FunctionConfig, version: str, weights: dict[str, float]) -> None:
        if not weights:
            return
        if len(weights) > 1:
            raise invalid("AdditionalVersionWeights takes one extra version at most")
        ((extra, weight),) = weights.items()
        if not 0.0 <= weight <= 1.0:
            raise invalid(f"the weight of version {extra} must be from 0.0 to 1.0, not {weight}")
        if version == LATEST or extra == LATEST:
            raise invalid("a weighted alias needs published versions on both sides, not $LATEST")
        if extra == version:
            raise invalid(f"version {extra} is the alias's main version and its extra version")
        self._check_target(fn, extra)

    def _alias_users(self, name: str, version: str) -> list[str]:
        return sorted(
            a.name
            for a in self._aliases.get(name, {}).values()
            if a.version == version or version in a.weights
        )

    def _drop_versions(self, name: str, numbers: list[int]) -> None:
        for n in numbers:
            self._versions.get(name, {}).pop(n, None)
            self._configs.pop((name, n), None)
            if self._retire is not None:
                self._retire(name, str(n))


def precondition(fn: FunctionConfig, given: str, current: str) -> DeployError:
    return DeployError(
        "PreconditionFailedException",
        f"The Revision Id provided ({given}) does not match the latest Revision Id ({current})"
        f" of {fn.arn}. Call GetFunction or GetAlias to retrieve the latest Revision Id.",
        412,
    )


def invoked_arn(fn: FunctionConfig, qualifier: str | None) -> str:
    """The ARN a call names: qualified unless it names `$LATEST` implicitly."""
    return f"{fn.arn}:{qualifier}" if qualifier and qualifier != LATEST else fn.arn


def package_sha256(zip_bytes: bytes) -> str:
    """Lambda's CodeSha256 of a package: base64 of the SHA-256 of its zip."""
    return base64.b64encode(hashlib.sha256(zip_bytes).digest()).decode()


def _paths(code: Code) -> list[Path]:
    return [Path(code.path)] + ([Path(code.deps)] if code.deps else [])
