"""The gates of an MCP request: permission and counted limits, run together.

``Gates.admit`` runs two gates with ``asyncio.gather``: the limits gate (per-caller rate limit,
weekly quota, the app's own limits: one Lua script) and the permission gate (the caller's grants
from a per-gateway cache, their rules, and a grant's budget: one more script when it has one).
If either refuses, what the other counted is given back, except attempts against rate limits.

Refusals: 401 (no credentials for a private app), 403 (not allowed, with the reason), 429 (a limit,
with Retry-After), 503 (Redis cannot count: fail closed, with Retry-After; an outage of the
platform rather than the caller's own doing, so it is not dressed up as the caller's limit).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import structlog
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from config import Settings
from gateway import GatewayError
from gateway.auth import Principal
from gateway.caches import Invalidation, Invalidations, TtlCache
from gateway.grants import (
    Address,
    Grant,
    GrantStore,
    Refusal,
    check_call,
    check_context,
    normalize_address,
)
from gateway.limits import (
    Counter,
    Counters,
    LimitExceeded,
    LimitPolicy,
    LimitsUnavailable,
    app_limits,
    budget,
    parse_networks,
)
from gateway.registry import AppRecord

log = structlog.get_logger(__name__)

# A refusal for any of these reasons is preferred over "function_not_granted" when a caller has
# several grants, since it says what to change.
VAGUE_REASONS = ("function_not_granted",)


class GateRefusal(GatewayError):
    """A request the gates turn away; ``status`` is its HTTP status."""

    def __init__(self, status: int, reason: str, message: str,
                 retry_after_s: int | None = None, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.reason, self.retry_after_s = status, reason, retry_after_s
        self.data = {"reason": reason, **(data or {})}
        if retry_after_s is not None:
            self.data["retry_after_s"] = retry_after_s


@dataclasses.dataclass(frozen=True)
class Caller:
    principal: Principal | None
    address: Address | None

    @property
    def who(self) -> str:
        """The identity limits are counted against: the user, or the address when anonymous."""
        if self.principal is not None:
            return self.principal.user.id
        return f"ip:{self.address}" if self.address else "ip:unknown"


@dataclasses.dataclass(frozen=True)
class Permit:
    owner: bool
    # The tools this caller may use; None is all of them.
    functions: frozenset[str] | None = None
    grant: Grant | None = None
    budget: Counter | None = None


@dataclasses.dataclass(frozen=True)
class Admission:
    """A request let through, and what it was counted against (for a refund)."""

    permit: Permit
    counted: tuple[Counter, ...] = ()


def client_address(request: web.Request, trusted: tuple[Any, ...]) -> Address | None:
    """The peer's address, or the client's from X-Forwarded-For when the peer is a trusted proxy
    (read right to left, skipping trusted hops)."""
    peer = normalize_address(request.remote)
    if peer is None or not trusted or not any(peer in net for net in trusted):
        return peer
    forwarded = request.headers.get("X-Forwarded-For", "")
    for hop in reversed([h.strip() for h in forwarded.split(",") if h.strip()]):
        address = normalize_address(hop)
        if address is None:
            return peer
        if not any(address in net for net in trusted):
            return address
    return peer


class Gates:
    def __init__(self, settings: Settings, redis: Redis, grants: GrantStore,
                 bus: Invalidations | None) -> None:
        self.policy = LimitPolicy.from_settings(settings)
        self.counters = Counters(redis)
        self.grants = grants
        self.timeout_s = settings.gate_timeout_s
        self.trusted_proxies = parse_networks(settings.trusted_proxies)
        self._cache: TtlCache[tuple[str, str], tuple[Grant, ...]] = TtlCache(
            settings.access_cache_ttl_s, bus)
        if bus is not None:
            bus.listen(self._invalidate)

    def _invalidate(self, event: Invalidation | None) -> None:
        if event is None:
            self._cache.clear()
        elif event.kind == "access":
            self._cache.drop(lambda key, _: key[0] == event.key)

    def caller(self, request: web.Request, principal: Principal | None) -> Caller:
        return Caller(principal, client_address(request, self.trusted_proxies))

    async def admit(self, app: AppRecord, caller: Caller, method: str,
                    tool: dict[str, Any] | None = None,
                    arguments: dict[str, Any] | None = None) -> Admission:
        """Let a request through, counted, or raise the refusal that matters most."""
        now = time.time()
        limits = self._limit_counters(app, caller, method, now)
        try:
            outcome = await asyncio.wait_for(asyncio.gather(
                self.counters.take(limits, now),
                self._permit(app, caller, tool, arguments or {}, now),
                return_exceptions=True), self.timeout_s)
        except TimeoutError:
            raise self._unavailable("the platform's Redis did not answer in time") from None
        taken, permit = outcome
        failures = [r for r in outcome if isinstance(r, BaseException)]
        if not failures:
            assert isinstance(permit, Permit)
            budget_taken = (permit.budget,) if permit.budget else ()
            return Admission(permit, (*limits, *budget_taken))
        given_back = [] if isinstance(taken, BaseException) else list(limits)
        if isinstance(permit, Permit) and permit.budget is not None:
            given_back.append(permit.budget)
        await self.refund(given_back)
        raise self._worst(failures)

    async def refund(self, counters: list[Counter] | tuple[Counter, ...]) -> None:
        try:
            await self.counters.refund(list(counters))
        except (RedisError, OSError) as exc:
            log.warning("refund_failed", counters=len(counters), error=str(exc))

    def _limit_counters(self, app: AppRecord, caller: Caller, method: str, now: float
                        ) -> list[Counter]:
        counters = []
        rate = self.policy.rate(method, caller.who, now)
        if rate is not None:
            counters.append(rate)
        if method != "tools/call":
            return counters
        principal = caller.principal
        tier = principal.user.tier if principal else "anonymous"
        quota = self.policy.quota(tier, caller.who, now)
        if quota is not None:
            counters.append(quota)
        if principal is None or principal.user.id != app.owner_id:
            counters += app_limits(app.id, app.name, app.limit_per_minute, app.limit_per_day,
                                   now)
        return counters

    async def _permit(self, app: AppRecord, caller: Caller, tool: dict[str, Any] | None,
                      arguments: dict[str, Any], now: float) -> Permit:
        principal = caller.principal
        if principal is None:
            if app.visibility == "private":
                raise GateRefusal(401, "missing", f"the app {app.name!r} is private: send "
                                  "'Authorization: Bearer <token>'")
            return Permit(owner=False)
        _check_token(principal, app, tool)
        if principal.user.id == app.owner_id:
            return Permit(owner=True, functions=principal.functions)
        if app.visibility != "private":
            return Permit(owner=False, functions=principal.functions)
        grants = await self._grants(app, principal.user.email)
        if not grants:
            raise GateRefusal(403, "no_grant", f"you may not call the app {app.name!r}: ask "
                              "its owner for a grant ('ultralight grant')")
        usable = _passing(grants, lambda g: check_context(g, caller.address, now))
        if tool is None:
            return Permit(False, _granted_functions(usable, principal.functions))
        passing = _passing(usable, lambda g: check_call(g, tool["name"], arguments,
                                                          tool.get("inputSchema", {})))
        chosen = min(passing, key=lambda g: g.rules.budget is not None)
        if chosen.rules.budget is None:
            return Permit(False, None, chosen)
        counter = budget(chosen.id, *chosen.rules.budget, now)
        await self.counters.take([counter], now)
        return Permit(False, None, chosen, counter)

    async def _grants(self, app: AppRecord, email: str) -> tuple[Grant, ...]:
        key = (app.id, email.strip().lower())
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        generation = self._cache.generation
        grants = tuple(await self.grants.for_caller(app.id, email))
        self._cache.put(key, grants, generation)
        return grants

    def _unavailable(self, detail: str) -> GateRefusal:
        log.warning("gates_unavailable", detail=detail)
        return GateRefusal(503, "limits_unavailable", "calls cannot be counted right now, so "
                           "they are refused; try again shortly", retry_after_s=5)

    def _worst(self, failures: list[BaseException]) -> BaseException:
        """Bugs first, then refusals (401/403), an outage (503), then the longest limit (429)."""
        for failure in failures:
            if isinstance(failure, asyncio.CancelledError):
                return failure
        refusals = [f for f in failures if isinstance(f, GateRefusal)]
        if refusals:
            return refusals[0]
        if any(isinstance(f, LimitsUnavailable) for f in failures):
            return self._unavailable(str(next(f for f in failures
                                              if isinstance(f, LimitsUnavailable))))
        exceeded = [f for f in failures if isinstance(f, LimitExceeded)]
        if exceeded:
            worst = max(exceeded, key=lambda f: f.retry_after_s)
            counter = worst.counter
            return GateRefusal(429, counter.reason, str(worst), worst.retry_after_s,
                               {"limit": counter.limit})
        return failures[0]


def _check_token(principal: Principal, app: AppRecord, tool: dict[str, Any] | None) -> None:
    if not principal.has_scope("mcp"):
        raise GateRefusal(403, "token_scope", "this token may not call apps (it lacks the "
                          "'mcp' scope)")
    if not principal.may_use_app(app):
        raise GateRefusal(403, "token_scope", f"this token may not call the app {app.name!r}")
    if tool is not None and not principal.may_use_function(tool["name"]):
        raise GateRefusal(403, "token_scope", f"this token may not call the tool "
                          f"{tool['name']!r}")


def _passing(grants: tuple[Grant, ...] | list[Grant],
             check: Any) -> list[Grant]:
    """The grants that pass ``check``, or the most telling refusal when none does."""
    passing, refusals = [], []
    for grant in grants:
        refusal: Refusal | None = check(grant)
        if refusal is None:
            passing.append(grant)
        else:
            refusals.append(refusal)
    if not passing:
        reason, message = min(refusals, key=lambda r: r[0] in VAGUE_REASONS)
        raise GateRefusal(403, reason, message)
    return passing


def _granted_functions(grants: list[Grant], token_functions: frozenset[str] | None
                       ) -> frozenset[str] | None:
    granted = None if any(g.function is None for g in grants) else frozenset(
        g.function for g in grants if g.function is not None)
    if granted is None:
        return token_functions
    return granted if token_functions is None else granted & token_functions
