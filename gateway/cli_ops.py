"""Commands for operating the farm: logs, replay, status and bench."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import orjson

from config import Settings
from gateway.client import ClientError, GatewayClient

RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_time(text: str | None) -> float | None:
    """Unix seconds from '1733300000', an ISO time, or an age such as '30m', '2h', '7d'."""
    if text is None:
        return None
    relative = RELATIVE.match(text.strip())
    if relative:
        age = float(relative.group(1)) * UNITS[relative.group(2)]
        return datetime.datetime.now(datetime.UTC).timestamp() - age
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise SystemExit(f"cannot read the time {text!r}: use an ISO time, Unix seconds or an "
                         "age like 30m, 2h, 7d") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def cmd_logs(args: argparse.Namespace, client: GatewayClient) -> int:
    query = {k: v for k, v in (("function", args.function), ("outcome", args.outcome),
                               ("since", parse_time(args.since)), ("limit", args.limit))
             if v is not None}
    result = client.api("GET", f"/api/apps/{quote(args.app, safe='')}/calls?{urlencode(query)}")
    if args.json:
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    for call in result["calls"]:
        when = datetime.datetime.fromtimestamp(call["at"], datetime.UTC).strftime(
            "%Y-%m-%d %H:%M:%S")
        detail = call["error"] if call["outcome"] != "ok" else _short(call["result"])
        print(f"{when}  {call['outcome']:<13} {call['duration_ms']:>8.1f} ms  "
              f"{call['function']}({_short(call['args'], 60)}) -> {detail}")
    if not result["calls"]:
        print("no calls match")
    return 0


def _short(value: Any, width: int = 80) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return text if len(text) <= width else text[:width - 1] + "…"


def cmd_replay(args: argparse.Namespace, client: GatewayClient) -> int:
    from gateway.replay_cli import run_replay, summary, write_report

    selection = {k: v for k, v in (("function", args.function),
                                   ("since", parse_time(args.since)),
                                   ("until", parse_time(args.until)),
                                   ("limit", args.limit)) if v is not None}
    report = run_replay(client, args.app, args.version, selection, args.concurrency)
    if args.report:
        write_report(report, Path(args.report))
    print(summary(report))
    return 1 if report["regressed"] else 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    import logging

    from gateway.ops import farm_status, render_status
    from workers.process import connect

    # arq reports each connection retry with a traceback; the command's own error says it all.
    logging.getLogger("arq").setLevel(logging.CRITICAL)

    async def snapshot() -> dict[str, Any]:
        redis = await connect(settings)
        try:
            return await farm_status(redis, settings)
        finally:
            await redis.aclose()

    status = asyncio.run(snapshot())
    if args.json:
        sys.stdout.write(orjson.dumps(status, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(render_status(status))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    source_tree = Path(__file__).resolve().parent.parent
    if (source_tree / "bench" / "__init__.py").exists() and str(source_tree) not in sys.path:
        sys.path.insert(0, str(source_tree))
    try:
        import bench
    except ImportError:
        raise SystemExit("the benchmark lives in bench/ of the source tree; run it from a "
                         "checkout") from None
    return int(bench.main(args.bench_args))


def add_ops_commands(command: Callable[..., argparse.ArgumentParser],
                     remote: Callable[..., Callable[[argparse.Namespace], int]],
                     add_client_flags: Callable[[argparse.ArgumentParser], None],
                     settings_from: Callable[[argparse.Namespace], Settings],
                     add_store_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    logs = command("logs", remote(cmd_logs), "an app's logged calls, newest first")
    logs.add_argument("app")
    logs.add_argument("--function")
    logs.add_argument("--since", help="ISO time, Unix seconds, or an age like 2h")
    logs.add_argument("--outcome", help="ok, app_error, timeout, ...")
    logs.add_argument("--limit", type=int, default=50)
    logs.add_argument("--json", action="store_true")
    add_client_flags(logs)

    replay = command("replay", remote(cmd_replay),
                     "replay logged calls against a version; exit 1 when anything regressed")
    replay.add_argument("app")
    replay.add_argument("--version", required=True, help="version id or a unique prefix")
    replay.add_argument("--function")
    replay.add_argument("--since")
    replay.add_argument("--until")
    replay.add_argument("--limit", type=int, default=1000)
    replay.add_argument("--concurrency", type=int, default=8)
    replay.add_argument("--report", help="write the full report as JSON here")
    add_client_flags(replay)

    status = command("status", lambda a: cmd_status(a, settings_from(a)),
                     "queues, live workers, calls in flight and recent latency (from Redis)")
    status.add_argument("--json", action="store_true")
    add_store_flags(status)

    bench = command("bench", cmd_bench, "measure the farm beside its alternatives "
                    "(arguments pass to python -m bench)")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)


__all__ = ["ClientError", "add_ops_commands"]
