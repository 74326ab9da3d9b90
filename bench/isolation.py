"""The cost of isolation: a warm sandbox vs one started per call vs no sandbox at all, in each
sandbox mode (zygote, fresh), timed on the pool directly and end to end through the farm
(``ULTRALIGHT_SANDBOX_MODE`` and ``ULTRALIGHT_SANDBOX_WARM=0`` against the default)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from bench import BenchError, mcp_http
from bench.apps import trivial
from bench.farm import REPO, Farm
from bench.latency import in_process
from bench.plan import Plan
from bench.stats import Figure, Progress, summary
from bench.throughput import farm_level, meter_for
from config import Settings
from config.logging import configure_logging
from workers.appdata import DataError
from workers.farm import sandbox_limits
from workers.jail import Isolation, allocate_slots, make_jail, probe, release_slots
from workers.pool import SandboxPool
from workers.sandbox import CallInput
from workers.zygote import SandboxMode, Zygotes, select_mode

REFILL_TIMEOUT_S = 10.0
E2E_CONCURRENCY = 32
# Enough calls for a worker to go through all its slots once (each slot starts its own zygote).
WARM_UP_CALLS = 16


async def no_sdk(op: str, payload: dict[str, Any]) -> Any:
    raise DataError("the benchmark's trivial tool uses no SDK")


async def pool_calls(settings: Settings, mode: SandboxMode, size: int, calls: int,
                     wait_until_full: bool, progress: Progress, label: str) -> list[float]:
    """Sequential acquire + run + retire on a pool of ``size`` (0: every sandbox is started when
    its call comes).

    With ``wait_until_full`` each call starts only once the pool is back to full, which is a
    call's latency when the farm is not busier than its pool; without, calls follow each other
    at once and the pool's refills show. The first calls, which start each slot's zygote, are
    left out."""
    limits = sandbox_limits(settings)
    jail = await asyncio.to_thread(make_jail, settings.sandbox_isolation, settings.sandbox_python,
                                   settings.sandbox_tmp_mb)
    slots = await asyncio.to_thread(
        allocate_slots, size + 2, settings.sandbox_uid_base, limits.memory_mb * 1024 * 1024,
        limits.max_processes, jail.level is Isolation.BWRAP)
    zygotes = (Zygotes(jail, settings.sandbox_zygote_timeout_s)
               if mode is SandboxMode.ZYGOTE else None)
    pool = SandboxPool(limits, size, jail, slots, zygotes)
    source = await asyncio.to_thread(Path(trivial.__file__).read_text, encoding="utf-8")
    skipped = len(slots) + 1
    times: list[float] = []
    try:
        pool.fill()
        for number in range(skipped + calls):
            if wait_until_full:
                await _full(pool)
            call = CallInput(source=source, function="add", args={"a": number, "b": 1},
                             filename="trivial.py")
            started = time.perf_counter()
            sandbox = await pool.acquire()
            try:
                result = await sandbox.run(call, 10.0, no_sdk)
            finally:
                await pool.retire(sandbox)
            elapsed = (time.perf_counter() - started) * 1000
            if not result.ok or result.value != number + 1:
                raise BenchError(f"a sandboxed call failed: {result.outcome} {result.error}")
            if number >= skipped:
                times.append(elapsed)
                progress.update(len(times) / calls, f"{label} {len(times)}/{calls}")
        await _full(pool)  # so closing it stops no sandbox half started
    finally:
        await pool.close()
        await asyncio.to_thread(release_slots, slots)
    return times


async def _full(pool: SandboxPool) -> None:
    """Wait until the pool is back to its size; a start that failed is tried again, as the
    farm's next call would."""
    deadline = time.monotonic() + REFILL_TIMEOUT_S
    while pool.warm < pool.size:
        if time.monotonic() > deadline:
            raise BenchError(f"the pool did not refill within {REFILL_TIMEOUT_S:g} s "
                             f"({pool.warm} of {pool.size} ready)")
        pool.fill()
        await asyncio.sleep(0.001)


