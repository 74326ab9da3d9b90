"""The ``ultralight`` commands for access and secrets: tokens, grants, limits, visibility, env
vars, per-user secrets, BYOK keys, key rotation and tiers. Secret values are read from an
argument, stdin or a prompt, and never printed back."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import getpass
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import quote

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from config import Settings
from config.logging import configure_logging
from gateway.caches import INVALIDATE_CHANNEL
from gateway.client import GatewayClient
from gateway.registry import Registry, open_registry

T = TypeVar("T")


def _q(text: str) -> str:
    return quote(text, safe="")


def _emit(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def read_secret(given: str | None, what: str) -> str:
    """The value from the command line, else stdin when piped, else a prompt that does not echo."""
    if given is not None:
        return given
    if not sys.stdin.isatty():
        return sys.stdin.read().removesuffix("\n")
    return getpass.getpass(f"{what}: ")


async def _with_registry(settings: Settings, work: Callable[[Registry], Awaitable[T]]) -> T:
    # The store's log lines go to stderr, apart from what the command prints.
    configure_logging(settings)
    registry = open_registry(settings.resolved_database_url)
    await registry.open()
    try:
        return await work(registry)
    finally:
        await registry.close()


async def _announce(settings: Settings, kind: str, key: str) -> None:
    """Tell running gateways to drop what they cached (best effort: their TTL is the backstop)."""
    redis = Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=2)
    try:
        await redis.publish(INVALIDATE_CHANNEL, orjson.dumps({"kind": kind, "key": key}))
    except (RedisError, OSError) as exc:
        print(f"(running gateways were not told at once: {exc}; they notice within their "
              "cache TTL)", file=sys.stderr)
    finally:
        await redis.aclose()


# Tokens (list and revoke go through the gateway; create writes to the database: see cli.py).

def cmd_token_list(args: argparse.Namespace, client: GatewayClient) -> int:
    tokens = client.api("GET", "/api/tokens")["tokens"]
    if args.json:
        _emit(tokens)
        return 0
    for token in tokens:
        state = "revoked" if token["revoked_at"] else "active"
        limits = "".join([f" apps={','.join(token['apps'])}" if token["apps"] else "",
                          f" functions={','.join(token['functions'])}"
                          if token["functions"] else ""])
        print(f"{token['id']}  {token['prefix']:<14} {state:<8} {token['name']}  "
              f"scopes={','.join(token['scopes'])}{limits}  "
              f"last used {_when(token['last_used_at'])}  expires {_when(token['expires_at'])}")
    return 0


def cmd_token_revoke(args: argparse.Namespace, client: GatewayClient) -> int:
    client.api("DELETE", f"/api/tokens/{_q(args.token_id)}")
    print(f"revoked {args.token_id}")
    return 0


# Grants, limits and visibility.

def parse_allow_arg(text: str) -> tuple[str, list[str]]:
    name, sep, values = text.partition("=")
    if not sep or not name.strip() or not values:
        raise SystemExit(f"--allow-arg {text!r}: write it as name=value1,value2")
    return name.strip(), [v.strip() for v in values.split(",")]


def cmd_grant(args: argparse.Namespace, client: GatewayClient) -> int:
    body: dict[str, Any] = {"email": args.email, "function": args.function, "ips": args.ip,
                            "hours": args.hours, "days": args.days, "tz": args.tz,
                            "budget": args.budget, "expires": args.expires,
                            "allow_args": dict(parse_allow_arg(a) for a in args.allow_arg)}
    grant = client.api("POST", f"/api/apps/{_q(args.app)}/grants",
                       {k: v for k, v in body.items() if v not in (None, [], {})})
    if args.json:
        _emit(grant)
    else:
        print(grant["id"])
        print(f"(granted {args.app} to {grant['email']}"
              f"{' for ' + grant['function'] if grant['function'] else ''})", file=sys.stderr)
    return 0


def cmd_grants(args: argparse.Namespace, client: GatewayClient) -> int:
    path = f"/api/apps/{_q(args.app)}/grants" + ("?all=1" if args.all else "")
    grants = client.api("GET", path)["grants"]
    if args.json:
        _emit(grants)
        return 0
    for grant in grants:
        rules = []
        if grant["ips"]:
            rules.append("ips=" + ",".join(grant["ips"]))
        if grant["window"]:
            window = grant["window"]
            rules.append(f"hours={window['hours']} days={','.join(window['days'] or ['any'])} "
                         f"tz={window['tz']}")
        if grant["budget"]:
            rules.append(f"budget={grant['budget']}")
        for name, values in grant["allow_args"].items():
            rules.append(f"{name}∈{','.join(map(str, values))}")
        if grant["expires_at"]:
            rules.append(f"expires {_when(grant['expires_at'])}")
        if grant["revoked_at"]:
            rules.append(f"revoked {_when(grant['revoked_at'])}")
        print(f"{grant['id']}  {grant['email']}  {grant['function'] or '*'}  {' '.join(rules)}")
    return 0


def cmd_revoke_grant(args: argparse.Namespace, client: GatewayClient) -> int:
    client.api("DELETE", f"/api/apps/{_q(args.app)}/grants/{_q(args.grant_id)}")
    print(f"revoked {args.grant_id}")
    return 0


def cmd_limits(args: argparse.Namespace, client: GatewayClient) -> int:
    path = f"/api/apps/{_q(args.app)}/limits"
    body = {k: v for k, v in (("per_minute", args.per_minute), ("per_day", args.per_day))
            if v is not None}
    limits = client.api("PUT", path, body) if body else client.api("GET", path)
    print(f"{limits['app']}: {limits['per_minute'] or 'no limit'} a minute, "
          f"{limits['per_day'] or 'no limit'} a day (for callers other than the owner)")
    return 0


def cmd_visibility(args: argparse.Namespace, client: GatewayClient) -> int:
    result = client.api("POST", f"/api/apps/{_q(args.app)}/visibility",
                        {"visibility": args.visibility})
    print(f"{result['app']} is now {result['visibility']}")
    return 0


# Env vars, secrets and BYOK keys.

def cmd_env(args: argparse.Namespace, client: GatewayClient) -> int:
    base = f"/api/apps/{_q(args.app)}/env"
    if args.action == "list":
        for entry in client.api("GET", base)["env"]:
            print(f"{entry['name']}  (set {_when(entry['updated_at'])})")
        return 0
    if args.name is None:
        raise SystemExit(f"ultralight env {args.action} needs a variable NAME")
    if args.action == "set":
        value = read_secret(args.value, f"value of {args.name}")
        client.api("PUT", f"{base}/{_q(args.name)}", {"value": value})
        print(f"set {args.name} on {args.app}")
    else:
        removed = client.api("DELETE", f"{base}/{_q(args.name)}")["removed"]
        print(f"{'unset' if removed else 'was not set:'} {args.name} on {args.app}")
    return 0


def cmd_secret(args: argparse.Namespace, client: GatewayClient) -> int:
    base = f"/api/apps/{_q(args.app)}/secrets"
    if args.action == "list":
        for entry in client.api("GET", base)["secrets"]:
            state = "configured" if entry["configured"] else "not set"
            need = "required" if entry["required"] else "optional"
            print(f"{entry['name']}  {state}  ({need}) {entry['description']}")
        return 0
    if args.name is None:
        raise SystemExit(f"ultralight secret {args.action} needs a secret NAME")
    if args.action == "set":
        value = read_secret(args.value, f"your {args.name} for {args.app}")
        client.api("PUT", f"{base}/{_q(args.name)}", {"value": value})
        print(f"set your {args.name} for {args.app}")
    else:
        removed = client.api("DELETE", f"{base}/{_q(args.name)}")["removed"]
        print(f"{'unset' if removed else 'was not set:'} your {args.name} for {args.app}")
    return 0


def cmd_byok(args: argparse.Namespace, client: GatewayClient) -> int:
    if args.action == "list":
        for entry in client.api("GET", "/api/byok")["providers"]:
            print(f"{entry['name']}  (set {_when(entry['updated_at'])})")
        return 0
    if args.provider is None:
        raise SystemExit(f"ultralight byok {args.action} needs a PROVIDER (e.g. openai)")
    path = f"/api/byok/{_q(args.provider)}"
    if args.action == "set":
        client.api("PUT", path, {"value": read_secret(args.key, f"your {args.provider} key")})
        print(f"set your {args.provider} key")
    else:
        removed = client.api("DELETE", path)["removed"]
        print(f"{'removed' if removed else 'had no'} {args.provider} key")
    return 0


# Operator commands, run where the database is reachable.

def cmd_keys_rotate(settings: Settings) -> int:
    from gateway.secrets import SecretKeys, rotate

    keys = SecretKeys(settings)
    if not keys.configured:
        print(f"added a new key {keys.add_local_key()} to {keys.path}", file=sys.stderr)

    async def work(registry: Registry) -> Any:
        report = await rotate(registry, keys)
        await _announce(settings, "secrets", "*")
        return report

    report = asyncio.run(_with_registry(settings, work))
    print(f"re-encrypted {report.rewritten} of {report.total} secrets under key {report.key_id}")
    return 0


def cmd_tier(settings: Settings, email: str, tier: str) -> int:
    async def work(registry: Registry) -> Any:
        user = await registry.set_tier(email, tier)
        await _announce(settings, "user", user.id)
        return user

    user = asyncio.run(_with_registry(settings, work))
    print(f"{user.email} is now on the {user.tier} tier")
    return 0
