"""Supabase access tokens (JWTs), verified locally with pyjwt: no network call per request.

HS256 tokens are checked with the project's JWT secret; RS256 and ES256 tokens with the project's
JWKS, fetched once and refetched (at most every ``jwks_refresh_min_s``) when a token names a key
id it does not hold. Only allowlisted algorithms pass, and the key type must fit the algorithm,
so neither ``alg: none`` nor an HS256 token "signed" with a public key gets through.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import aiohttp
import jwt
import orjson
import structlog

from config import Settings
from gateway.auth import AuthError

log = structlog.get_logger(__name__)

SUPPORTED = ("HS256", "RS256", "ES256")
KEY_TYPES = {"RS256": "RSA", "ES256": "EC"}
MAX_JWKS_BYTES = 256 * 1024


@dataclasses.dataclass(frozen=True)
class Identity:
    """Who a verified token speaks for."""

    subject: str
    email: str | None
    expires_at: float


@dataclasses.dataclass(frozen=True)
class JwtConfig:
    secret: str
    jwks_url: str
    issuer: str
    audience: str
    algorithms: frozenset[str]
    leeway_s: float
    refresh_min_s: float
    timeout_s: float

    @property
    def enabled(self) -> bool:
        return bool(self.secret or self.jwks_url)

    @classmethod
    def from_settings(cls, settings: Settings) -> JwtConfig:
        base = settings.supabase_url.rstrip("/")
        jwks_url = settings.jwt_jwks_url or (f"{base}/auth/v1/.well-known/jwks.json"
                                             if base else "")
        issuer = settings.jwt_issuer or (f"{base}/auth/v1" if base else "")
        wanted = {a.strip().upper() for a in settings.jwt_algorithms.split(",") if a.strip()}
        return cls(settings.jwt_secret, jwks_url, issuer, settings.jwt_audience,
                   frozenset(wanted & set(SUPPORTED)), settings.jwt_leeway_s,
                   settings.jwks_refresh_min_s, settings.jwks_timeout_s)


class Jwks:
    """The project's public keys by key id, cached; refetched on an unknown id, rate-limited."""

    def __init__(self, url: str, refresh_min_s: float, timeout_s: float) -> None:
        self.url = url
        self.refresh_min_s = refresh_min_s
        self.timeout_s = timeout_s
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = -float("inf")
        self._lock = asyncio.Lock()

    async def key(self, kid: str | None, alg: str) -> Any:
        found = self._keys.get(kid or "")
        if found is None:
            await self.refresh(because_of=kid)
            found = self._keys.get(kid or "")
        if found is None:
            raise AuthError("unknown_key", "the token was signed with a key this project does "
                            "not publish")
        if found.key_type != KEY_TYPES[alg] or found.algorithm_name != alg:
            raise AuthError("unsupported_algorithm", f"the key {kid!r} is not a {alg} key")
        return found.key

    async def refresh(self, because_of: str | None = None) -> None:
        async with self._lock:
            if because_of in self._keys:
                return
            if time.monotonic() - self._fetched_at < self.refresh_min_s:
                return
            self._fetched_at = time.monotonic()
            try:
                self._keys = await self._fetch()
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:  # JSONDecodeError too
                log.warning("jwks_unavailable", url=self.url, error=str(exc) or type(exc).__name__)
                return
            log.info("jwks_loaded", url=self.url, keys=len(self._keys))

    async def _fetch(self) -> dict[str, jwt.PyJWK]:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session, \
                session.get(self.url, allow_redirects=False) as response:
            response.raise_for_status()
            body = await response.content.read(MAX_JWKS_BYTES + 1)
        if len(body) > MAX_JWKS_BYTES:
            raise ValueError("the JWKS is larger than 256 KiB")
        document = orjson.loads(body)
        keys: dict[str, jwt.PyJWK] = {}
        for entry in document.get("keys", []) if isinstance(document, dict) else []:
            try:
                key = jwt.PyJWK(entry)
            except (jwt.PyJWKError, jwt.InvalidKeyError):
                continue
            if key.key_id:
                keys[key.key_id] = key
        return keys


class JwtVerifier:
    """Turns a Supabase access token into its subject and email, or an ``AuthError``."""

    def __init__(self, config: JwtConfig) -> None:
        self.config = config
        self.jwks = Jwks(config.jwks_url, config.refresh_min_s, config.timeout_s) \
            if config.jwks_url else None

    async def start(self) -> None:
        if self.jwks is not None:
            await self.jwks.refresh()

    async def verify(self, token: str) -> Identity:
        config = self.config
        if not config.enabled:
            raise AuthError("malformed", "this server does not accept JWTs; use an Ultralight "
                            "API token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise AuthError("malformed", "the bearer token is not a well-formed JWT") from None
        alg = header.get("alg")
        if alg not in config.algorithms:
            raise AuthError("unsupported_algorithm", f"tokens signed with {alg!r} are not "
                            f"accepted; expected one of {', '.join(sorted(config.algorithms))}")
        key = await self._key(alg, header.get("kid"))
        claims = self._decode(token, key, alg)
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise AuthError("malformed", "the token names no subject")
        email = claims.get("email")
        return Identity(subject, email.strip() if isinstance(email, str) and email else None,
                        float(claims["exp"]))

    async def _key(self, alg: str, kid: Any) -> Any:
        if alg == "HS256":
            if not self.config.secret:
                raise AuthError("unsupported_algorithm", "HS256 tokens are not accepted here")
            return self.config.secret
        if self.jwks is None:
            raise AuthError("unsupported_algorithm", f"{alg} tokens are not accepted here (no "
                            "JWKS is configured)")
        return await self.jwks.key(kid if isinstance(kid, str) else None, alg)

    def _decode(self, token: str, key: Any, alg: str) -> dict[str, Any]:
        config = self.config
        required = ["exp", "sub", "aud"] + (["iss"] if config.issuer else [])
        try:
            return dict(jwt.decode(
                token, key, algorithms=[alg], audience=config.audience,
                issuer=config.issuer or None, leeway=config.leeway_s,
                options={"require": required, "verify_signature": True}))
        except jwt.ExpiredSignatureError:
            raise AuthError("expired", "the token has expired; sign in again") from None
        except jwt.InvalidAudienceError:
            raise AuthError("wrong_audience", f"the token is not meant for this server "
                            f"(audience must be {config.audience!r})") from None
        except jwt.InvalidIssuerError:
            raise AuthError("wrong_issuer", "the token was issued by another project") from None
        except jwt.InvalidSignatureError:
            raise AuthError("bad_signature", "the token's signature does not verify") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("not_yet_valid", "the token is not valid yet") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError("malformed", f"the token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidTokenError:
            raise AuthError("malformed", "the token could not be verified") from None
