"""Replay throughput: logged calls of the trivial app run again against its live version, the way
``ultralight replay`` does (gateway/replay_cli.py), beside live calls at the same concurrency."""

from __future__ import annotations

import asyncio
import contextlib
import io
from typing import Any

from bench.farm import Farm
from bench.plan import Plan
from bench.stats import Figure, Progress, Target
from gateway.client import ClientError

CONCURRENCY = 8


def not_measured(reason: str) -> tuple[dict[str, Any], list[Figure]]:
    return ({"measured": False, "reason": reason},
            [Figure("replay", "replay calls/s", None, "calls/s", "live calls/s",
                    None, (Target(300, "min", "value", "≥ 300 calls/s"),),
                    note=f"not measured: {reason}")])


async def measure(farm: Farm, version: str, live_calls_per_s: float | None, plan: Plan,
                  progress: Progress) -> tuple[dict[str, Any], list[Figure]]:
    from gateway.replay_cli import run_replay

    progress.update(0.0, "starting a replay")
    selection = {"function": "add", "limit": plan.replay_calls}
    quiet = io.StringIO()  # run_replay draws its own bar on stderr; ours is already there
    try:
        with contextlib.redirect_stderr(quiet):
            report = await asyncio.to_thread(run_replay, farm.client(), "trivial", version,
                                             selection, CONCURRENCY)
    except ClientError as exc:
        text = str(exc)
        if text.startswith("404") and "version" not in text:
            return not_measured("POST /api/apps/{app}/replays answers 404: the replay "
                                "endpoints are not wired into the gateway yet")
        return not_measured(f"the replay failed: {text}")
    if not report["calls"]:
        return not_measured("the call log holds no calls to replay")
    raw = {"measured": True, "concurrency": CONCURRENCY, "calls": report["calls"],
           "elapsed_s": report["elapsed_s"], "calls_per_s": report["calls_per_s"],
           "counts": report["counts"], "latency_ms": report["latency_ms"],
           "client": "gateway.replay_cli.run_replay (thread pool of urllib requests)"}
    return raw, [Figure("replay", f"replay calls/s ({report['calls']} calls, concurrency "
                        f"{CONCURRENCY})", report["calls_per_s"], "calls/s",
                        f"live calls/s at concurrency {CONCURRENCY}", live_calls_per_s,
                        (Target(300, "min", "value", "≥ 300 calls/s"),),
                        "gateway.replay_cli.run_replay")]
