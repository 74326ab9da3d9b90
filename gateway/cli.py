"""The ``ultralight`` command: run the farm's processes and manage apps from a shell."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson

from config import Settings, SettingsError
from config.logging import configure_logging
from gateway import GatewayError, cli_access
from gateway.cli_ops import add_ops_commands
from workers import WorkerError
from gateway.client import ClientError, GatewayClient


def settings_from(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for name in ("host", "port", "data_dir", "redis_url", "database_url"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = Path(value) if name == "data_dir" else value
    return Settings.from_env(**overrides)


def client_from(args: argparse.Namespace) -> GatewayClient:
    url = args.url or os.environ.get("ULTRALIGHT_URL") or "http://127.0.0.1:8080"
    token = args.token or os.environ.get("ULTRALIGHT_TOKEN")
    return GatewayClient(url, token)


def emit(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


# Process roles.

def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.app import serve

    settings = settings_from(args)
    configure_logging(settings)
    serve(settings)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from workers.process import main as one_worker
    from workers.process import supervise

    if args.processes < 1:
        raise SystemExit("--processes must be at least 1")
    settings = settings_from(args)
    if args.concurrency is not None:
        os.environ["ULTRALIGHT_WORKER_CONCURRENCY"] = str(args.concurrency)
    for name in ("redis_url", "database_url", "data_dir"):
        value = getattr(args, name, None)
        if value is not None:
            os.environ[f"ULTRALIGHT_{name.upper()}"] = str(value)
    if args.processes == 1 and not args.supervise:
        one_worker()
        return 0
    configure_logging(settings)
    return supervise(args.processes, grace_s=settings.max_call_timeout_s)


def cmd_dev(args: argparse.Namespace) -> int:
    from gateway.dev import run_dev

    return run_dev(Path(args.data_dir), args.port, args.workers)


# Management.

def cmd_token_create(args: argparse.Namespace) -> int:
    from gateway.auth import issue_token
    from gateway.registry import open_registry

    settings = settings_from(args)
    # The store's log lines go to stderr: stdout carries the token alone.
    configure_logging(settings)

    async def create() -> Any:
        registry = open_registry(settings.resolved_database_url)
        await registry.open()
        try:
            ttl = args.expires_days * 86400 if args.expires_days else None
            return await issue_token(registry, args.email, args.name, ttl, args.scope or ["*"],
                                     args.app, args.function)
        finally:
            await registry.close()

    issued = asyncio.run(create())
    if args.json:
        emit({"token": issued.token, "token_id": issued.token_id, "email": issued.user.email})
    else:
        print(issued.token)
        print(f"(token {issued.token_id} for {issued.user.email}; it is shown only once)",
              file=sys.stderr)
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(f"cannot read {path}: {exc}") from None
    manifest_path = Path(args.manifest) if args.manifest else path.with_suffix(".manifest.json")
    manifest = None
    if args.manifest or manifest_path.exists():
        try:
            manifest = orjson.loads(manifest_path.read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            raise SystemExit(f"cannot read the manifest {manifest_path}: {exc}") from None
    name = args.name or (manifest or {}).get("name") or path.stem
    body: dict[str, Any] = {"source": source, "manifest": manifest, "draft": args.draft}
    if args.public:
        body["visibility"] = "public"
    elif args.visibility:
        body["visibility"] = args.visibility
    result = client_from(args).api("POST", f"/api/apps/{quote(name, safe='')}/versions", body)
    state = "live" if result["live"] else "draft"
    print(f"deployed {result['name']} version {result['version']} ({state}, "
          f"{result['visibility']}): {', '.join(result['tools'])}")
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    result = client_from(args).api("GET", f"/api/apps/{quote(args.name, safe='')}/versions")
    if args.json:
        emit(result)
        return 0
    for version in result["versions"]:
        marker = "*" if version["live"] else " "
        print(f"{marker} {version['version']}  {', '.join(version['tools'])}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    result = client_from(args).api("POST", f"/api/apps/{quote(args.name, safe='')}/promote",
                                   {"version": args.version})
    print(f"{result['app']} now serves version {result['live_version']}")
    return 0


def cmd_apps(args: argparse.Namespace) -> int:
    result = client_from(args).api("GET", "/api/apps")
    for app in result["apps"]:
        print(f"{app['name']}  {app['visibility']}  {app['live_version'] or '-'}  {app['id']}")
    return 0


def cmd_call(args: argparse.Namespace) -> int:
    try:
        arguments = orjson.loads(args.args)
    except orjson.JSONDecodeError as exc:
        raise SystemExit(f"--args is not valid JSON: {exc}") from None
    result = client_from(args).rpc(args.app, "tools/call",
                                   {"name": args.function, "arguments": arguments})
    if result.get("isError"):
        text = " ".join(c.get("text", "") for c in result.get("content", []))
        print(f"error: {text}", file=sys.stderr)
        return 1
    structured = result.get("structuredContent")
    if isinstance(structured, dict) and set(structured) == {"result"}:
        structured = structured["result"]
    emit(structured)
    return 0


# Parser.

def add_client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="gateway URL (default $ULTRALIGHT_URL or "
                        "http://127.0.0.1:8080)")
    parser.add_argument("--token", help="API token (default $ULTRALIGHT_TOKEN)")


def add_store_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="embedded data folder ($ULTRALIGHT_DATA_DIR)")
    parser.add_argument("--redis-url", help="$ULTRALIGHT_REDIS_URL")
    parser.add_argument("--database-url", help="$ULTRALIGHT_DATABASE_URL")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ultralight", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], int], text: str,
                aliases: tuple[str, ...] = ()) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text, aliases=list(aliases))
        sub.set_defaults(handler=handler)
        return sub

    serve = command("serve", cmd_serve, "run a gateway", aliases=("gateway",))
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    add_store_flags(serve)

    worker = command("worker", cmd_worker, "run worker processes")
    worker.add_argument("--processes", type=int, default=1, help="worker processes (default 1)")
    worker.add_argument("--concurrency", type=int, help="calls at once per process")
    worker.add_argument("--supervise", action="store_true",
                        help="supervise even a single process (restart it when it dies)")
    add_store_flags(worker)

    dev = command("dev", cmd_dev, "run everything on this machine with the examples deployed")
    dev.add_argument("--data-dir", default=".ultralight")
    dev.add_argument("--port", type=int, default=8080)
    dev.add_argument("--workers", type=int, default=2)

    token = command("token", lambda a: 2, "manage API tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = token_commands.add_parser("create", help="create a user's token (shown once)")
    create.set_defaults(handler=cmd_token_create)
    create.add_argument("--email", default="owner@localhost")
    create.add_argument("--name", default="cli")
    create.add_argument("--expires-days", type=float)
    create.add_argument("--scope", action="append", help="mcp, apps, grants, env, secrets, "
                        "tokens or * (repeatable; default *)")
    create.add_argument("--app", action="append", help="only this app (repeatable)")
    create.add_argument("--function", action="append", help="only this tool (repeatable)")
    create.add_argument("--json", action="store_true")
    add_store_flags(create)
    listing = token_commands.add_parser("list", help="list your tokens (never their values)")
    listing.set_defaults(handler=remote(cli_access.cmd_token_list))
    listing.add_argument("--json", action="store_true")
    add_client_flags(listing)
    revoke = token_commands.add_parser("revoke", help="revoke one of your tokens")
    revoke.set_defaults(handler=remote(cli_access.cmd_token_revoke))
    revoke.add_argument("token_id")
    add_client_flags(revoke)

    deploy = command("deploy", cmd_deploy, "deploy a Python module as an app")
    deploy.add_argument("file")
    deploy.add_argument("--name")
    deploy.add_argument("--manifest")
    deploy.add_argument("--public", action="store_true", help="anyone may call it")
    deploy.add_argument("--visibility", choices=("private", "unlisted", "public"))
    deploy.add_argument("--draft", action="store_true", help="upload without going live")
    add_client_flags(deploy)

    versions = command("versions", cmd_versions, "list an app's versions (* = live)")
    versions.add_argument("name")
    versions.add_argument("--json", action="store_true")
    add_client_flags(versions)

    promote = command("promote", cmd_promote, "make a version live")
    promote.add_argument("name")
    promote.add_argument("version", help="version id or a unique prefix of it")
    add_client_flags(promote)

    apps = command("apps", cmd_apps, "list your apps")
    add_client_flags(apps)

    call = command("call", cmd_call, "call a tool and print its result")
    call.add_argument("app")
    call.add_argument("function")
    call.add_argument("--args", default="{}", help="arguments as a JSON object")
    add_client_flags(call)
    add_access_commands(command)
    add_ops_commands(command, remote, add_client_flags, settings_from, add_store_flags)
    return parser


def remote(handler: Callable[[argparse.Namespace, GatewayClient], int]
           ) -> Callable[[argparse.Namespace], int]:
    """A command that talks to the gateway with the caller's token."""
    return lambda args: handler(args, client_from(args))


