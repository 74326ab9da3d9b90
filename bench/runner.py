"""Runs every measurement in one go, against one farm on loopback, and writes the results.

Each measurement module has ``measure(...) -> (raw, figures)``: ``raw`` goes to the JSON file
under its section, ``figures`` (each with its comparison from the same run) to the table. A
section that fails is reported as such and the others still run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import gc
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis as redis_sync

from bench import (
    BenchError,
    arq_baseline,
    isolation,
    latency,
    overhead,
    query,
    replay,
    report,
    throughput,
)
from bench.farm import APPS, Farm, start_farm, stop_process
from bench.plan import PLANS, Plan
from bench.stats import Figure, Progress
from config import Settings
from config.logging import configure_logging

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
SECTIONS = ("latency", "throughput", "isolation", "gates", "query", "replay")
ARQ_QUEUE = "bench:arq-default"
SETTLE_S = 1.0


# Rough seconds each step takes in the quick plan, for the progress bar.
WEIGHTS: dict[str, float] = {
    "farm": 5, "idle CPU": 4, "latency": 10, "gates": 5, "throughput": 30, "replay": 2,
    "isolation (farm)": 25, "isolation (pool)": 8, "query": 3, "report": 1,
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller samples (under two minutes)")
    size.add_argument("--tiny", action="store_true",
                      help="very small samples, only to check the benchmark runs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"folder for the results (default {DEFAULT_OUT})")
    parser.add_argument("--keep", action="store_true",
                        help="keep the farm's folder (logs, database) after the run")
    return parser.parse_args(argv)


def run(argv: list[str] | None = None) -> int:
    args = parse(argv)
    plan = PLANS["tiny" if args.tiny else "quick" if args.quick else "full"]
    args.out.mkdir(parents=True, exist_ok=True)
    # The benchmark's own process logs only what goes wrong (the farm logs to its own files).
    configure_logging(Settings(log_level="WARNING", log_format="console"))
    busy = busy_machine()
    if busy:
        print(f"warning: {busy}", file=sys.stderr)
    progress = Progress(WEIGHTS)
    bench = Bench(plan, progress, args.keep)
    started = time.monotonic()
    try:
        asyncio.run(bench.run())
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"\nbench: {exc}", file=sys.stderr)
        return 1
    with progress.step("report"):
        bench.figures.sort(key=lambda figure: SECTIONS.index(figure.section))
        results = bench.results(time.monotonic() - started)
        results["warnings"] = [w for w in (busy, busy_machine()) if w]
        stem = args.out / plan.mode
        skipped = report.chart(results, stem.with_suffix(".png"))
        results["chart"] = None if skipped else str(stem.with_suffix(".png"))
        results["chart_skipped"] = skipped
        report.write_json(results, stem.with_suffix(".json"))
        table = report.text_table(bench.figures)
        stem.with_suffix(".txt").write_text(table + "\n")
        stem.with_suffix(".md").write_text(report.markdown(results, bench.figures))
    progress.finish()
    print(table)
    print(f"\nmachine: {report.machine_line(results['machine'])}")
    print(f"results: {stem.with_suffix('.json')}"
          + (f", chart: {results['chart']}" if results["chart"] else f" (no chart: {skipped})"))
    for section, error in bench.errors.items():
        print(f"FAILED {section}: {error}", file=sys.stderr)
    return 1 if bench.errors else 0


class Bench:
    """One run: the farm and the arq baseline it starts, and what each section found."""

    def __init__(self, plan: Plan, progress: Progress, keep: bool) -> None:
        self.plan = plan
        self.progress = progress
        self.keep = keep
        self.sections: dict[str, Any] = {name: {} for name in SECTIONS}
        self.figures: list[Figure] = []
        self.errors: dict[str, str] = {}
        self.machine = report.machine()
        self.started_at = _now()

    async def section(self, name: str, step: str,
                      work: Callable[[], Awaitable[tuple[dict[str, Any], list[Figure]]]]) -> None:
        with self.progress.step(step):
            try:
                raw, figures = await work()
            except Exception as exc:  # one broken measurement must not hide the others
                traceback.print_exc(file=sys.stderr)
                self.errors[step] = f"{type(exc).__name__}: {exc}"
                self.sections[name].setdefault("errors", {})[step] = self.errors[step]
                self.figures.append(Figure(name, step, None, "", note=f"failed: {exc}"))
                return
        self.sections[name].update(raw)
        self.figures.extend(figures)

    async def run(self) -> None:
        farm: Farm | None = None
        arq_worker: subprocess.Popen[bytes] | None = None
        try:
            with self.progress.step("farm"):
                farm = start_farm(workers=1)
                arq_worker = arq_baseline.start_worker(farm.redis, ARQ_QUEUE,
                                                       str(farm.log_dir / "arq.log"))
                version = farm.deploy("trivial", APPS / "trivial.py")
                _wait_for_arq(farm, arq_worker)
            await self._on_farm(farm, arq_worker, version)
        finally:
            if arq_worker is not None:
                stop_process(arq_worker)
            if farm is not None:
                farm.stop()
                if self.keep or self.errors:
                    print(f"\nthe farm's folder (logs, database) is kept: {farm.root}",
                          file=sys.stderr)
                else:
                    farm.cleanup()
        await self.section("isolation", "isolation (pool)", self._pool)
        await self.section("query", "query", lambda: query.measure(self.plan, self.progress))
        # Sandbox transports left for the garbage collector are closed while the loop still runs.
        gc.collect()

    async def _on_farm(self, farm: Farm, arq_worker: subprocess.Popen[bytes], version: str
                       ) -> None:
        plan, progress = self.plan, self.progress
        await self.section("throughput", "idle CPU", lambda: self._idle(farm, arq_worker))
        await self.section("latency", "latency", lambda: latency.measure(
            farm.gateway_url, farm.token, farm.redis.url, ARQ_QUEUE, plan, progress))
        await self.section("gates", "gates", lambda: self._gates(farm))
        await self.section("throughput", "throughput", lambda: throughput.measure(
            farm, ARQ_QUEUE, plan, progress))
        await self.section("replay", "replay", lambda: replay.measure(
            farm, version, self._live_rate(replay.CONCURRENCY), plan, progress))
        await self.section("isolation", "isolation (farm)", lambda: self._isolation_farm(farm))

    async def _idle(self, farm: Farm, arq_worker: subprocess.Popen[bytes]
                    ) -> tuple[dict[str, Any], list[Figure]]:
        await asyncio.sleep(SETTLE_S)
        assert farm.gateway is not None
        pids = {"farm worker": farm.workers[0].pid, "arq default worker": arq_worker.pid,
                "gateway": farm.gateway.pid, "redis-server": farm.redis.proc.pid}
        idle = await asyncio.to_thread(throughput.idle_cpu, pids, self.plan.idle_s)
        return ({"idle_cpu_pct_of_a_core": idle, "idle_s": self.plan.idle_s},
                [throughput.idle_figure(idle)])

    async def _gates(self, farm: Farm) -> tuple[dict[str, Any], list[Figure]]:
        raw, figures = await overhead.measure(farm, self.plan, self.progress)
        raw["on_vs_off"], more = await overhead.gates_on_vs_off(farm, self.plan, self.progress)
        return raw, figures + more

    def _live_rate(self, concurrency: int) -> float | None:
        farm_levels = self.sections["throughput"].get("farm") or {}
        best = farm_levels.get(str(max(self.plan.worker_counts))) or []
        return next((level["calls_per_s"] for level in best
                     if level["concurrency"] == concurrency), None)

    async def _isolation_farm(self, farm: Farm) -> tuple[dict[str, Any], list[Figure]]:
        e2e = await isolation.end_to_end(farm, self.plan, self.progress)
        return {"farm": e2e}, isolation.farm_figures(e2e)

    async def _pool(self) -> tuple[dict[str, Any], list[Figure]]:
        pool = await isolation.direct(self.plan, self.progress)
        return {"pool": pool}, isolation.pool_figures(pool)

    def results(self, elapsed_s: float) -> dict[str, Any]:
        return {
            "benchmark": "ultralight", "mode": self.plan.mode, "started_at": self.started_at,
            "finished_at": _now(), "elapsed_s": round(elapsed_s, 1),
            "machine": {**self.machine, "load_average_at_end": [
                round(x, 2) for x in os.getloadavg()]},
            "plan": dataclasses.asdict(self.plan), "sections": self.sections,
            "figures": [figure.as_json() for figure in self.figures], "errors": self.errors,
        }


def busy_machine() -> str:
    """A warning when something else keeps the cores busy: every figure then reads high."""
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    if load <= cores / 2:
        return ""
    return (f"the machine is busy (load average {load:.1f} on {cores} cores) at "
            f"{_now()}: absolute figures will read high; ratios hold better")


def _wait_for_arq(farm: Farm, worker: subprocess.Popen[bytes]) -> None:
    """arq writes its health-check key on its first poll."""
    client = redis_sync.Redis.from_url(farm.redis.url)
    try:
        deadline = time.monotonic() + 30
        while not client.exists(f"{ARQ_QUEUE}:health-check"):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"the arq baseline worker did not start (see {farm.log_dir})")
            time.sleep(0.05)
    finally:
        client.close()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
