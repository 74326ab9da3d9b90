"""Throughput of trivial calls at several concurrencies, beside arq used the default way, and the
CPU an idle worker burns."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench import arq_baseline, mcp_http
from bench.farm import CpuMeter, Farm, cpu_seconds
from bench.plan import Plan
from bench.stats import Figure, Progress, Target, summary
from workers.jail import descendants

# One call: (succeeded, milliseconds, error text).
Call = Callable[[int], Awaitable[tuple[bool, float, str]]]
MAX_CALLS_PER_LEVEL = 100_000


@dataclasses.dataclass
class Load:
    concurrency: int
    calls: int = 0
    errors: int = 0
    elapsed_s: float = 0.0
    latencies_ms: list[float] = dataclasses.field(default_factory=list)
    first_error: str = ""
    cpu_pct: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.elapsed_s if self.elapsed_s else 0.0

    def as_json(self) -> dict[str, Any]:
        return {"concurrency": self.concurrency, "calls": self.calls, "errors": self.errors,
                "elapsed_s": round(self.elapsed_s, 3), "calls_per_s": round(self.calls_per_s, 1),
                "latency_ms": summary(self.latencies_ms), "first_error": self.first_error,
                "cpu_pct_of_a_core": self.cpu_pct}


async def closed_loop(call: Call, concurrency: int, duration_s: float,
                      max_calls: int = MAX_CALLS_PER_LEVEL) -> Load:
    """``concurrency`` callers, each starting its next call when its last one answers, until
    ``duration_s`` has passed; the calls still in flight then are waited for and counted."""
    load = Load(concurrency)
    numbers = itertools.count()
    deadline = time.monotonic() + duration_s

    async def caller() -> None:
        while time.monotonic() < deadline:
            number = next(numbers)
            if number >= max_calls:
                return
            ok, elapsed_ms, error = await call(number)
            load.latencies_ms.append(elapsed_ms)
            if ok:
                load.calls += 1
            else:
                load.errors += 1
                load.first_error = load.first_error or error

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    load.elapsed_s = time.perf_counter() - started
    return load


def farm_call(caller: mcp_http.StatelessCaller) -> Call:
    async def call(number: int) -> tuple[bool, float, str]:
        timed = await caller.call({"a": number, "b": 1}, expect=number + 1)
        return timed.ok, timed.client_ms, timed.error

    return call


def arq_call(arq: arq_baseline.ArqCaller) -> Call:
    async def call(number: int) -> tuple[bool, float, str]:
        ok, elapsed = await arq.call(number)
        return ok, elapsed, "" if ok else "wrong result"

    return call


async def farm_level(farm: Farm, concurrency: int, duration_s: float, meter: CpuMeter) -> Load:
    async with mcp_http.http_client(farm.token, connections=concurrency) as http:
        call = farm_call(mcp_http.StatelessCaller(http, farm.gateway_url, "trivial", "add"))
        await closed_loop(call, concurrency, min(0.3, duration_s / 4))  # open the connections
        meter.start()
        load = await closed_loop(call, concurrency, duration_s)
        load.cpu_pct = meter.stop()
    return load


async def arq_level(redis_url: str, queue: str, concurrency: int, duration_s: float) -> Load:
    async with arq_baseline.ArqCaller(redis_url, queue) as arq:
        return await closed_loop(arq_call(arq), concurrency, duration_s)


def idle_cpu(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """Each process with whatever runs under it (warm sandboxes), as % of one core while idle."""
    trees = {name: descendants(pid) for name, pid in pids.items()}
    before = {name: sum(cpu_seconds(p) for p in tree) for name, tree in trees.items()}
    started = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    return {name: round((sum(cpu_seconds(p) for p in trees[name]) - before[name]) / elapsed * 100,
                        2) for name in pids}


def meter_for(farm: Farm) -> CpuMeter:
    assert farm.gateway is not None
    return CpuMeter({"gateway": [farm.gateway.pid], "workers": [w.pid for w in farm.workers],
                     "redis": [farm.redis.proc.pid], "bench client": [os.getpid()]},
                    alone=frozenset({"bench client"}))


async def measure(farm: Farm, arq_queue: str, plan: Plan, progress: Progress
                  ) -> tuple[dict[str, Any], list[Figure]]:
    """Farm levels with 1 then 2 worker processes (a second one is added), then arq's levels."""
    levels = plan.concurrency
    total = len(levels) * (len(plan.worker_counts) + 1)
    done = 0
    farm_loads: dict[int, list[Load]] = {}
    for count in plan.worker_counts:
        progress.update(done / total, f"{count} worker process(es) starting")
        farm.scale(count)
        farm_loads[count] = []
        for concurrency in levels:
            progress.update(done / total, f"{count} worker(s), concurrency {concurrency}")
            farm_loads[count].append(await farm_level(farm, concurrency, plan.level_s,
                                                      meter_for(farm)))
            done += 1
    arq_loads = []
    for concurrency in levels:
        progress.update(done / total, f"arq default, concurrency {concurrency}")
        arq_loads.append(await arq_level(farm.redis.url, arq_queue, concurrency, plan.arq_level_s))
        done += 1

    raw = {
        "clients": {"farm": mcp_http.CLIENT_NAME, "arq_default": arq_baseline.CLIENT_NAME},
        "level_s": plan.level_s,
        "farm": {str(count): [load.as_json() for load in loads]
                 for count, loads in farm_loads.items()},
        "arq_default": [load.as_json() for load in arq_loads],
        "note": "closed loop: each of `concurrency` callers sends its next call when its last "
                "one answers; the client runs on the same cores as the farm",
    }
    return raw, figures(farm_loads, arq_loads)


def figures(farm_loads: dict[int, list[Load]], arq_loads: list[Load]) -> list[Figure]:
    rows = []
    arq_by_level = {load.concurrency: load for load in arq_loads}
    for count, loads in farm_loads.items():
        for load in loads:
            arq = arq_by_level.get(load.concurrency)
            note = f"{load.errors} errors: {load.first_error}" if load.errors else ""
            rows.append(Figure(
                "throughput", f"calls/s, {count} worker{'s' if count > 1 else ''}, "
                f"concurrency {load.concurrency}", load.calls_per_s, "calls/s",
                f"arq default, 1 worker, concurrency {load.concurrency}",
                arq.calls_per_s if arq else None, client=mcp_http.CLIENT_NAME, note=note))
    best = max((load for loads in farm_loads.values() for load in loads),
               key=lambda load: load.calls_per_s)
    best_arq = max(arq_loads, key=lambda load: load.calls_per_s)
    workers = next(count for count, loads in farm_loads.items() if best in loads)
    rows.append(Figure(
        "throughput", f"peak calls/s ({workers} worker{'s' if workers > 1 else ''}, "
        f"concurrency {best.concurrency})", best.calls_per_s, "calls/s",
        f"arq default peak (concurrency {best_arq.concurrency})", best_arq.calls_per_s,
        (Target(400, "min", "value", "≥ 400 calls/s"),), mcp_http.CLIENT_NAME))
    return rows


def idle_figure(idle: dict[str, float]) -> Figure:
    return Figure("throughput", "idle worker CPU", idle["farm worker"], "% of a core",
                  "idle arq worker (default 0.5 s poll)", idle["arq default worker"],
                  (Target(2.0, "max", "value", "≤ 2% of a core"),),
                  note="worker process and its warm sandboxes, read from /proc/<pid>/stat")