def add_access_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    grant = command("grant", remote(cli_access.cmd_grant), "let someone call one of your apps")
    grant.add_argument("app")
    grant.add_argument("email", help="their email (the grant applies once they have an account)")
    grant.add_argument("--function", help="only this tool")
    grant.add_argument("--ip", action="append", default=[], help="allowed address or CIDR "
                       "range (repeatable)")
    grant.add_argument("--hours", help="allowed hours, e.g. 09-17 or 22-06 (wraps midnight)")
    grant.add_argument("--days", help="allowed days, e.g. mon-fri or sat,sun")
    grant.add_argument("--tz", help="time zone of --hours and --days (default UTC)")
    grant.add_argument("--budget", help="calls per period, e.g. 100/day (minute, hour, day, "
                       "week, month)")
    grant.add_argument("--expires", help="a date (2030-01-31), a time or a span (30d, 12h)")
    grant.add_argument("--allow-arg", action="append", default=[], metavar="NAME=V1,V2",
                       help="allowed values of an argument (repeatable)")
    grant.add_argument("--json", action="store_true")
    add_client_flags(grant)

    grants = command("grants", remote(cli_access.cmd_grants), "list an app's grants")
    grants.add_argument("app")
    grants.add_argument("--all", action="store_true", help="include revoked grants")
    grants.add_argument("--json", action="store_true")
    add_client_flags(grants)

    revoke = command("revoke-grant", remote(cli_access.cmd_revoke_grant), "revoke a grant")
    revoke.add_argument("app")
    revoke.add_argument("grant_id")
    add_client_flags(revoke)

    limits = command("limits", remote(cli_access.cmd_limits),
                     "show or set an app's limits on callers other than its owner")
    limits.add_argument("app")
    limits.add_argument("--per-minute", type=int, help="calls a minute (0: no limit)")
    limits.add_argument("--per-day", type=int, help="calls a day (0: no limit)")
    add_client_flags(limits)

    visibility = command("visibility", remote(cli_access.cmd_visibility),
                         "make an app private, unlisted or public")
    visibility.add_argument("app")
    visibility.add_argument("visibility", choices=("private", "unlisted", "public"))
    add_client_flags(visibility)

    env = command("env", remote(cli_access.cmd_env), "an app's env vars (values never shown)")
    env.add_argument("action", choices=("set", "unset", "list"))
    env.add_argument("app")
    env.add_argument("name", nargs="?")
    env.add_argument("value", nargs="?", help="the value (default: stdin, or a prompt)")
    add_client_flags(env)

    secret = command("secret", remote(cli_access.cmd_secret),
                     "your own secrets for an app (values never shown)")
    secret.add_argument("action", choices=("set", "unset", "list"))
    secret.add_argument("app")
    secret.add_argument("name", nargs="?")
    secret.add_argument("value", nargs="?", help="the value (default: stdin, or a prompt)")
    add_client_flags(secret)

    byok = command("byok", remote(cli_access.cmd_byok),
                   "your own AI provider keys (values never shown)")
    byok.add_argument("action", choices=("set", "unset", "list"))
    byok.add_argument("provider", nargs="?", help="e.g. openai, anthropic")
    byok.add_argument("key", nargs="?", help="the key (default: stdin, or a prompt)")
    add_client_flags(byok)

    keys = command("keys", lambda a: 2, "manage the keys that encrypt secrets at rest")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    rotate = key_commands.add_parser("rotate", help="re-encrypt every secret under the current "
                                     "key (a new local key when none is configured)")
    rotate.set_defaults(handler=lambda a: cli_access.cmd_keys_rotate(settings_from(a)))
    add_store_flags(rotate)

    tier = command("tier", lambda a: cli_access.cmd_tier(settings_from(a), a.email, a.tier),
                   "put a user on a tier (its weekly quota); writes to the database")
    tier.add_argument("email")
    tier.add_argument("tier")
    add_store_flags(tier)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.handler(args)
    except (ClientError, SettingsError, GatewayError, WorkerError) as exc:
        print(f"ultralight: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
