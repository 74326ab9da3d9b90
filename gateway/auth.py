"""API tokens: ``ul_`` plus 192 random bits, shown once, stored only as a SHA-256 hash."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
import time

from gateway import GatewayError
from gateway.registry import Registry, User

TOKEN_PREFIX = "ul_"
LOOKUP_CHARS = 8


class AuthError(GatewayError):
    """The caller could not be identified; ``reason`` says which case it was."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class IssuedToken:
    token: str
    token_id: str
    user: User


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def lookup_prefix(token: str) -> str:
    return token[len(TOKEN_PREFIX):len(TOKEN_PREFIX) + LOOKUP_CHARS]


async def issue_token(registry: Registry, email: str, name: str = "cli",
                      ttl_s: float | None = None) -> IssuedToken:
    user = await registry.ensure_user(email)
    token = TOKEN_PREFIX + secrets.token_urlsafe(24)
    expires_at = time.time() + ttl_s if ttl_s else None
    token_id = await registry.add_token(user, lookup_prefix(token), token_hash(token), name,
                                        expires_at)
    return IssuedToken(token, token_id, user)


class TokenVerifier:
    """Turns a bearer token into a user, with a short per-process cache of good tokens."""

    def __init__(self, registry: Registry, cache_ttl_s: float) -> None:
        self.registry = registry
        self.cache_ttl_s = cache_ttl_s
        self._cache: dict[str, tuple[float, User]] = {}

    async def verify(self, token: str) -> User:
        digest = token_hash(token)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached and cached[0] > now:
            return cached[1]
        if not token.startswith(TOKEN_PREFIX) or len(token) < len(TOKEN_PREFIX) + 22:
            raise AuthError("malformed", "the bearer token is not an Ultralight API token")
        for record in await self.registry.tokens_by_prefix(lookup_prefix(token)):
            if not hmac.compare_digest(record.hash, digest):
                continue
            if record.revoked_at is not None:
                raise AuthError("revoked", "this API token has been revoked")
            if record.expires_at is not None and record.expires_at < time.time():
                raise AuthError("expired", "this API token has expired")
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (now + self.cache_ttl_s, record.user)
            await self.registry.touch_token(record.id)
            return record.user
        raise AuthError("unknown", "this API token is not known")
