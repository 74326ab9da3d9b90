"""Who is calling: API tokens (``ul_`` plus 192 random bits, shown once, stored only as a SHA-256
hash, found by a short prefix) and Supabase JWTs, both turned into a ``Principal``."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import secrets
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import structlog

from gateway import GatewayError
from gateway.caches import Invalidation, Invalidations, TtlCache
from gateway.registry import AppRecord, Conflict, Registry, RegistryError, TokenRecord, User

if TYPE_CHECKING:
    from gateway.supabase import JwtVerifier

log = structlog.get_logger(__name__)

TOKEN_PREFIX = "ul_"
LOOKUP_CHARS = 8
# What a token may be used for; "*" is everything.
SCOPES = ("mcp", "apps", "grants", "env", "secrets", "tokens")
ALL_SCOPES = ("*",)
# last_used_at is written at most this often per token and gateway.
TOUCH_INTERVAL_S = 60.0


class AuthError(GatewayError):
    """The caller could not be identified; ``reason`` says which case it was."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Principal:
    """An authenticated caller and what its credential allows."""

    user: User
    scopes: frozenset[str] = frozenset(ALL_SCOPES)
    # None: any app, any function.
    apps: frozenset[str] | None = None
    functions: frozenset[str] | None = None
    token_id: str | None = None

    def has_scope(self, scope: str) -> bool:
        return "*" in self.scopes or scope in self.scopes

    def may_use_app(self, app: AppRecord) -> bool:
        return self.apps is None or app.name in self.apps or app.id in self.apps

    def may_use_function(self, name: str) -> bool:
        return self.functions is None or name in self.functions


@dataclasses.dataclass(frozen=True)
class IssuedToken:
    token: str
    token_id: str
    user: User


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def lookup_prefix(token: str) -> str:
    return token[len(TOKEN_PREFIX):len(TOKEN_PREFIX) + LOOKUP_CHARS]


def check_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(s.strip() for s in scopes if s.strip()))
    unknown = [s for s in chosen if s not in (*SCOPES, "*")]
    if unknown:
        raise AuthError("bad_scope", f"unknown scope {unknown[0]!r}; scopes are "
                        f"{', '.join(SCOPES)} or * for all")
    return chosen or ALL_SCOPES


async def issue_token(registry: Registry, email: str, name: str = "cli",
                      ttl_s: float | None = None, scopes: Iterable[str] = ALL_SCOPES,
                      apps: Iterable[str] | None = None,
                      functions: Iterable[str] | None = None) -> IssuedToken:
    user = await registry.ensure_user(email)
    return await issue_for(registry, user, name, ttl_s, scopes, apps, functions)


async def issue_for(registry: Registry, user: User, name: str, ttl_s: float | None,
                    scopes: Iterable[str] = ALL_SCOPES, apps: Iterable[str] | None = None,
                    functions: Iterable[str] | None = None) -> IssuedToken:
    token = TOKEN_PREFIX + secrets.token_urlsafe(24)
    expires_at = time.time() + ttl_s if ttl_s else None
    token_id = await registry.add_token(
        user, lookup_prefix(token), token_hash(token), name, expires_at, check_scopes(scopes),
        None if apps is None else tuple(apps), None if functions is None else tuple(functions))
    return IssuedToken(token, token_id, user)


def principal_of(record: TokenRecord) -> Principal:
    return Principal(record.user, frozenset(record.scopes),
                     None if record.apps is None else frozenset(record.apps),
                     None if record.functions is None else frozenset(record.functions),
                     record.id)


class TokenVerifier:
    """Turns an API token into a principal; good tokens are cached per gateway until revoked
    (a ``token`` invalidation) or the cache's TTL passes."""

    def __init__(self, registry: Registry, cache_ttl_s: float,
                 bus: Invalidations | None = None) -> None:
        self.registry = registry
        self._cache: TtlCache[str, TokenRecord] = TtlCache(cache_ttl_s, bus)
        self._touched: dict[str, float] = {}
        self._background: set[asyncio.Task[None]] = set()
        if bus is not None:
            bus.listen(self._invalidate)

    def _invalidate(self, event: Invalidation | None) -> None:
        if event is None:
            self._cache.clear()
        elif event.kind == "token":
            self._cache.drop(lambda _, record: record.id == event.key)
        elif event.kind == "user":
            self._cache.drop(lambda _, record: record.user.id == event.key)

    async def verify(self, token: str) -> Principal:
        digest = token_hash(token)
        record = self._cache.get(digest)
        if record is None:
            generation = self._cache.generation
            record = await self._lookup(token, digest)
            self._cache.put(digest, record, generation)
        if record.expires_at is not None and record.expires_at <= time.time():
            raise AuthError("expired", "this API token has expired")
        self._touch(record.id)
        return principal_of(record)

    async def _lookup(self, token: str, digest: str) -> TokenRecord:
        if not token.startswith(TOKEN_PREFIX) or len(token) < len(TOKEN_PREFIX) + 22:
            raise AuthError("malformed", "the bearer token is not an Ultralight API token")
        for record in await self.registry.tokens_by_prefix(lookup_prefix(token)):
            if not hmac.compare_digest(record.hash, digest):
                continue
            if record.revoked_at is not None:
                raise AuthError("revoked", "this API token has been revoked")
            return record
        raise AuthError("unknown", "this API token is not known")

    def _touch(self, token_id: str) -> None:
        """Record the last use in the background, at most once a minute per token."""
        now = time.monotonic()
        if now - self._touched.get(token_id, -TOUCH_INTERVAL_S) < TOUCH_INTERVAL_S:
            return
        if len(self._touched) > 10_000:
            self._touched.clear()
        self._touched[token_id] = now
        task = asyncio.ensure_future(self._write_touch(token_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _write_touch(self, token_id: str) -> None:
        try:
            await self.registry.touch_token(token_id)
        except RegistryError as exc:
            log.warning("token_touch_failed", token_id=token_id, error=str(exc))


class Authenticator:
    """API tokens and, when configured, Supabase JWTs; a JWT's user is created on first sight."""

    def __init__(self, registry: Registry, tokens: TokenVerifier, jwts: JwtVerifier | None,
                 cache_ttl_s: float, bus: Invalidations | None = None) -> None:
        self.registry = registry
        self.tokens = tokens
        self.jwts = jwts
        self._users: TtlCache[str, User] = TtlCache(cache_ttl_s, bus)
        if bus is not None:
            bus.listen(self._invalidate)

    def _invalidate(self, event: Invalidation | None) -> None:
        if event is None:
            self._users.clear()
        elif event.kind == "user":
            self._users.drop(lambda _, user: user.id == event.key)

    async def verify(self, token: str) -> Principal:
        if token.startswith(TOKEN_PREFIX):
            return await self.tokens.verify(token)
        if token.count(".") == 2 and self.jwts is not None:
            identity = await self.jwts.verify(token)
            return Principal(await self._user(identity.subject, identity.email))
        raise AuthError("malformed", "the bearer token is neither an Ultralight API token nor "
                        "a JWT this server accepts")

    async def _user(self, subject: str, email: str | None) -> User:
        user = self._users.get(subject)
        if user is None:
            generation = self._users.generation
            try:
                user = await self.registry.ensure_subject_user(subject, email)
            except Conflict as exc:
                raise AuthError("conflict", str(exc)) from exc
            self._users.put(subject, user, generation)
        return user
