"""End-to-end latency of a trivial tool: official MCP client and bare POSTs through the farm, the
function called in-process (the floor), and the same job through arq used the default way."""

from __future__ import annotations

import time
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from bench import BenchError, arq_baseline, mcp_http
from bench.apps.trivial import add
from bench.plan import Plan
from bench.stats import Figure, Progress, Target, summary

MCP_CLIENT_NAME = "mcp 2.x Client + streamable_http_client (auto: 2026-07-28)"
WARM_UP_CALLS = 10


def in_process(calls: int) -> list[float]:
    """The function itself, timed one call at a time as the others are."""
    times = []
    for i in range(calls):
        started = time.perf_counter()
        add(i, 1)
        times.append((time.perf_counter() - started) * 1000)
    return times


async def mcp_client(url: str, token: str, calls: int, progress: Progress
                     ) -> tuple[list[float], int]:
    """Sequential calls with the official client over one connection, after a warm-up: the
    times of the right answers, and how many calls failed."""
    times: list[float] = []
    failed = 0
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=60,
                                  trust_env=False) as http:
        async with Client(streamable_http_client(url, http_client=http)) as client:
            for i in range(WARM_UP_CALLS + calls):
                started = time.perf_counter()
                result = await client.call_tool("add", {"a": i, "b": 1})
                elapsed = (time.perf_counter() - started) * 1000
                if i < WARM_UP_CALLS:
                    continue
                if result.is_error or result.structured_content != {"result": i + 1}:
                    failed += 1
                    if failed > max(2, calls * mcp_http.MAX_FAILED_SHARE):
                        raise BenchError(f"the official client got {failed} wrong answers; "
                                         f"the last: {result}")
                    continue
                times.append(elapsed)
                progress.update(len(times) / calls, f"official client {len(times)}/{calls}")
            protocol = client.protocol_version
    if protocol != mcp_http.MODERN:
        raise BenchError(f"the official client negotiated {protocol}, not {mcp_http.MODERN}")
    return times, failed


async def raw_http(gateway_url: str, token: str, calls: int, progress: Progress
                   ) -> mcp_http.Sequential:
    async with mcp_http.http_client(token, connections=1) as http:
        caller = mcp_http.StatelessCaller(http, gateway_url, "trivial", "add")
        return await mcp_http.sequential(
            caller, calls, WARM_UP_CALLS,
            lambda done: progress.update(done / calls, f"bare POSTs {done}/{calls}"))


async def arq_default(redis_url: str, queue: str, calls: int, progress: Progress) -> list[float]:
    times: list[float] = []
    async with arq_baseline.ArqCaller(redis_url, queue) as arq:
        await arq.call(0)  # connection set-up stays out of the figures
        for i in range(calls):
            ok, elapsed = await arq.call(i)
            if not ok:
                raise BenchError("the arq baseline returned a wrong answer")
            times.append(elapsed)
            progress.update(len(times) / calls, f"arq default {len(times)}/{calls}")
    return times


async def measure(gateway_url: str, token: str, redis_url: str, arq_queue: str,
                  plan: Plan, progress: Progress) -> tuple[dict[str, Any], list[Figure]]:
    floor = in_process(plan.in_process_calls)
    official, official_failed = await mcp_client(f"{gateway_url}/mcp/trivial", token,
                                                 plan.latency_calls, progress)
    bare = await raw_http(gateway_url, token, plan.latency_calls, progress)
    arq = await arq_default(redis_url, arq_queue, plan.arq_calls, progress)

    raw = {
        "in_process": summary(floor),
        "mcp_client": {**summary(official), "errors": official_failed},
        "raw_http": {**summary(bare.client_ms), "errors": bare.errors,
                     "first_error": bare.first_error},
        "arq_default": summary(arq),
        "clients": {"mcp_client": MCP_CLIENT_NAME, "raw_http": mcp_http.CLIENT_NAME,
                    "arq_default": arq_baseline.CLIENT_NAME},
        "samples_ms": {"mcp_client": _rounded(official), "raw_http": _rounded(bare.client_ms),
                       "arq_default": _rounded(arq)},
    }
    return raw, figures(raw)


def figures(raw: dict[str, Any]) -> list[Figure]:
    mcp, bare, arq, floor = (raw["mcp_client"], raw["raw_http"], raw["arq_default"],
                             raw["in_process"])
    limits = {"p50": 5.0, "p90": None, "p99": 20.0}
    rows = []
    for q, limit in limits.items():
        targets = [Target(0.01, "max", "ratio", "≤ 1/100 of arq")]
        if limit is not None:
            targets.insert(0, Target(limit, "max", "value", f"≤ {limit:g} ms"))
        rows.append(Figure("latency", f"trivial call {q}", mcp[q], "ms",
                           f"arq default {q}", arq[q], tuple(targets), MCP_CLIENT_NAME))
    rows.append(Figure("latency", "trivial call p50", mcp["p50"], "ms",
                       "same function in-process p50 (the floor)", floor["p50"],
                       client=MCP_CLIENT_NAME))
    rows.append(Figure("latency", "trivial call p50", bare["p50"], "ms", "official client p50",
                       mcp["p50"], (Target(5.0, "max", "value", "≤ 5 ms"),),
                       mcp_http.CLIENT_NAME))
    rows.append(Figure("latency", "trivial call p99", bare["p99"], "ms", "official client p99",
                       mcp["p99"], (Target(20.0, "max", "value", "≤ 20 ms"),),
                       mcp_http.CLIENT_NAME))
    return rows


def _rounded(values: list[float]) -> list[float]:
    return [round(v, 3) for v in values]
