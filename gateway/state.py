"""What a gateway process holds, typed, and the per-process caches over the registry."""

from __future__ import annotations

import dataclasses
import time

from aiohttp import web
from arq.connections import ArqRedis

from config import Settings
from gateway.auth import AuthError, TokenVerifier
from gateway.dispatch import Dispatcher
from gateway.registry import AppRecord, Registry, User, VersionRecord
from gateway.sessions import Sessions
from workers.blobs import LocalBlobStore


class Catalog:
    """Apps and their live versions, cached briefly; versions are immutable so kept longer."""

    def __init__(self, registry: Registry, ttl_s: float) -> None:
        self.registry = registry
        self.ttl_s = ttl_s
        self._apps: dict[str, tuple[float, AppRecord]] = {}
        self._versions: dict[tuple[str, str], VersionRecord] = {}

    async def app(self, ref: str) -> AppRecord:
        now = time.monotonic()
        cached = self._apps.get(ref)
        if cached and cached[0] > now:
            return cached[1]
        record = await self.registry.app(ref)
        if len(self._apps) > 10_000:
            self._apps.clear()
        self._apps[ref] = (now + self.ttl_s, record)
        return record

    async def version(self, app: AppRecord, version: str) -> VersionRecord:
        key = (app.id, version)
        cached = self._versions.get(key)
        if cached is None:
            cached = await self.registry.version(app.id, version)
            if len(self._versions) > 1_000:
                self._versions.clear()
            self._versions[key] = cached
        return cached

    def forget(self, app: AppRecord) -> None:
        self._apps.pop(app.id, None)
        self._apps.pop(app.name, None)


@dataclasses.dataclass
class Gateway:
    settings: Settings
    registry: Registry
    redis: ArqRedis
    sessions: Sessions
    dispatcher: Dispatcher
    verifier: TokenVerifier
    catalog: Catalog
    blobs: LocalBlobStore

    async def caller(self, request: web.Request) -> User | None:
        """The authenticated user, None when no credentials were sent."""
        header = request.headers.get("Authorization")
        if header is None:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("malformed", "the Authorization header must be 'Bearer <token>'")
        return await self.verifier.verify(token.strip())


GATEWAY = web.AppKey("gateway", Gateway)


def may_call(app: AppRecord, user: User | None) -> bool:
    return app.visibility != "private" or (user is not None and user.id == app.owner_id)