def chosen_mode() -> str:
    """The mode a worker would run in here: the worker's own check, in a process of its own
    (it runs an event loop of its own and leaves asyncio warnings behind)."""
    settings = Settings.from_env()
    configure_logging(dataclasses.replace(settings, log_level="ERROR", log_format="console"))
    jail = make_jail(settings.sandbox_isolation, settings.sandbox_python, settings.sandbox_tmp_mb)
    limits = sandbox_limits(settings)
    slots = allocate_slots(1, settings.sandbox_uid_base, limits.memory_mb * 1024 * 1024,
                           limits.max_processes, jail.level is Isolation.BWRAP)
    try:
        probe(jail, slots[0])
        return str(select_mode(SandboxMode.ZYGOTE.value, jail, slots[0],
                               settings.sandbox_zygote_timeout_s))
    finally:
        release_slots(slots)


async def available_modes() -> tuple[list[SandboxMode], str]:
    """Fresh always; zygote where the worker's own check says it works on this host."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.isolation", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=REPO)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise BenchError(f"the sandbox check failed: {err.decode(errors='replace')[-500:]}")
    if out.decode().strip() == SandboxMode.ZYGOTE.value:
        return [SandboxMode.FRESH, SandboxMode.ZYGOTE], ""
    return [SandboxMode.FRESH], "zygote sandboxes do not work on this host"


async def direct(plan: Plan, progress: Progress) -> dict[str, Any]:
    """The pool on its own, in this process, with the farm's sandbox settings, in each mode."""
    settings = Settings.from_env()
    warm_size = max(1, settings.sandbox_warm)
    modes, unavailable = await available_modes()
    found: dict[str, Any] = {}
    failed: dict[str, str] = {}
    for mode in modes:
        try:
            found[mode.value] = {
                "warm_ms": summary(await pool_calls(
                    settings, mode, warm_size, plan.isolation_calls, True, progress,
                    f"{mode}, warm")),
                "back_to_back_ms": summary(await pool_calls(
                    settings, mode, warm_size, plan.isolation_calls, False, progress,
                    f"{mode}, warm, back to back")),
                "cold_ms": summary(await pool_calls(
                    settings, mode, 0, plan.isolation_calls, False, progress,
                    f"{mode}, pool of 0")),
            }
        except BenchError as exc:
            # One mode failing on this host must not hide the other's figures.
            failed[mode.value] = str(exc)
    if not found:
        raise BenchError(f"no sandbox mode worked: {failed}")
    return {
        "isolation": settings.sandbox_isolation,
        "default_mode": settings.sandbox_mode,
        "warm_pool_size": warm_size,
        "modes": found,
        "failed_modes": failed,
        "zygote_unavailable": unavailable or None,
        "in_process_ms": summary(in_process(plan.in_process_calls)),
        "method": "workers.pool.SandboxPool in the benchmark's own process: acquire + run + "
                  "retire of the trivial tool, one call at a time",
    }


def variants(settings: Settings) -> list[tuple[str, dict[str, str]]]:
    """The default first, then without a warm pool, then the same in the other sandbox mode."""
    default = settings.sandbox_mode
    modes = [default] + [m.value for m in SandboxMode if m.value != default]
    found = []
    for mode in modes:
        for warm in (settings.sandbox_warm, 0):
            overrides = {} if mode == default else {"sandbox_mode": mode}
            if warm != settings.sandbox_warm:
                overrides["sandbox_warm"] = str(warm)
            label = f"{mode}, {warm} warm" + (" (default)" if not overrides else "")
            found.append((label, overrides))
    return found


def worker_mode(log: Path) -> str | None:
    """The sandbox mode a worker chose, from its start-up log line."""
    for line in log.read_text(errors="replace").splitlines():
        if '"sandbox_isolation"' in line:
            with contextlib.suppress(ValueError):
                return str(orjson.loads(line).get("mode"))
    return None


