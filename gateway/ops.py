"""What an operator asks of a running farm: queue depths, live workers, latency, metrics."""

from __future__ import annotations

import time
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from redis.asyncio import Redis

from config import Settings
from gateway.calllog import LATENCY_KEY
from workers.jobs import WORKER_KEY_PATTERN

LATENCY_BUCKETS_S = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, int(fraction * len(sorted_values)))
    return sorted_values[index]


async def farm_status(redis: Redis, settings: Settings) -> dict[str, Any]:
    """One snapshot of the farm, from Redis alone."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcard(settings.queue_name)
        pipe.zcard(settings.replay_queue_name)
        pipe.lrange(LATENCY_KEY, 0, -1)
        live, replay, latencies = await pipe.execute()
    workers = []
    async for key in redis.scan_iter(WORKER_KEY_PATTERN, count=500):
        raw = await redis.get(key)
        if raw is not None:
            info = orjson.loads(raw)
            info["id"] = key.decode().rsplit(":", 1)[-1]
            info["seen_s_ago"] = round(time.time() - info.get("at", 0), 1)
            workers.append(info)
    samples = sorted(float(v) for v in latencies)
    return {
        "queues": {settings.queue_name: live, settings.replay_queue_name: replay},
        "workers": sorted(workers, key=lambda w: w["id"]),
        "in_flight": sum(int(w.get("running", 0)) for w in workers),
        "latency_ms": {"samples": len(samples), "p50": percentile(samples, 0.5),
                       "p90": percentile(samples, 0.9), "p99": percentile(samples, 0.99)},
    }


def render_status(status: dict[str, Any]) -> str:
    lines = ["queues:"]
    lines += [f"  {name:<28} {depth:>6} waiting" for name, depth in status["queues"].items()]
    lines.append(f"workers: {len(status['workers'])} live, {status['in_flight']} calls in flight")
    for worker in status["workers"]:
        lines.append(f"  {worker['id']:<36} pid {worker.get('pid')}  running "
                     f"{worker.get('running', 0)}  warm {worker.get('warm', 0)}  "
                     f"seen {worker['seen_s_ago']} s ago")
    latency = status["latency_ms"]
    if latency["samples"]:
        lines.append(f"latency over the last {latency['samples']} calls: p50 "
                     f"{latency['p50']:.1f} ms, p90 {latency['p90']:.1f} ms, "
                     f"p99 {latency['p99']:.1f} ms")
    else:
        lines.append("latency: no calls yet")
    return "\n".join(lines)


class GatewayMetrics:
    """Prometheus metrics of one gateway process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.calls = Counter("ultralight_gateway_calls", "Tool calls by outcome", ["outcome"],
                             registry=self.registry)
        self.latency = Histogram("ultralight_gateway_call_seconds", "Tool call latency, end to "
                                 "end at the gateway", buckets=LATENCY_BUCKETS_S,
                                 registry=self.registry)
        self.queue_depth = Gauge("ultralight_queue_depth", "Jobs waiting per queue", ["queue"],
                                 registry=self.registry)
        self.workers = Gauge("ultralight_workers_live", "Workers with a fresh heartbeat",
                             registry=self.registry)
        self.in_flight = Gauge("ultralight_calls_in_flight", "Calls running on workers",
                               registry=self.registry)

    def observe(self, outcome: str, seconds: float) -> None:
        self.calls.labels(outcome).inc()
        self.latency.observe(seconds)

    async def exposition(self, redis: Redis, settings: Settings) -> tuple[bytes, str]:
        status = await farm_status(redis, settings)
        for queue, depth in status["queues"].items():
            self.queue_depth.labels(queue).set(depth)
        self.workers.set(len(status["workers"]))
        self.in_flight.set(status["in_flight"])
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
