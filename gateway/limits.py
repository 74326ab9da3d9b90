"""Counted limits shared by every gateway: rate limits, weekly quotas, app limits and budgets.

Each limit is a fixed-window counter in Redis whose key names its window, so it resets by
itself. ``Counters.take`` checks and increments a set of counters in one Lua script, all or
nothing: a call refused by one limit uses up none of the others.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import math
from typing import Literal

from redis.asyncio import Redis
from redis.exceptions import RedisError

from config import Settings
from gateway import GatewayError

Period = Literal["minute", "hour", "day", "week", "month"]
PERIODS: tuple[Period, ...] = ("minute", "hour", "day", "week", "month")
UTC = datetime.UTC

# KEYS: counters. ARGV: for each key its limit and the epoch ms its window ends.
# Returns the 1-based indexes of the counters at their limit; nothing was counted then.
# Otherwise every counter is incremented, expiring with its window, and {} comes back.
TAKE_SCRIPT = """
local denied = {}
for i, key in ipairs(KEYS) do
  local used = tonumber(redis.call('GET', key) or '0')
  if used >= tonumber(ARGV[2 * i - 1]) then
    denied[#denied + 1] = i
  end
end
if #denied > 0 then
  return denied
end
for i, key in ipairs(KEYS) do
  if redis.call('INCR', key) == 1 then
    redis.call('PEXPIREAT', key, tonumber(ARGV[2 * i]) + 1000)
  end
end
return {}
"""

# Gives back calls counted for a request that a later gate refused.
REFUND_SCRIPT = """
for _, key in ipairs(KEYS) do
  if tonumber(redis.call('GET', key) or '0') > 0 then
    redis.call('DECR', key)
  end
end
return #KEYS
"""


class LimitError(GatewayError):
    """Root of the limit errors."""


class LimitExceeded(LimitError):
    """A counter is at its limit until ``retry_after_s`` from now."""

    def __init__(self, counter: Counter, retry_after_s: int) -> None:
        super().__init__(counter.message)
        self.counter = counter
        self.retry_after_s = retry_after_s


class LimitsUnavailable(LimitError):
    """Redis did not answer, so nothing can be counted: the call is refused (fail closed)."""


@dataclasses.dataclass(frozen=True)
class Counter:
    """One limit to count a call against."""

    key: str
    limit: int
    resets_at: float
    reason: str
    message: str
    # False for limits on attempts (rate limits), which a refused call still uses up.
    refundable: bool = True


def window(period: Period, now: float) -> tuple[str, float]:
    """The label of the fixed UTC window holding ``now`` and the epoch second it ends.
    Weeks start on Sunday 00:00 UTC; months on the first."""
    if period == "minute":
        index = int(now // 60)
        return f"m{index}", (index + 1) * 60.0
    if period == "hour":
        index = int(now // 3600)
        return f"h{index}", (index + 1) * 3600.0
    moment = datetime.datetime.fromtimestamp(now, UTC)
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        start, end = day, day + datetime.timedelta(days=1)
    elif period == "week":
        start = day - datetime.timedelta(days=(day.weekday() + 1) % 7)
        end = start + datetime.timedelta(days=7)
    else:
        start = day.replace(day=1)
        end = (start + datetime.timedelta(days=32)).replace(day=1)
    return f"{period[0]}{start:%Y%m%d}", end.timestamp()


def retry_after(resets_at: float, now: float) -> int:
    return max(1, math.ceil(resets_at - now))


@dataclasses.dataclass(frozen=True)
class LimitPolicy:
    """The platform's limits, read from settings."""

    per_minute: dict[str, int]
    weekly_quotas: dict[str, int]

    @classmethod
    def from_settings(cls, settings: Settings) -> LimitPolicy:
        per_minute = {
            "tools/call": settings.rate_limit_call_per_min,
            "tools/list": settings.rate_limit_list_per_min,
            "initialize": settings.rate_limit_initialize_per_min,
            # The stateless era's handshake replacement shares initialize's allowance.
            "server/discover": settings.rate_limit_initialize_per_min,
        }
        return cls(per_minute, parse_quotas(settings.weekly_quotas))

    def rate(self, method: str, who: str, now: float) -> Counter | None:
        limit = self.per_minute.get(method, 0)
        if limit <= 0:
            return None
        label, ends = window("minute", now)
        return Counter(f"ultralight:rate:{method}:{who}:{label}", limit, ends, "rate_limited",
                       f"too many {method} requests: at most {limit} a minute", refundable=False)

    def quota(self, tier: str, who: str, now: float) -> Counter | None:
        limit = self.weekly_quotas.get(tier, self.weekly_quotas.get("free", 0))
        if limit <= 0:
            return None
        label, ends = window("week", now)
        return Counter(f"ultralight:quota:{who}:{label}", limit, ends, "quota_exceeded",
                       f"the weekly quota of the {tier} tier ({limit} calls) is used up; it "
                       "renews on Sunday 00:00 UTC")


def app_limits(app_id: str, app_name: str, per_minute: int | None, per_day: int | None,
               now: float) -> list[Counter]:
    """The owner's limits on calls to one app by everyone else, each in its own window."""
    counters = []
    for limit, period in ((per_minute, "minute"), (per_day, "day")):
        if limit is None:
            continue
        label, ends = window(period, now)  # type: ignore[arg-type]
        counters.append(Counter(f"ultralight:app-limit:{app_id}:{label}", limit, ends,
                                "app_limit", f"the app {app_name!r} takes at most {limit} calls "
                                f"a {period} from others than its owner"))
    return counters


def budget(grant_id: str, calls: int, period: Period, now: float) -> Counter:
    label, ends = window(period, now)
    return Counter(f"ultralight:budget:{grant_id}:{label}", calls, ends, "budget_exhausted",
                   f"your grant's budget of {calls} calls a {period} is used up")


def parse_quotas(text: str) -> dict[str, int]:
    quotas: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        tier, _, count = item.partition(":")
        try:
            quotas[tier.strip()] = int(count)
        except ValueError:
            raise LimitError(f"ULTRALIGHT_WEEKLY_QUOTAS: {item!r} is not 'tier:calls'") from None
    return quotas


def parse_networks(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    try:
        return tuple(ipaddress.ip_network(part.strip(), strict=False)
                     for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise LimitError(f"ULTRALIGHT_TRUSTED_PROXIES: {exc}") from None


class Counters:
    """Takes and refunds counters, one Redis round trip each."""

    def __init__(self, redis: Redis) -> None:
        self._take = redis.register_script(TAKE_SCRIPT)
        self._refund = redis.register_script(REFUND_SCRIPT)

    async def take(self, counters: list[Counter], now: float) -> None:
        """Count the call against every counter, or raise the binding limit and count none."""
        if not counters:
            return
        args: list[int] = []
        for counter in counters:
            args += [counter.limit, int(counter.resets_at * 1000)]
        try:
            denied = await self._take(keys=[c.key for c in counters], args=args)
        except (RedisError, OSError) as exc:
            raise LimitsUnavailable("the platform cannot count calls right now (its Redis "
                                    "does not answer), so calls are refused") from exc
        if denied:
            # The call can succeed only once every full counter has reset.
            binding = max((counters[int(i) - 1] for i in denied), key=lambda c: c.resets_at)
            raise LimitExceeded(binding, retry_after(binding.resets_at, now))

    async def refund(self, counters: list[Counter]) -> None:
        keys = [c.key for c in counters if c.refundable]
        if keys:
            await self._refund(keys=keys, args=[])
