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
from urllib.parse import urlsplit

import structlog
from arq import Worker
from arq.connections import ArqRedis, RedisSettings, create_pool
from redis.exceptions import RedisError

from config import Settings
from config.logging import configure_logging
from workers import WorkerError
from workers.farm import Farm, build_worker
from workers.jail import JailError
from workers.jobs import deserialize_job, serialize_job

log = structlog.get_logger(__name__)

RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)
# A worker that exits with this code is misconfigured: restarting it would not help.
EXIT_CONFIG = 78
PR_SET_CHILD_SUBREAPER = 36


async def connect(settings: Settings) -> ArqRedis:
    """An arq Redis pool with the farm's JSON serializer: one URL, or a master through Sentinel."""
    redis_settings = redis_settings_from(settings)
    try:
        return await create_pool(
            redis_settings,
            job_serializer=serialize_job,
            job_deserializer=deserialize_job,
            default_queue_name=settings.queue_name,
            retry=2,
        )
    except (RedisError, OSError) as exc:
        reason = _without_password(str(exc), redis_settings.password)
        raise WorkerError(f"cannot reach Redis at {redis_location(settings)}: {reason}") from exc


def redis_settings_from(settings: Settings) -> RedisSettings:
    """arq's connection settings: redis:// or rediss:// (TLS), optionally through Sentinel."""
    try:
        redis = RedisSettings.from_dsn(settings.redis_url)
    except (RuntimeError, ValueError) as exc:
        raise WorkerError(
            "ULTRALIGHT_REDIS_URL must be redis://[:PASSWORD@]HOST[:PORT][/DB], rediss://… for "
            "TLS, or unix://PATH"
        ) from exc
    _apply_tls(redis, settings)
    if settings.redis_sentinels:
        if settings.redis_tls_ca_file or settings.redis_tls_insecure:
            # arq hands Sentinel connections `ssl` alone, so these would be silently ignored.
            raise WorkerError(
                "ULTRALIGHT_REDIS_TLS_CA_FILE and ULTRALIGHT_REDIS_TLS_INSECURE do not work with "
                "ULTRALIGHT_REDIS_SENTINELS; with Sentinel, rediss:// trusts the system's CAs"
            )
        redis.host = sentinel_addresses(settings.redis_sentinels)
        redis.sentinel = True
        redis.sentinel_master = settings.redis_sentinel_master
    return redis


def _apply_tls(redis: RedisSettings, settings: Settings) -> None:
    ca_file, insecure = settings.redis_tls_ca_file, settings.redis_tls_insecure
    if not redis.ssl:
        if ca_file or insecure:
            raise WorkerError(
                "ULTRALIGHT_REDIS_TLS_CA_FILE and ULTRALIGHT_REDIS_TLS_INSECURE need a rediss:// "
                "ULTRALIGHT_REDIS_URL"
            )
        return
    if ca_file and not os.path.isfile(ca_file):
        raise WorkerError(f"ULTRALIGHT_REDIS_TLS_CA_FILE={ca_file!r} is not a file")
    redis.ssl_ca_certs = ca_file or None
    redis.ssl_cert_reqs = "none" if insecure else "required"
    redis.ssl_check_hostname = not insecure
    if insecure:
        log.warning("redis_tls_insecure", detail="the Redis server's certificate is not checked")


def sentinel_addresses(raw: str) -> list[tuple[str, int]]:
    """Parse "host:port,host:port" (IPv6 hosts in brackets) into (host, port) pairs."""
    addresses = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        host, _, port = item.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise WorkerError(
                f"ULTRALIGHT_REDIS_SENTINELS holds {item!r}; give host:port pairs, comma-separated"
            )
        addresses.append((host, int(port)))
    if not addresses:
        raise WorkerError("ULTRALIGHT_REDIS_SENTINELS holds no host:port pair")
    return addresses


def redis_location(settings: Settings) -> str:
    """Where Redis is, for messages and logs: never the password."""
    if settings.redis_sentinels:
        sentinels = settings.redis_sentinels.replace(" ", "")
        return f"master {settings.redis_sentinel_master!r} via sentinels {sentinels}"
    try:
        parts = urlsplit(settings.redis_url)
        port = parts.port
    except ValueError:
        return "(an unreadable ULTRALIGHT_REDIS_URL)"
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    return f"{parts.scheme}://{parts.hostname or 'localhost'}:{port or 6379}{parts.path}"


def _without_password(text: str, password: str | None) -> str:
    return text.replace(password, "***") if password else text


async def run_one(settings: Settings) -> None:
    """One worker process: a live queue and a replay queue sharing one farm.

    SIGTERM or SIGINT stops both from taking jobs, lets running calls finish up to their
    deadline, then stops what is left.
    """
    redis = await connect(settings)
    farm = Farm(settings, redis)
    await farm.start()
    workers = [
        build_worker(settings, redis, farm, settings.queue_name, settings.worker_concurrency),
        build_worker(settings, redis, farm, settings.replay_queue_name,
                     settings.replay_concurrency),
    ]
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _drain, workers, signum)
    try:
        await asyncio.gather(*(w.async_run() for w in workers), return_exceptions=True)
    finally:
        for worker in workers:
            worker._pool = None  # the shared Redis pool is closed once, below
        await farm.stop()
        await redis.aclose()


def _drain(workers: list[Worker], signum: int) -> None:
    log.info("worker_draining", signal=signal.Signals(signum).name,
             running=sum(len(w.tasks) for w in workers))
    for worker in workers:
        worker.handle_sig_wait_for_completion(signal.Signals(signum))


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

    base_port = int(os.environ.get("ULTRALIGHT_WORKER_METRICS_PORT", "0") or 0)

    def spawn(slot: int) -> None:
        env = dict(os.environ)
        if base_port:
            env["ULTRALIGHT_WORKER_METRICS_PORT"] = str(base_port + slot)
        children[slot] = subprocess.Popen([sys.executable, "-m", "workers"], env=env)
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
