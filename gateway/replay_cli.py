"""``ultralight replay``: run logged calls against a version and report what changed."""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson

from gateway.client import GatewayClient
from gateway.ops import percentile
from gateway.replay import compare

KINDS = ("same", "different", "newly_failing", "newly_passing", "skipped")


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, width: int = 30) -> None:
        self.total, self.width, self.done = total, width, 0
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()

    def step(self) -> None:
        self.done += 1
        if self.tty or self.done == self.total:
            filled = int(self.width * self.done / max(1, self.total))
            rate = self.done / max(1e-9, time.monotonic() - self.started)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] "
                             f"{self.done}/{self.total}  {rate:.0f} calls/s")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def run_replay(client: GatewayClient, app: str, version: str, selection: dict[str, Any],
               concurrency: int) -> dict[str, Any]:
    """Start the replay, run every selected call, drop the shadow data, build the report."""
    started = client.api("POST", f"/api/apps/{quote(app, safe='')}/replays",
                         {"version": version, **selection})
    replay_id, calls = started["replay_id"], started["calls"]
    progress = Progress(len(calls))
    results: dict[str, dict[str, Any]] = {}
    began = time.monotonic()

    def run_caller(mine: list[dict[str, Any]]) -> None:
        # One caller's calls run in their logged order: later calls may read earlier writes.
        for call in mine:
            results[call["request_id"]] = client.api(
                "POST", f"/api/replays/{replay_id}/calls", {"request_id": call["request_id"]})
            progress.step()

    by_caller: dict[str | None, list[dict[str, Any]]] = {}
    for call in calls:
        by_caller.setdefault(call["user_id"], []).append(call)
    try:
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            for future in as_completed([pool.submit(run_caller, mine)
                                        for mine in by_caller.values()]):
                future.result()
    finally:
        client.api("DELETE", f"/api/replays/{replay_id}")
    elapsed = time.monotonic() - began
    return build_report(app, started["version"], calls, results, elapsed)


def build_report(app: str, version: str, calls: list[dict[str, Any]],
                 results: dict[str, dict[str, Any]], elapsed_s: float) -> dict[str, Any]:
    counts = dict.fromkeys(KINDS, 0)
    differences = []
    for call in calls:
        new = results[call["request_id"]]
        kind = "skipped" if new["outcome"] == "skipped" else compare(call, new)
        counts[kind] += 1
        if kind in ("different", "newly_failing", "newly_passing"):
            differences.append({
                "kind": kind, "request_id": call["request_id"], "function": call["function"],
                "args": call["args"],
                "old": {"outcome": call["outcome"], "result": call["result"],
                        "error": call["error"]},
                "new": {"outcome": new["outcome"], "result": new["result"],
                        "error": new["error"]},
            })
    old_ms = sorted(c["duration_ms"] for c in calls)
    new_ms = sorted(r["duration_ms"] for r in results.values() if r["outcome"] != "skipped")
    return {
        "app": app, "version": version, "calls": len(calls), "counts": counts,
        "regressed": counts["different"] + counts["newly_failing"] > 0,
        "elapsed_s": round(elapsed_s, 3),
        "calls_per_s": round(len(calls) / elapsed_s, 1) if elapsed_s else None,
        "latency_ms": {"old": _percentiles(old_ms), "new": _percentiles(new_ms)},
        "differences": differences,
    }


def _percentiles(values: list[float]) -> dict[str, float | None]:
    return {name: percentile(values, q) for name, q in (("p50", .5), ("p90", .9), ("p99", .99))}


def summary(report: dict[str, Any]) -> str:
    counts = report["counts"]
    lines = [f"replayed {report['calls']} calls of {report['app']} against version "
             f"{report['version']} in {report['elapsed_s']} s",
             "  " + ", ".join(f"{counts[k]} {k.replace('_', ' ')}" for k in KINDS)]
    old, new = report["latency_ms"]["old"], report["latency_ms"]["new"]
    if new["p50"] is not None and old["p50"] is not None:
        lines.append(f"  latency p50 {old['p50']:.1f} → {new['p50']:.1f} ms, p99 "
                     f"{old['p99']:.1f} → {new['p99']:.1f} ms")
    for diff in report["differences"][:20]:
        lines.append(f"  {diff['kind']}: {diff['function']}({_short(diff['args'])})")
        lines.append(f"      was {diff['old']['outcome']}: "
                     f"{_short(diff['old']['result'] or diff['old']['error'])}")
        lines.append(f"      now {diff['new']['outcome']}: "
                     f"{_short(diff['new']['result'] or diff['new']['error'])}")
    if len(report["differences"]) > 20:
        lines.append(f"  … {len(report['differences']) - 20} more in the JSON report")
    lines.append("REGRESSED" if report["regressed"] else "no regressions")
    return "\n".join(lines)


def _short(value: Any, width: int = 100) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return text if len(text) <= width else text[:width - 1] + "…"


def write_report(report: dict[str, Any], path: Path) -> None:
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
