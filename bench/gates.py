"""The gates' cost: the gateway's pre-execution time with every gate on, against the same calls
with the gates off, in one run: ``python -m bench.gates [--quick] [--calls N]``.

Two gateways run in this process on one Redis and one database. Both authenticate the caller,
look up the app, validate the arguments and seal the call's secrets; a stand-in dispatcher
answers at once, so what is timed ends where the farm would begin. The caller is not the owner
but a user with a grant carrying every rule (address range, days in a time zone, an expiry, a
budget, allowed argument values), on a private app with per-minute and per-day limits, under the
platform's rate limit and weekly quota: every gate runs and counts in Redis, none refuses. On the
second gateway the gates are replaced by an always-yes stand-in. Requests alternate between the
two, so drift of the machine hits both alike. The figure is the gateway's own ``pre`` step from
``Server-Timing`` (request start to enqueue); the client's round trip is shown too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import orjson
from aiohttp import web

from config import Settings
from config.logging import configure_logging
from gateway.app import create_app
from gateway.auth import issue_token
from gateway.deploy import build_version
from gateway.gates import Admission, Caller, Permit
from gateway.grants import GrantStore, parse_rules
from gateway.registry import AppRecord, Registry, open_registry
from gateway.secrets import SecretKeys, Secrets
from gateway.state import GATEWAY
from workers.blobs import LocalBlobStore
from workers.jobs import CallJob, CallReply

BIG = 1_000_000_000
APP_SOURCE = '''"""Adds."""


def add(a: int, b: int = 1) -> int:
    """a + b."""
    return a + b
'''
ALLOWED = list(range(100))


class AnsweringDispatcher:
    """Stands in for the farm: answers every call at once, so timing ends at the enqueue."""

    async def call(self, job: CallJob) -> CallReply:
        return CallReply("ok", value=job.args["a"] + job.args.get("b", 1))


class OpenGates:
    """Stands in for the gates: lets everything through without counting anything."""

    def caller(self, request: web.Request, principal: Any) -> Caller:
        return Caller(principal, None)

    async def admit(self, *args: Any, **kwargs: Any) -> Admission:
        return Admission(Permit(owner=False))

    async def refund(self, *args: Any) -> None:
        return None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def redis_server(url: str | None, directory: Path) -> Iterator[str]:
    """The Redis to use: the one given, or a redis-server of our own on loopback."""
    if url:
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed; pass --redis-url or install it")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(directory)],
                            stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), .2):
                break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


async def prepare(settings: Settings) -> str:
    """A private app with limits, a guest with a grant holding every rule, secrets; the
    guest's token."""
    registry = open_registry(settings.resolved_database_url)
    await registry.open()
    try:
        owner = await registry.ensure_user("owner@bench.test")
        code_hash = await LocalBlobStore(settings.resolved_blob_dir).put(APP_SOURCE.encode())
        manifest = {"env": {"SERVICE_URL": {"scope": "app"},
                            "GUEST_TOKEN": {"scope": "per_user", "required": True}}}
        app = await registry.save_version(owner, "adder", "private",
                                          build_version(APP_SOURCE, manifest, code_hash), True)
        await registry.set_limits(app.id, BIG, BIG)
        guest = await issue_token(registry, "guest@bench.test", "bench")
        await add_grant_and_secrets(settings, registry, app, guest.user.id)
        return guest.token
    finally:
        await registry.close()


async def add_grant_and_secrets(settings: Settings, registry: Registry, app: AppRecord,
                                guest_id: str) -> None:
    rules = parse_rules({"ips": ["127.0.0.0/8", "::1/128"], "days": "mon-sun",
                         "tz": "Europe/Berlin", "budget": f"{BIG}/day",
                         "allow_args": {"a": ALLOWED}})
    await GrantStore(registry).add(app.id, "guest@bench.test", "add", rules,
                                   time.time() + 86400, app.owner_id)
    secrets = Secrets(registry, SecretKeys(settings), None, 10.0)
    await secrets.set_env(app.id, "SERVICE_URL", "https://service.bench.test")
    await secrets.set_user_secret(guest_id, app.id, "GUEST_TOKEN", "bench-guest-token")
    await secrets.set_byok(guest_id, "openai", "sk-bench")


