"""Pre-execution gateway overhead with every gate on, read from the gateway's own timings.

The caller is not the app's owner but a user with a grant carrying every rule (address ranges,
days, an argument allow-list, an expiry and a budget), on an app with its own limits, under the
platform's rate limit and weekly quota: each gate runs and counts in Redis, none refuses. The
gateway reports its steps in ``Server-Timing`` (``auth``, ``gates``, ``seal``, ``pre`` = request
start to enqueue) and its whole time in ``X-Elapsed-Ms``; the worker reports the sandbox call's
time in ``_meta["ultralight/elapsed_ms"]``.
"""

from __future__ import annotations

import importlib
import inspect
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bench import mcp_http
from bench.farm import UNLIMITED, Farm
from bench.plan import Plan
from bench.stats import Figure, Progress, Target, summary
from config import Settings
from config.logging import configure_logging

GUEST = "guest@bench.test"
ARGUMENT_VALUES = list(range(100))
# The largest app limit the API takes.
APP_LIMIT = 10_000_000


def grant_every_rule(farm: Farm) -> str:
    """A guest token whose calls pass through every gate; the grant's id."""
    owner = farm.client()
    grant = owner.api("POST", "/api/apps/trivial/grants", {
        "email": GUEST, "ips": ["127.0.0.0/8"], "days": "mon-sun", "expires": "30d",
        "budget": f"{UNLIMITED}/day", "allow_args": {"a": ARGUMENT_VALUES},
    })
    owner.api("PUT", "/api/apps/trivial/limits", {"per_minute": APP_LIMIT,
                                                  "per_day": APP_LIMIT})
    return str(grant["id"])


def allowed_arguments(number: int) -> tuple[dict[str, Any], Any]:
    """Arguments the grant allows, and the answer they should get."""
    a = ARGUMENT_VALUES[number % len(ARGUMENT_VALUES)]
    return {"a": a, "b": 1}, a + 1


async def measure(farm: Farm, plan: Plan, progress: Progress
                  ) -> tuple[dict[str, Any], list[Figure]]:
    grant_id = grant_every_rule(farm)
    token = farm.issue_token(GUEST)
    async with mcp_http.http_client(token, connections=1) as http:
        caller = mcp_http.StatelessCaller(http, farm.gateway_url, "trivial", "add")
        found = await mcp_http.sequential(
            caller, plan.gate_calls, 10,
            lambda done: progress.update(done / plan.gate_calls, f"guest calls {done}"),
            allowed_arguments)
    timed = found.answered

    def step(name: str) -> list[float]:
        return [t.steps[name] for t in timed if name in t.steps]

    outside = [t.gateway_ms - t.worker_ms for t in timed
               if t.gateway_ms is not None and t.worker_ms is not None]
    raw: dict[str, Any] = {
        "caller": "a granted non-owner user (grant with ips, days, expiry, budget, allow_args; "
                  "app limits per minute and per day; platform rate limit and weekly quota)",
        "grant_id": grant_id,
        "client": mcp_http.CLIENT_NAME,
        "end_to_end_ms": summary([t.client_ms for t in timed]),
        "errors": found.errors, "first_error": found.first_error,
        "steps_ms": {name: summary(step(name)) for name in ("auth", "gates", "seal", "pre")},
        "gateway_ms": summary([t.gateway_ms for t in timed if t.gateway_ms is not None]),
        "worker_ms": summary([t.worker_ms for t in timed if t.worker_ms is not None]),
        "gateway_minus_worker_ms": summary(outside),
    }
    e2e = raw["end_to_end_ms"]["p50"]
    rows = [
        Figure("gates", "gates step p50, every gate on", raw["steps_ms"]["gates"]["p50"], "ms",
               "end-to-end call p50 (same calls)", e2e,
               (Target(1.0, "max", "value", "≤ 1 ms"),), mcp_http.CLIENT_NAME,
               note="Server-Timing gates;dur"),
        Figure("gates", "gates step p99, every gate on", raw["steps_ms"]["gates"]["p99"], "ms",
               "end-to-end call p99 (same calls)", raw["end_to_end_ms"]["p99"],
               client=mcp_http.CLIENT_NAME),
        Figure("gates", "pre-execution gateway time p50 (request to enqueue)",
               raw["steps_ms"]["pre"]["p50"], "ms", "end-to-end call p50 (same calls)", e2e,
               client=mcp_http.CLIENT_NAME, note="Server-Timing pre;dur"),
        Figure("gates", "gateway time outside the sandbox call p50",
               raw["gateway_minus_worker_ms"]["p50"], "ms", "end-to-end call p50 (same calls)",
               e2e, client=mcp_http.CLIENT_NAME,
               note="X-Elapsed-Ms minus _meta ultralight/elapsed_ms: gateway, Redis and queue"),
    ]
    return raw, rows


async def gates_on_vs_off(farm: Farm, plan: Plan, progress: Progress
                          ) -> tuple[dict[str, Any], list[Figure]]:
    """bench/gates.py's comparison (two in-process gateways, gates on and off, a stand-in farm
    that answers at once), run on this farm's Redis; its own figures beside ours."""
    try:
        gates_bench = importlib.import_module("bench.gates")
    except ModuleNotFoundError as exc:
        if exc.name != "bench.gates":
            raise
        return {"measured": False, "reason": "bench/gates.py is not in yet"}, []
    expected = {"prepare": ["settings"], "measure": ["settings", "token", "calls", "warmup"]}
    for name, parameters in expected.items():
        entry = getattr(gates_bench, name, None)
        if not callable(entry) or list(inspect.signature(entry).parameters) != parameters:
            return {"measured": False, "reason": f"bench/gates.py has no {name}"
                    f"({', '.join(parameters)}) entry any more"}, []

    root = Path(tempfile.mkdtemp(prefix="ultralight-bench-gates-"))
    try:
        settings = Settings(data_dir=root / "data", redis_url=farm.redis.url,
                            queue_name=f"ultralight:bench-gates:{root.name}", log_level="ERROR",
                            log_format="console",
                            rate_limit_call_per_min=int(UNLIMITED),
                            weekly_quotas=f"free:{UNLIMITED}")
        configure_logging(settings)
        progress.update(0.5, "bench/gates.py: gates on vs off")
        token = await gates_bench.prepare(settings)
        timings = await gates_bench.measure(settings, token, plan.gate_calls,
                                            max(5, plan.gate_calls // 10))
    finally:
        configure_logging(Settings(log_level="WARNING", log_format="console"))
        shutil.rmtree(root, ignore_errors=True)
    on, off = timings["on"], timings["off"]
    pre_on, pre_off = summary(on["pre"]), summary(off["pre"])
    raw = {"measured": True, "calls_per_mode": plan.gate_calls, "method": gates_bench.__doc__,
           "pre_ms": {"on": pre_on, "off": pre_off},
           "client_ms": {"on": summary(on["client"]), "off": summary(off["client"])}}
    on_p50, off_p50 = pre_on["p50"], pre_off["p50"]
    client = "aiohttp (bench/gates.py)"
    return raw, [
        Figure("gates", "pre-execution p50, gates on (bench/gates.py)", on_p50, "ms",
               "the same, gates off", off_p50, client=client),
        Figure("gates", "what the gates add at p50 (on minus off)", on_p50 - off_p50, "ms",
               "pre-execution p50, gates off", off_p50,
               (Target(1.0, "max", "value", "≤ 1 ms"),), client),
    ]
