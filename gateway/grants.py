"""Grants: who besides an app's owner may call it, which functions, and under which rules.

A grant names an email, so it applies as soon as an account with that email appears. Its rules
are checked on every request from the grant itself (kept in a per-gateway cache): allowed
addresses, a weekly time window in a time zone, an expiry, allowed argument values; a budget of
calls per period is counted in Redis (``gateway.limits``).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import ipaddress
import re
import time
import uuid
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson

from gateway import GatewayError
from gateway.limits import PERIODS, Period
from gateway.registry import NotFound, Registry, Tx

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MAX_IPS = 50
MAX_ALLOWED_VALUES = 100
RELATIVE = re.compile(r"^(\d+)\s*([mhdw])$")
UNIT_S = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
CLOCK = re.compile(r"^(\d{1,2})(?::(\d{2}))?$")


class GrantError(GatewayError):
    """A grant's rules cannot be understood; the message says which part and why."""


@dataclasses.dataclass(frozen=True)
class Window:
    """Local times of day (minutes, end exclusive; end <= start wraps midnight) on some days."""

    start: int
    end: int
    days: frozenset[int] | None
    tz: str

    def allows(self, now: float) -> bool:
        local = datetime.datetime.fromtimestamp(now, _zone(self.tz))
        minute = local.hour * 60 + local.minute
        weekday = local.weekday()
        if self.start < self.end:
            inside = self.start <= minute < self.end
        elif minute >= self.start:
            inside = True
        else:
            # The early hours of a window that wraps midnight belong to the day it opened.
            inside, weekday = minute < self.end, (weekday - 1) % 7
        return inside and (self.days is None or weekday in self.days)

    def describe(self) -> dict[str, Any]:
        days = None if self.days is None else [DAYS[d] for d in sorted(self.days)]
        return {"hours": f"{_clock(self.start)}-{_clock(self.end)}", "days": days, "tz": self.tz}