@contextlib.asynccontextmanager
async def gateway(settings: Settings, gates_on: bool) -> AsyncIterator[str]:
    app = create_app(settings)

    async def swap_parts(app: web.Application) -> None:
        state = app[GATEWAY]
        state.dispatcher = AnsweringDispatcher()  # type: ignore[assignment]
        if not gates_on:
            state.gates = OpenGates()  # type: ignore[assignment]

    app.on_startup.append(swap_parts)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def one_call(http: aiohttp.ClientSession, url: str, token: str, a: int
                   ) -> tuple[float, float]:
    """(gateway's pre-execution ms, client's round trip ms) of one tools/call."""
    body = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "add", "arguments": {"a": a, "b": 1},
        "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}})
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json",
               "Accept": "application/json", "MCP-Protocol-Version": "2026-07-28",
               "Mcp-Method": "tools/call", "Mcp-Name": "add"}
    started = time.perf_counter()
    async with http.post(f"{url}/mcp/adder", data=body, headers=headers) as response:
        payload = await response.read()
        timing = response.headers.get("Server-Timing", "")
    elapsed = (time.perf_counter() - started) * 1000
    result = orjson.loads(payload).get("result", {})
    if response.status != 200 or result.get("structuredContent") != {"result": a + 1}:
        raise SystemExit(f"a benchmark call failed ({response.status}): {payload[:300]!r}")
    steps = dict(part.strip().split(";dur=") for part in timing.split(",") if "dur=" in part)
    return float(steps["pre"]), elapsed


async def measure(settings: Settings, token: str, calls: int, warmup: int
                  ) -> dict[str, dict[str, list[float]]]:
    timings: dict[str, dict[str, list[float]]] = {
        mode: {"pre": [], "client": []} for mode in ("on", "off")}
    async with gateway(settings, True) as on, gateway(settings, False) as off, \
            aiohttp.ClientSession() as http:
        for number in range(warmup + calls):
            for mode, url in (("on", on), ("off", off)) if number % 2 else (("off", off),
                                                                            ("on", on)):
                pre, client = await one_call(http, url, token, ALLOWED[number % len(ALLOWED)])
                if number >= warmup:
                    timings[mode]["pre"].append(pre)
                    timings[mode]["client"].append(client)
    return timings


def report(timings: dict[str, dict[str, list[float]]], calls: int) -> str:
    lines = [f"gateway pre-execution overhead, {calls} tools/call per mode (ms)",
             f"{'':40}{'p50':>9}{'p90':>9}{'p99':>9}"]
    for metric, label in (("pre", "gateway, request to enqueue"), ("client", "client round trip")):
        for mode in ("on", "off"):
            values = timings[mode][metric]
            figures = "".join(f"{percentile(values, q):9.3f}" for q in (.5, .9, .99))
            lines.append(f"{label + ', gates ' + mode:<40}{figures}")
    on_p50 = percentile(timings["on"]["pre"], .5)
    off_p50 = percentile(timings["off"]["pre"], .5)
    lines.append(f"gates on / off at p50: {on_p50 / off_p50:.2f}x; the gates add "
                 f"{on_p50 - off_p50:.3f} ms at p50 (target: at most 1 ms)")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> str:
    root = Path(tempfile.mkdtemp(prefix="ultralight-bench-gates-"))
    try:
        with redis_server(args.redis_url, root) as url:
            settings = Settings(data_dir=root / "data", redis_url=url,
                                queue_name=f"ultralight:bench-gates:{root.name}",
                                log_level="WARNING", rate_limit_call_per_min=BIG,
                                weekly_quotas=f"free:{BIG}")
            configure_logging(settings)
            token = await prepare(settings)
            timings = await measure(settings, token, args.calls, args.warmup)
            return report(timings, args.calls)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gates", description=__doc__.split(
        "\n")[0])
    parser.add_argument("--calls", type=int, default=3000, help="calls per mode")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="a few calls, to see it work")
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    args = parser.parse_args(argv)
    if args.quick:
        args.calls, args.warmup = 20, 5
    print(asyncio.run(run(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
