"""Run one worker process, or supervise several: ``ultralight worker [--processes N]``."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time

import structlog
from arq.connections import ArqRedis, RedisSettings, create_pool
from redis.exceptions import RedisError

from config import Settings
from config.logging import configure_logging
from workers import WorkerError
from workers.farm import build_worker
from workers.jail import JailError
from workers.jobs import deserialize_job, serialize_job

log = structlog.get_logger(__name__)

RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)
# A worker that exits with this code is misconfigured: restarting it would not help.
EXIT_CONFIG = 78
PR_SET_CHILD_SUBREAPER = 36


async def connect(settings: Settings) -> ArqRedis:
    """An arq Redis pool with the farm's JSON serializer."""
    try:
        return await create_pool(
            RedisSettings.from_dsn(settings.redis_url),
            job_serializer=serialize_job,
            job_deserializer=deserialize_job,
            default_queue_name=settings.queue_name,
            retry=2,
        )
    except (RedisError, OSError) as exc:
        raise WorkerError(f"cannot reach Redis at {settings.redis_url}: {exc}") from exc


async def run_one(settings: Settings) -> None:
    redis = await connect(settings)
    worker = build_worker(settings, redis)
    try:
        await worker.async_run()
    except asyncio.CancelledError:
        pass
    finally:
        await worker.close()


def become_subreaper() -> None:
    """Orphans of our children (sandbox leftovers) get reparented here, where we reap them."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def supervise(processes: int, grace_s: float) -> int:
    """Keep ``processes`` worker processes alive; on SIGTERM or SIGINT stop them by steps."""
    become_subreaper()
    children: dict[int, subprocess.Popen[bytes]] = {}
    failures = 0
    stopping = False

    def spawn(slot: int) -> None:
        children[slot] = subprocess.Popen([sys.executable, "-m", "workers"])
        log.info("worker_process_started", slot=slot, pid=children[slot].pid)

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for slot in range(processes):
        spawn(slot)
    while not stopping:
        time.sleep(0.2)
        for slot, child in list(children.items()):
            code = child.poll()
            if code is None or stopping:
                continue
            if code == EXIT_CONFIG:
                log.error("worker_misconfigured", slot=slot, detail="not restarting; see the "
                          "worker's error above")
                _stop_children(list(children.values()), grace_s)
                return EXIT_CONFIG
            delay = RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)]
            log.warning("worker_process_died", slot=slot, pid=child.pid, code=code,
                        restart_in_s=delay)
            failures += 1
            time.sleep(delay)
            spawn(slot)
        _reap_orphans()
    return _stop_children(list(children.values()), grace_s)


def _reap_orphans() -> None:
    """Reap reparented leftovers. A worker reaped here reads as exited on its next poll."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _stop_children(children: list[subprocess.Popen[bytes]], grace_s: float) -> int:
    log.info("workers_stopping", count=len(children), grace_s=grace_s)
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            child.terminate()
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("worker_process_killed", pid=child.pid)
            child.kill()
            child.wait()
    log.info("workers_stopped")
    return 0


def main() -> None:
    settings = Settings.from_env()
    configure_logging(settings)
    try:
        asyncio.run(run_one(settings))
    except JailError as exc:
        log.error("worker_failed", error=str(exc))
        sys.exit(EXIT_CONFIG)
    except WorkerError as exc:
        log.error("worker_failed", error=str(exc))
        sys.exit(1)
    except KeyboardInterrupt:
        pass