@dataclasses.dataclass(frozen=True)
class Rules:
    """A grant's constraints; an empty field constrains nothing."""

    ips: tuple[str, ...] = ()
    window: Window | None = None
    budget: tuple[int, Period] | None = None
    allow_args: dict[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def networks(self) -> tuple[Network, ...]:
        return tuple(ipaddress.ip_network(ip, strict=False) for ip in self.ips)

    def to_json(self) -> dict[str, Any]:
        return {
            "ips": list(self.ips),
            "window": None if self.window is None else {
                "start": self.window.start, "end": self.window.end, "tz": self.window.tz,
                "days": None if self.window.days is None else sorted(self.window.days)},
            "budget": None if self.budget is None else list(self.budget),
            "allow_args": {k: list(v) for k, v in self.allow_args.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Rules:
        window = data.get("window")
        budget = data.get("budget")
        return cls(
            ips=tuple(data.get("ips") or ()),
            window=None if window is None else Window(
                window["start"], window["end"],
                None if window.get("days") is None else frozenset(window["days"]), window["tz"]),
            budget=None if budget is None else (int(budget[0]), budget[1]),
            allow_args={k: tuple(v) for k, v in (data.get("allow_args") or {}).items()},
        )


@dataclasses.dataclass(frozen=True)
class Grant:
    id: str
    app_id: str
    email: str
    function: str | None
    rules: Rules
    created_at: float
    expires_at: float | None
    revoked_at: float | None = None

    def summary(self) -> dict[str, Any]:
        rules = self.rules
        return {
            "id": self.id, "email": self.email, "function": self.function,
            "ips": list(rules.ips),
            "window": rules.window.describe() if rules.window else None,
            "budget": f"{rules.budget[0]}/{rules.budget[1]}" if rules.budget else None,
            "allow_args": {k: list(v) for k, v in rules.allow_args.items()},
            "created_at": self.created_at, "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
        }


# Checking a request against a grant. Each returns None when allowed, else (reason, message).

Refusal = tuple[str, str]


def check_context(grant: Grant, address: Address | None, now: float) -> Refusal | None:
    """The rules that hold for any request: expiry, address and time window."""
    if grant.expires_at is not None and now >= grant.expires_at:
        return "grant_expired", "your grant to this app has expired"
    rules = grant.rules
    if rules.networks and (address is None or not any(address in n for n in rules.networks)):
        return "ip_not_allowed", "your grant does not allow calls from this address"
    if rules.window is not None and not rules.window.allows(now):
        described = rules.window.describe()
        days = ",".join(described["days"]) if described["days"] else "any day"
        return "outside_window", (f"your grant allows calls only {described['hours']} "
                                  f"({days}, {described['tz']})")
    return None


def check_call(grant: Grant, function: str, arguments: dict[str, Any],
               input_schema: dict[str, Any]) -> Refusal | None:
    """The rules of one tool call: the function, and allowed argument values."""
    if grant.function is not None and grant.function != function:
        return "function_not_granted", f"your grant does not cover the tool {function!r}"
    defaults = input_schema.get("properties", {})
    for name, allowed in grant.rules.allow_args.items():
        if name in arguments:
            value = arguments[name]
        elif isinstance(defaults.get(name), dict) and "default" in defaults[name]:
            value = defaults[name]["default"]
        else:
            return "argument_not_allowed", (f"your grant requires the argument {name!r}, one "
                                            f"of {_show(allowed)}")
        if not any(same_value(value, option) for option in allowed):
            return "argument_not_allowed", (f"your grant allows the argument {name!r} only as "
                                            f"one of {_show(allowed)}")
    return None


def same_value(value: Any, option: Any) -> bool:
    """JSON equality (true is not 1, 1 is 1.0); an allowed value given as text (from the command
    line) also matches a number, boolean or null written the same way."""
    if isinstance(option, str) and not isinstance(value, (str, list, dict)):
        return orjson.dumps(value).decode() == option
    if isinstance(value, bool) or isinstance(option, bool):
        return type(value) is type(option) and value == option
    return bool(value == option)


def _show(values: tuple[Any, ...]) -> str:
    return ", ".join(orjson.dumps(v).decode() for v in values[:10]) + (
        ", …" if len(values) > 10 else "")


def normalize_address(text: str | None) -> Address | None:
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


# Parsing what a user asks for.

def parse_rules(body: dict[str, Any]) -> Rules:
    return Rules(
        ips=parse_ips(body.get("ips") or []),
        window=parse_window(body.get("hours"), body.get("days"), body.get("tz")),
        budget=parse_budget(body.get("budget")),
        allow_args=parse_allow_args(body.get("allow_args") or {}),
    )


def parse_ips(values: Any) -> tuple[str, ...]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise GrantError("ips must be a list of addresses or CIDR ranges")
    if len(values) > MAX_IPS:
        raise GrantError(f"at most {MAX_IPS} addresses or ranges per grant")
    networks = []
    for value in values:
        try:
            networks.append(str(ipaddress.ip_network(value.strip(), strict=False)))
        except ValueError:
            raise GrantError(f"{value!r} is not an IP address or CIDR range") from None
    return tuple(networks)


def parse_window(hours: Any, days: Any, tz: Any) -> Window | None:
    if hours is None and days is None:
        if tz is not None:
            raise GrantError("a time zone needs --hours or --days")
        return None
    zone = tz or "UTC"
    if not isinstance(zone, str):
        raise GrantError("tz must be a time zone name such as Europe/Berlin")
    _zone(zone)
    start, end = parse_hours(hours) if hours is not None else (0, 0)
    return Window(start, end, parse_days(days) if days is not None else None, zone)


def parse_hours(text: Any) -> tuple[int, int]:
    """``22-06`` or ``09:30-17:00``; the end is exclusive, and an end before the start wraps."""
    if not isinstance(text, str) or text.count("-") != 1:
        raise GrantError("hours must look like 09-17, 22-06 or 09:30-17:15")
    start, end = (_minutes(part.strip()) for part in text.split("-"))
    if start == end:
        raise GrantError("hours must not start and end at the same time (leave them out to "
                         "allow the whole day)")
    return start, end


def _minutes(text: str) -> int:
    match = CLOCK.match(text)
    if not match:
        raise GrantError(f"{text!r} is not a time of day (HH or HH:MM)")
    hour, minute = int(match.group(1)), int(match.group(2) or 0)
    if hour == 24 and minute == 0:
        return 0
    if hour > 23 or minute > 59:
        raise GrantError(f"{text!r} is not a time of day (HH or HH:MM)")
    return hour * 60 + minute


def parse_days(text: Any) -> frozenset[int]:
    """``mon-fri``, ``sat,sun``, ``fri-mon`` (wrapping) or ``mon,wed-fri``."""
    if not isinstance(text, str) or not text.strip():
        raise GrantError("days must look like mon-fri or sat,sun")
    chosen: set[int] = set()
    for part in (p.strip().lower() for p in text.split(",")):
        first, _, last = part.partition("-")
        start, end = _day(first), _day(last or first)
        day = start
        chosen.add(day)
        while day != end:
            day = (day + 1) % 7
            chosen.add(day)
    return frozenset(chosen)


def _day(text: str) -> int:
    key = text.strip().lower()[:3]
    if key not in DAYS:
        raise GrantError(f"{text!r} is not a day (mon, tue, wed, thu, fri, sat, sun)")
    return DAYS.index(key)


def parse_budget(text: Any) -> tuple[int, Period] | None:
    """``100/day``: calls per minute, hour, day, week (from Sunday) or month, in UTC."""
    if text is None:
        return None
    calls, _, period = str(text).partition("/")
    period = period.strip().lower().removesuffix("s")
    if not calls.strip().isdigit() or int(calls) < 1 or period not in PERIODS:
        raise GrantError(f"budget must look like 100/day, with a period among "
                         f"{', '.join(PERIODS)}")
    return int(calls), period  # type: ignore[return-value]


def parse_allow_args(values: Any) -> dict[str, tuple[Any, ...]]:
    if not isinstance(values, dict):
        raise GrantError("allow_args must map argument names to lists of allowed values")
    allowed: dict[str, tuple[Any, ...]] = {}
    for name, options in values.items():
        if not isinstance(options, list) or not options or len(options) > MAX_ALLOWED_VALUES:
            raise GrantError(f"allow_args[{name!r}] must be a list of 1 to "
                             f"{MAX_ALLOWED_VALUES} values")
        if any(isinstance(o, (dict, list)) for o in options):
            raise GrantError(f"allow_args[{name!r}] may only hold strings, numbers, booleans "
                             "or null")
        allowed[str(name)] = tuple(options)
    return allowed


def parse_expiry(value: Any, now: float) -> float | None:
    """Seconds since the epoch, an ISO date or time (UTC unless it says), or ``30d``/``12h``."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str):
        raise GrantError("expires must be a date, a date and time, or a span like 30d")
    relative = RELATIVE.match(value.strip().lower())
    if relative:
        return now + int(relative.group(1)) * UNIT_S[relative.group(2)]
    try:
        moment = datetime.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise GrantError(f"{value!r} is not a date (2030-01-31), a date and time "
                         "(2030-01-31T18:00+01:00) or a span (30d, 12h, 90m, 2w)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def resolve_function(name: str, app_name: str, tools: list[str]) -> str:
    """A tool name as given, or as a client shows it (``mcp__notes__find_notes``,
    ``notes.find_notes``): grants always hold the bare tool name."""
    if name in tools:
        return name
    for separator in ("__", ".", ":", "/"):
        head, _, tail = name.rpartition(separator)
        if head and tail in tools and head.removeprefix("mcp__").strip("_") == app_name:
            return tail
    raise GrantError(f"the app {app_name!r} has no tool {name!r}; its tools are "
                     f"{', '.join(tools) or 'none'}")


@functools.lru_cache(maxsize=256)
def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise GrantError(f"{name!r} is not a known time zone (e.g. Europe/Berlin, UTC)") from None


def _clock(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


# Storage.

GRANT_COLUMNS = "id, app_id, email, function, rules, created_at, expires_at, revoked_at"


class GrantStore:
    """Grants in the metadata database (table ``grants``)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def add(self, app_id: str, email: str, function: str | None, rules: Rules,
                  expires_at: float | None, created_by: str) -> Grant:
        grant = Grant(f"gr_{uuid.uuid4().hex[:16]}", app_id, email.strip().lower(), function,
                      rules, time.time(), expires_at)

        def op(tx: Tx) -> None:
            tx.execute(f"INSERT INTO grants ({GRANT_COLUMNS}, created_by)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (grant.id, app_id, grant.email, function,
                        orjson.dumps(rules.to_json()).decode(), grant.created_at, expires_at,
                        None, created_by))

        await self.registry.run(op)
        return grant

    async def of_app(self, app_id: str, include_revoked: bool = False) -> list[Grant]:
        def op(tx: Tx) -> list[Grant]:
            live = "" if include_revoked else " AND revoked_at IS NULL"
            rows = tx.execute(f"SELECT {GRANT_COLUMNS} FROM grants WHERE app_id = ?{live}"
                                " ORDER BY created_at", (app_id,))
            return [_grant(r) for r in rows]

        return await self.registry.run(op)

    async def for_caller(self, app_id: str, email: str) -> list[Grant]:
        """The caller's grants that are not revoked (expiry is checked per request)."""
        def op(tx: Tx) -> list[Grant]:
            rows = tx.execute(f"SELECT {GRANT_COLUMNS} FROM grants WHERE app_id = ? AND"
                                " email = ? AND revoked_at IS NULL ORDER BY created_at",
                                (app_id, email.strip().lower()))
            return [_grant(r) for r in rows]

        return await self.registry.run(op)

    async def revoke(self, app_id: str, grant_id: str) -> Grant:
        def op(tx: Tx) -> Grant:
            tx.execute("UPDATE grants SET revoked_at = coalesce(revoked_at, ?) WHERE id = ?"
                         " AND app_id = ?", (time.time(), grant_id, app_id))
            row = tx.execute(f"SELECT {GRANT_COLUMNS} FROM grants WHERE id = ? AND app_id = ?",
                               (grant_id, app_id)).fetchone()
            if row is None:
                raise NotFound(f"this app has no grant {grant_id!r}")
            return _grant(row)

        return await self.registry.run(op)


def _grant(row: tuple[Any, ...]) -> Grant:
    return Grant(row[0], row[1], row[2], row[3], Rules.from_json(orjson.loads(row[4])), row[5],
                 row[6], row[7])