async def end_to_end(farm: Farm, plan: Plan, progress: Progress) -> dict[str, Any]:
    """One worker process per variant: sequential bare POSTs, then a closed loop."""
    results: dict[str, Any] = {}
    chosen = variants(Settings.from_env(farm.env))[:plan.isolation_variants]
    for index, (name, overrides) in enumerate(chosen):
        progress.update(index / len(chosen), f"farm: {name}")
        farm.scale(1, **overrides)
        async with mcp_http.http_client(farm.token, connections=1) as http:
            caller = mcp_http.StatelessCaller(http, farm.gateway_url, "trivial", "add")
            found = await mcp_http.sequential(caller, plan.isolation_e2e_calls, WARM_UP_CALLS)
        load = await farm_level(farm, E2E_CONCURRENCY, plan.level_s, meter_for(farm))
        results[name] = {
            "settings": {f"ULTRALIGHT_{k.upper()}": v for k, v in overrides.items()},
            "mode_in_use": worker_mode(farm.workers[0].log),
            "sequential_ms": summary(found.client_ms),
            "worker_ms": summary([t.worker_ms for t in found.answered
                                  if t.worker_ms is not None]),
            "errors": found.errors, "first_error": found.first_error,
            f"concurrency_{E2E_CONCURRENCY}": load.as_json(),
        }
    farm.scale(1)
    return results


def pool_figures(pool: dict[str, Any]) -> list[Figure]:
    modes = pool["modes"]
    default = pool["default_mode"] if pool["default_mode"] in modes else next(iter(modes))
    warm = modes[default]["warm_ms"]["p50"]
    label = f"pool, {default}, {pool['warm_pool_size']} warm: acquire + run + retire p50"
    rows = []
    if "fresh" in modes:
        rows.append(Figure("isolation", label, warm, "ms", "fresh sandbox started per call p50",
                           modes["fresh"]["cold_ms"]["p50"], client="workers.pool"))
    rows.append(Figure("isolation", label, warm, "ms", "no sandbox (in-process call) p50",
                       pool["in_process_ms"]["p50"], client="workers.pool"))
    for mode, found in modes.items():
        rows.append(Figure("isolation", f"pool, {mode}, calls back to back p50",
                           found["back_to_back_ms"]["p50"], "ms",
                           "the same with time to refill p50", found["warm_ms"]["p50"],
                           client="workers.pool"))
    if "zygote" in modes and "fresh" in modes:
        for kind, what in (("warm_ms", "warm"), ("cold_ms", "pool of 0")):
            rows.append(Figure("isolation", f"pool, zygote, {what} p50",
                               modes["zygote"][kind]["p50"], "ms", f"fresh, {what} p50",
                               modes["fresh"][kind]["p50"], client="workers.pool"))
    for mode, error in pool.get("failed_modes", {}).items():
        rows.append(Figure("isolation", f"pool, {mode}", None, "ms",
                           note=f"failed: {error}"))
    return rows


def farm_figures(e2e: dict[str, Any]) -> list[Figure]:
    rows: list[Figure] = []
    default_name = next((name for name in e2e if name.endswith("(default)")), None)
    if default_name is None:
        return rows
    default = e2e[default_name]
    key = f"concurrency_{E2E_CONCURRENCY}"
    default_label = _ran(default_name, default)
    for name, result in e2e.items():
        if name == default_name:
            continue
        failed = result["errors"] + default["errors"]
        name = _ran(name, result)
        rows.append(Figure("isolation", f"farm p50, {name}", result["sequential_ms"]["p50"], "ms",
                           f"farm p50, {default_label}", default["sequential_ms"]["p50"],
                           client=mcp_http.CLIENT_NAME,
                           note=f"{failed} calls failed" if failed else ""))
        rows.append(Figure("isolation", f"farm calls/s, concurrency {E2E_CONCURRENCY}, {name}",
                           result[key]["calls_per_s"], "calls/s", f"the same, {default_label}",
                           default[key]["calls_per_s"], client=mcp_http.CLIENT_NAME))
    return rows



def _ran(name: str, result: dict[str, Any]) -> str:
    """The variant's name, saying so when the worker fell back to another sandbox mode."""
    requested = name.split(",")[0]
    used = result.get("mode_in_use")
    return f"{name} [fell back to {used}]" if used and used != requested else name


if __name__ == "__main__":
    print(chosen_mode())
