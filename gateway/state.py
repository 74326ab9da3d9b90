"""What a gateway process holds, typed, and the per-process caches over the registry."""

from __future__ import annotations

import dataclasses

from aiohttp import web
from arq.connections import ArqRedis

from config import Settings
from gateway.auth import Authenticator, AuthError, Principal, TokenVerifier
from gateway.caches import Invalidation, Invalidations, TtlCache
from gateway.dispatch import Dispatcher
from gateway.gates import Gates
from gateway.grants import GrantStore
from gateway.registry import AppRecord, Registry, User, VersionRecord
from gateway.secrets import Secrets
from gateway.sessions import Sessions
from workers.blobs import LocalBlobStore, S3BlobStore
from workers.sealing import Keyring


class Catalog:
    """Apps and their live versions, cached briefly and dropped at once on an ``app``
    invalidation; versions are immutable so kept longer."""

    def __init__(self, registry: Registry, ttl_s: float, bus: Invalidations | None = None
                 ) -> None:
        self.registry = registry
        self.bus = bus
        self._apps: TtlCache[str, AppRecord] = TtlCache(ttl_s, bus)
        self._versions: dict[tuple[str, str], VersionRecord] = {}
        if bus is not None:
            bus.listen(self._invalidate)

    def _invalidate(self, event: Invalidation | None) -> None:
        if event is None:
            self._apps.clear()
        elif event.kind == "app":
            self._apps.drop(lambda _, app: app.id == event.key)

    async def app(self, ref: str) -> AppRecord:
        record = self._apps.get(ref)
        if record is None:
            generation = self._apps.generation
            record = await self.registry.app(ref)
            self._apps.put(ref, record, generation)
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
        """Drop the app here; ``changed`` also tells every other gateway."""
        self._apps.drop(lambda _, cached: cached.id == app.id)

    async def changed(self, app: AppRecord) -> None:
        self.forget(app)
        if self.bus is not None:
            await self.bus.publish("app", app.id)


@dataclasses.dataclass
class Gateway:
    settings: Settings
    registry: Registry
    redis: ArqRedis
    sessions: Sessions
    dispatcher: Dispatcher
    verifier: TokenVerifier
    catalog: Catalog
    blobs: LocalBlobStore | S3BlobStore
    auth: Authenticator
    bus: Invalidations
    gates: Gates
    grants: GrantStore
    secrets: Secrets
    farm_keys: Keyring

    async def principal(self, request: web.Request) -> Principal | None:
        """The authenticated caller, None when no credentials were sent."""
        header = request.headers.get("Authorization")
        if header is None:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("malformed", "the Authorization header must be 'Bearer <token>'")
        return await self.auth.verify(token.strip())

    async def caller(self, request: web.Request) -> User | None:
        """The authenticated user, None when no credentials were sent."""
        principal = await self.principal(request)
        return principal.user if principal else None


GATEWAY = web.AppKey("gateway", Gateway)


def may_call(app: AppRecord, user: User | None) -> bool:
    """Without grants: the owner, or anyone for an app that is not private."""
    return app.visibility != "private" or (user is not None and user.id == app.owner_id)
