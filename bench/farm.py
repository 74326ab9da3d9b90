"""A farm on loopback for the benchmarks: a real redis-server, a gateway and worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import BenchError
from gateway.client import GatewayClient
from workers.jail import descendants

REPO = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "apps"
STOP_GRACE_S = 10.0
START_TIMEOUT_S = 30.0
# Limits stay on (every call is still counted in Redis) but high enough never to refuse a call.
UNLIMITED = "1000000000"
COUNTED_NOT_LIMITING = {
    "ULTRALIGHT_RATE_LIMIT_CALL_PER_MIN": UNLIMITED,
    "ULTRALIGHT_RATE_LIMIT_LIST_PER_MIN": UNLIMITED,
    "ULTRALIGHT_RATE_LIMIT_INITIALIZE_PER_MIN": UNLIMITED,
    "ULTRALIGHT_WEEKLY_QUOTAS": f"anonymous:{UNLIMITED},free:{UNLIMITED},pro:{UNLIMITED}",
}


class FarmError(BenchError):
    """A process of the benchmark farm did not start or stopped on its own."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


def wait_until(check: Callable[[], bool], timeout_s: float, what: str,
               proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise FarmError(f"{what}: the process exited with status {proc.returncode}")
        time.sleep(0.05)
    raise FarmError(f"{what} within {timeout_s:g} s")


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = STOP_GRACE_S) -> None:
    """Terminate, wait, then kill."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclasses.dataclass
class Redis:
    url: str
    port: int
    proc: subprocess.Popen[bytes]


def start_redis(directory: Path) -> Redis:
    binary = shutil.which("redis-server")
    if binary is None:
        raise FarmError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
    )
    wait_until(lambda: port_open(port), 10, "redis-server did not listen", proc)
    return Redis(f"redis://127.0.0.1:{port}/0", port, proc)


@dataclasses.dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str]

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclasses.dataclass
class Farm:
    """One gateway and any number of worker processes on one Redis and one data folder."""

    root: Path
    redis: Redis
    env: dict[str, str]
    token: str = ""
    gateway_url: str = ""
    gateway: subprocess.Popen[bytes] | None = None
    workers: list[Worker] = dataclasses.field(default_factory=list)
    started: int = 0

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    def client(self, token: str | None = None) -> GatewayClient:
        return GatewayClient(self.gateway_url, token or self.token, timeout_s=60)

    def start_gateway(self) -> None:
        port = free_port()
        log = (self.log_dir / "gateway.log").open("ab")
        self.gateway = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--port", str(port)],
            env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.gateway_url = f"http://127.0.0.1:{port}"
        wait_until(lambda: port_open(port), START_TIMEOUT_S, "the gateway did not listen",
                   self.gateway)

    def add_worker(self, **settings: str) -> Worker:
        """Start one worker process (``settings`` as ULTRALIGHT_* overrides) and wait for it."""
        env = {**self.env, **{f"ULTRALIGHT_{k.upper()}": v for k, v in settings.items()}}
        log = self.log_dir / f"worker{self.started}.log"
        self.started += 1
        with log.open("ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "gateway", "worker"], env=env,
                                    stdout=out, stderr=subprocess.STDOUT)
        worker = Worker(proc, log, env)
        self.workers.append(worker)
        wait_until(lambda: b'"worker_started"' in log.read_bytes(), START_TIMEOUT_S,
                   f"worker {proc.pid} did not start (see {log})", proc)
        return worker

    def stop_workers(self) -> None:
        self.scale(0)

    def scale(self, count: int, **settings: str) -> None:
        """Exactly ``count`` worker processes; when ``settings`` differ from the running ones',
        every worker is replaced."""
        wanted = {**self.env, **{f"ULTRALIGHT_{k.upper()}": v for k, v in settings.items()}}
        if any(worker.env != wanted for worker in self.workers):
            while self.workers:
                stop_process(self.workers.pop().proc)
        while len(self.workers) > count:
            stop_process(self.workers.pop().proc)
        while len(self.workers) < count:
            self.add_worker(**settings)

    def issue_token(self, email: str) -> str:
        """A new API token, written to the database directly (as ``ultralight token create``);
        runs in a thread of its own, so it works inside or outside an event loop."""
        with ThreadPoolExecutor(max_workers=1) as thread:
            return thread.submit(asyncio.run, _issue_token(self.env, email)).result()

    def deploy(self, name: str, path: Path) -> str:
        result = self.client().api("POST", f"/api/apps/{name}/versions",
                                   {"source": path.read_text(), "manifest": None})
        return str(result["version"])

    def stop(self) -> None:
        self.stop_workers()
        if self.gateway is not None:
            stop_process(self.gateway)
        stop_process(self.redis.proc)

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


async def _issue_token(env: dict[str, str], email: str) -> str:
    from config import Settings
    from gateway.auth import issue_token
    from gateway.registry import open_registry

    settings = Settings.from_env(env)
    registry = open_registry(settings.resolved_database_url)
    await registry.open()
    try:
        return (await issue_token(registry, email, "bench")).token
    finally:
        await registry.close()


def start_farm(workers: int = 1, settings: dict[str, str] | None = None) -> Farm:
    """Redis, a gateway and ``workers`` worker processes, all on 127.0.0.1, in a fresh folder."""
    root = Path(tempfile.mkdtemp(prefix="ultralight-bench-"))
    (root / "logs").mkdir()
    (root / "redis").mkdir()
    redis = start_redis(root / "redis")
    env: dict[str, Any] = {
        **os.environ,
        "ULTRALIGHT_DATA_DIR": str(root / "data"),
        "ULTRALIGHT_REDIS_URL": redis.url,
        "ULTRALIGHT_QUEUE_NAME": f"ultralight:bench:{root.name}",
        "ULTRALIGHT_REPLAY_QUEUE_NAME": f"ultralight:bench-replay:{root.name}",
        "ULTRALIGHT_LOG_FORMAT": "json",
        "ULTRALIGHT_HOST": "127.0.0.1",
        "PYTHONPATH": str(REPO),
        **COUNTED_NOT_LIMITING,
        **(settings or {}),
    }
    farm = Farm(root, redis, env)
    try:
        farm.token = farm.issue_token("owner@bench.test")
        farm.start_gateway()
        for _ in range(workers):
            farm.add_worker()
    except BaseException:
        farm.stop()
        raise
    return farm


def cpu_seconds(pid: int, children: bool = False) -> float:
    """utime + stime of one process from /proc/<pid>/stat; with ``children``, plus the times of
    the children it has reaped (where a used sandbox's CPU ends up)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU used by named process trees between ``start`` and ``stop``, as % of one core.

    A tree's total counts each live process with the children it has reaped, so the calls that
    ran and ended in between (sandboxes forked by a zygote, or started by the worker) count too.
    Processes named in ``alone`` count without what runs below them (the benchmark's own process
    is the parent of the whole farm).
    """

    def __init__(self, pids: dict[str, list[int]], alone: frozenset[str] = frozenset()) -> None:
        self.pids = pids
        self.alone = alone
        self._before: dict[str, float] = {}
        self._started = 0.0

    def _total(self, name: str) -> float:
        if name in self.alone:
            return sum(cpu_seconds(pid) for pid in self.pids[name])
        return sum(cpu_seconds(pid, children=True) for root in self.pids[name]
                   for pid in descendants(root))

    def _read(self) -> dict[str, float]:
        return {name: self._total(name) for name in self.pids}

    def start(self) -> None:
        self._before = self._read()
        self._started = time.monotonic()

    def stop(self) -> dict[str, float]:
        elapsed = max(1e-9, time.monotonic() - self._started)
        after = self._read()
        return {name: round((after[name] - self._before[name]) / elapsed * 100, 1)
                for name in self.pids}
