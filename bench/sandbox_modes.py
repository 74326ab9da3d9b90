"""Per-call latency and calls/s of fresh bubblewrap sandboxes against zygote-forked ones.

Runs a trivial tool directly against the sandbox pool (no gateway, no Redis), first one call at a
time, then with several in flight, in both modes, and prints them side by side. Needs root (a uid
per slot), bubblewrap and writable cgroups, like a production worker:

    sudo unshare --pid --fork --mount-proc .venv/bin/python bench/sandbox_modes.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workers.jail import Slot, allocate_slots, make_jail, release_slots
from workers.pool import SandboxPool
from workers.sandbox import CallInput, Limits
from workers.zygote import Zygotes, probe

APP = '''
def echo(x: int) -> int:
    return x
'''


@dataclasses.dataclass
class Report:
    mode: str
    sequential_ms: list[float]
    concurrent_ms: list[float]
    calls_per_s: float
    cpu_ms_per_call: float
    worker_cpu_ms_per_call: float
    failures: int


class CpuMeter:
    """CPU time of this process and everything it starts, sandboxes included.

    A cgroup v1 cpuacct group of our own counts every descendant however it is reaped (the slot
    cgroups are memory and pids only, so sandboxes stay in it); elsewhere, the machine's busy time
    stands in, which counts other load too.
    """

    def __init__(self) -> None:
        self.group: Path | None = None
        root = Path("/sys/fs/cgroup/cpuacct")
        if (root / "cpuacct.usage").exists():
            group = root / f"ultralight-bench-{os.getpid()}"
            try:
                group.mkdir(exist_ok=True)
                (group / "cgroup.procs").write_text(str(os.getpid()))
                self.group = group
            except OSError:
                self.group = None

    def seconds(self) -> float:
        if self.group is not None:
            return int((self.group / "cpuacct.usage").read_text()) / 1e9
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        if self.group is not None:
            parent = self.group.parent / "cgroup.procs"
            for pid in (self.group / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    parent.write_text(pid)
            with contextlib.suppress(OSError):
                self.group.rmdir()


METER: CpuMeter | None = None


async def one_call(pool: SandboxPool, x: int) -> tuple[float, bool]:
    started = time.perf_counter()
    sandbox = await pool.acquire()
    try:
        result = await sandbox.run(CallInput(APP, "echo", {"x": x}), 10, _no_sdk)
    finally:
        await pool.retire(sandbox)
    return (time.perf_counter() - started) * 1000, result.ok and result.value == x


async def _no_sdk(op: str, payload: dict[str, Any]) -> Any:
    raise AssertionError(op)


async def warm_up(pool: SandboxPool) -> None:
    pool.fill()
    deadline = time.monotonic() + 30
    while pool.warm < pool.size and time.monotonic() < deadline:  # noqa: ASYNC110 - no event
        await asyncio.sleep(0.01)


async def measure(mode: str, slots: list[Slot], args: argparse.Namespace) -> Report:
    jail = make_jail("bwrap", "", 16)
    zygotes = Zygotes(jail) if mode == "zygote" else None
    pool = SandboxPool(Limits(), args.warm, jail, slots, zygotes)
    failures = 0
    try:
        await warm_up(pool)
        for x in range(args.warmup):  # every slot's zygote started, caches hot
            await one_call(pool, x)
        sequential = []
        for x in range(args.calls):
            elapsed, ok = await one_call(pool, x)
            sequential.append(elapsed)
            failures += not ok
            await asyncio.sleep(args.gap_ms / 1000)  # one call at a time, pool refilled between
        await warm_up(pool)
        concurrent: list[float] = []
        counter = iter(range(args.burst))
        assert METER is not None
        cpu_before, started = METER.seconds(), time.perf_counter()
        worker_before = time.process_time()

        async def client() -> None:
            nonlocal failures
            for x in counter:
                elapsed, ok = await one_call(pool, x)
                concurrent.append(elapsed)
                failures += not ok

        await asyncio.gather(*(client() for _ in range(args.in_flight)))
        wall = time.perf_counter() - started
        cpu = METER.seconds() - cpu_before
        worker = time.process_time() - worker_before
    finally:
        await pool.close()
    return Report(mode, sequential, concurrent, len(concurrent) / wall,
                  cpu * 1000 / len(concurrent), worker * 1000 / len(concurrent), failures)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def show(reports: list[Report], args: argparse.Namespace) -> None:
    rows = [
        ("one at a time: p50 ms", lambda r: statistics.median(r.sequential_ms)),
        ("one at a time: p99 ms", lambda r: percentile(r.sequential_ms, 0.99)),
        (f"{args.in_flight} in flight: p50 ms", lambda r: statistics.median(r.concurrent_ms)),
        (f"{args.in_flight} in flight: p99 ms", lambda r: percentile(r.concurrent_ms, 0.99)),
        (f"{args.in_flight} in flight: calls/s", lambda r: r.calls_per_s),
        ("CPU ms per call, all procs", lambda r: r.cpu_ms_per_call),
        ("  of which the worker", lambda r: r.worker_cpu_ms_per_call),
        ("calls/s 2 cores could do", lambda r: 2000 / r.cpu_ms_per_call),
        ("failed calls", lambda r: r.failures),
    ]
    print(f"\n{os.cpu_count()} cores; {args.calls} sequential calls, then {args.burst} calls "
          f"{args.in_flight} at a time; warm pool of {args.warm}\n")
    print(f"{'':28}" + "".join(f"{r.mode:>12}" for r in reports))
    for label, get in rows:
        print(f"{label:28}" + "".join(f"{get(r):>12.1f}" for r in reports))


async def main(args: argparse.Namespace) -> None:
    global METER
    if os.geteuid() != 0:
        sys.exit("run as root: each sandbox slot needs a uid of its own")
    METER = CpuMeter()
    slots = allocate_slots(args.in_flight + args.warm + 1, 640_000, 512 * 1024 * 1024, 32,
                           use_uids=True)
    try:
        if "zygote" in args.modes:
            await asyncio.to_thread(probe, make_jail("bwrap", "", 16), slots[0])
        reports = [await measure(mode, slots, args) for mode in args.modes]
    finally:
        release_slots(slots)
        METER.close()
    show(reports, args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", default=["fresh", "zygote"])
    parser.add_argument("--calls", type=int, default=300, help="sequential calls")
    parser.add_argument("--gap-ms", type=float, default=5.0, help="pause between sequential calls")
    parser.add_argument("--burst", type=int, default=2000, help="calls in the concurrent run")
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--warm", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=20)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    asyncio.run(main(parser.parse_args()))
