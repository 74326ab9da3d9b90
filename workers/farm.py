"""One worker process: an arq worker woken on enqueue, running each call in a sandbox."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog
from arq import Worker
from arq.connections import ArqRedis
from arq.worker import func
from redis.exceptions import RedisError

from config import Settings
from workers.appdata import AppData, DataError, Scope, open_app_data
from workers.blobs import BlobError, CodeCache, open_blob_store
from workers.jobs import (
    REPLY_TTL_S,
    RUN_CALL,
    wake_channel,
    CallJob,
    CallReply,
    claim_key,
    deserialize_job,
    reply_key,
    serialize_job,
    worker_key,
)
from workers.jail import Isolation, Slot, allocate_slots, make_jail, probe, release_slots
from workers.metrics import WorkerMetrics
from workers.outbound import CallHttp, Outbound, OutboundPolicy
from workers.pool import SandboxPool
from workers import sealing
from workers.ai import AiClient
from workers.nested import NestedCaller
from workers.datacache import MISSING, CacheView, DataCache, version_key
from workers.shadow import ShadowScopes
from workers.sandbox import CallInput, Limits, SandboxError

log = structlog.get_logger(__name__)

# Time kept back from the caller's deadline so a stopped sandbox's answer still reaches it.
REPLY_MARGIN_S = 0.3


def sandbox_limits(settings: Settings) -> Limits:
    return Limits(
        cpu_s=settings.sandbox_cpu_s,
        memory_mb=settings.sandbox_memory_mb,
        max_files=settings.sandbox_max_files,
        max_file_mb=settings.sandbox_max_file_mb,
        max_processes=settings.sandbox_max_processes,
        max_output_bytes=settings.sandbox_max_output_bytes,
        max_result_bytes=settings.max_result_bytes,
    )


class Farm:
    """What a worker process holds: Redis, app data, the code cache and warm sandboxes."""

    def __init__(self, settings: Settings, redis: ArqRedis) -> None:
        self.settings = settings
        self.redis = redis
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.data = open_app_data(settings.resolved_database_url,
                                  max_value_bytes=settings.max_value_bytes,
                                  max_query_limit=settings.max_query_limit)
        self.blobs = open_blob_store(settings)
        self.code = CodeCache(self.blobs)
        self.shadows = ShadowScopes(self.data, redis)
        self.cache = DataCache()
        self.limits = sandbox_limits(settings)
        self.outbound = Outbound(OutboundPolicy.from_settings(settings))
        self.ai = AiClient(settings)
        self.nested = NestedCaller(settings, sealing.farm_keyring(settings))
        self.pool: SandboxPool | None = None
        self.slots: list[Slot] = []
        self.running = 0
        self.metrics = WorkerMetrics()
        self._heartbeat: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.pool = await asyncio.to_thread(self._build_pool)
        await self.data.open()
        await self.blobs.check()
        await self.outbound.open()
        await self.ai.open()
        await self.nested.open()
        self.pool.fill()
        await self._beat()
        self._heartbeat = asyncio.create_task(self._heartbeat_loop())
        if self.settings.worker_metrics_port:
            self.metrics.serve(self.settings.metrics_host, self.settings.worker_metrics_port)
        log.info("worker_started", worker_id=self.worker_id, warm=self.settings.sandbox_warm,
                 concurrency=self.settings.worker_concurrency)

    def _build_pool(self) -> SandboxPool:
        """Check the isolation works here and take this process's sandbox slots."""
        from workers.zygote import SandboxMode, Zygotes, select_mode

        settings = self.settings
        jail = make_jail(settings.sandbox_isolation, settings.sandbox_python,
                         settings.sandbox_tmp_mb)
        self.slots = allocate_slots(
            settings.worker_concurrency + settings.replay_concurrency + settings.sandbox_warm + 1,
            settings.sandbox_uid_base,
            self.limits.memory_mb * 1024 * 1024, self.limits.max_processes,
            use_uids=jail.level is Isolation.BWRAP)
        probe(jail, self.slots[0])
        first = self.slots[0]
        mode = select_mode(settings.sandbox_mode, jail, first, settings.sandbox_zygote_timeout_s)
        log.info("sandbox_isolation", isolation=str(jail.level), mode=str(mode),
                 python=jail.python, slot_uids=first.uid is not None,
                 cgroup=f"v{first.cgroup.version}" if first.cgroup else "none",
                 slots=len(self.slots))
        if jail.level is Isolation.PROCESS:
            log.warning("weak_isolation", detail="sandboxes are plain processes without "
                        "namespaces; use only for development")
        elif first.uid is None and first.cgroup is None:
            log.warning("shared_limits", detail="sandboxes share the worker's uid and no cgroup "
                        "is writable: process limits apply per user, not per call")
        zygotes = (Zygotes(jail, settings.sandbox_zygote_timeout_s)
                   if mode is SandboxMode.ZYGOTE else None)
        return SandboxPool(self.limits, settings.sandbox_warm, jail, self.slots, zygotes)

    async def stop(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        with contextlib.suppress(RedisError):
            await self.redis.delete(worker_key(self.worker_id))
        if self.pool is not None:
            await self.pool.close()
        await asyncio.to_thread(release_slots, self.slots)
        await self.outbound.close()
        await self.ai.close()
        await self.nested.close()
        await self.data.close()
        log.info("worker_stopped", worker_id=self.worker_id)

    async def _beat(self) -> None:
        self.metrics.running.set(self.running)
        self.metrics.warm.set(self.pool.warm if self.pool else 0)
        info = orjson.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "running": self.running, "cache_hits": self.cache.hits,
                             "cache_misses": self.cache.misses,
                             "warm": self.pool.warm if self.pool else 0, "at": time.time()})
        ttl_ms = int(self.settings.worker_heartbeat_ttl_s * 1000)
        await self.redis.set(worker_key(self.worker_id), info, px=ttl_ms)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.worker_heartbeat_s)
            try:
                await self._beat()
            except RedisError as exc:
                log.warning("heartbeat_failed", worker_id=self.worker_id, error=str(exc))

    async def execute(self, job: CallJob) -> None:
        """Run one call at most once and push its reply, whatever happens to the sandbox."""
        bound = log.bind(request_id=job.call_id, app_id=job.app_id, app=job.app_name,
                         version=job.version, function=job.function)
        remaining = job.deadline - time.time() - REPLY_MARGIN_S
        if remaining <= 0:
            bound.info("call", outcome="abandoned", elapsed_ms=0.0)
            return
        scope = Scope(job.app_id, str(job.user["id"]) if job.user else "")
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(claim_key(job.call_id), self.worker_id, nx=True,
                     ex=int(remaining) + REPLY_TTL_S)
            pipe.get(version_key(scope))
            claimed, seen = await pipe.execute()
        if not claimed:
            # Another worker took this call and died: running it again could repeat its writes.
            reply = CallReply("lost", error="the worker running this call stopped; the call was "
                              "not run again", worker_id=self.worker_id)
            await asyncio.shield(self._reply(job, reply))
            bound.warning("call", outcome="lost", elapsed_ms=0.0)
            return
        self.running += 1
        view = self.cache.view(scope, int(seen or 0)) if job.shadow is None else None
        try:
            reply = await self._run(job, remaining, view)
            if view is not None and view.wrote:
                await asyncio.shield(self._bump(scope, int(seen or 0)))
        except asyncio.CancelledError:
            # The worker is stopping past the drain time: the caller hears it now, not at its
            # deadline.
            stopped = CallReply("lost", error="the worker stopped before the call finished",
                                worker_id=self.worker_id)
            await asyncio.shield(self._reply(job, stopped))
            raise
        finally:
            self.running -= 1
        await asyncio.shield(self._reply(job, reply))
        self.metrics.calls.labels(reply.outcome).inc()
        self.metrics.run_seconds.observe(reply.elapsed_ms / 1000)
        level = bound.info if reply.outcome in {"ok", "app_error"} else bound.warning
        level("call", outcome=reply.outcome, elapsed_ms=round(reply.elapsed_ms, 2),
              worker_id=self.worker_id)

    async def _bump(self, scope: Scope, seen: int) -> None:
        """Tell every worker this space changed, before the caller can call again."""
        bumped = await self.redis.incr(version_key(scope))
        self.cache.settle(scope, seen, int(bumped))

    async def _run(self, job: CallJob, remaining: float, view: CacheView | None) -> CallReply:
        started = time.perf_counter()
        assert self.pool is not None
        try:
            opened = sealing.SealedPayload()
            if job.sealed is not None:
                user_id = str(job.user["id"]) if job.user else None
                opened = sealing.open_sealed(sealing.farm_keyring(self.settings), job.sealed,
                                             sealing.job_aad(job.call_id, job.app_id, user_id))
            source = await self.code.source(job.code_hash)
            sandbox = await self.pool.acquire()
        except (BlobError, SandboxError, sealing.SealingError) as exc:
            return CallReply("platform_error", error=str(exc), worker_id=self.worker_id,
                             elapsed_ms=(time.perf_counter() - started) * 1000)
        # The sandbox reads env vars and the caller's secrets; BYOK keys stay in this process.
        call = CallInput(source=source, function=job.function, args=job.args, user=job.user,
                         env={**job.env, **opened.sandbox_env()}, filename=f"{job.app_name}.py")
        scope = Scope(job.app_id, str(job.user["id"]) if job.user else "")
        resolve = self.shadows.resolver(scope, job.shadow)
        try:
            http = self.outbound.for_call(request_id=job.call_id, app_id=job.app_id)
            with sealing.PROVIDER_KEYS.holding(job.call_id, opened.byok):
                services = CallServices(job, self.ai, self.nested)
                handler = SdkHandler(self.data, resolve, http, view, services)
                result = await sandbox.run(call, remaining, handler)
        finally:
            await self.pool.retire(sandbox)
        return CallReply(str(result.outcome), value=result.value, error=result.error,
                         logs=result.logs, elapsed_ms=(time.perf_counter() - started) * 1000,
                         worker_id=self.worker_id, ai_usage=services.usage)

    async def _reply(self, job: CallJob, reply: CallReply) -> None:
        key = reply_key(job.call_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.rpush(key, reply.encode())
            pipe.expire(key, REPLY_TTL_S)
            await pipe.execute()


@dataclasses.dataclass
class CallServices:
    """What a call's SDK requests may use beyond data and HTTP: ai() and call()."""

    job: CallJob
    ai: AiClient
    nested: NestedCaller
    usage: list[dict[str, Any]] = dataclasses.field(default_factory=list)


class SdkHandler:
    """Serves a sandbox's SDK requests: data in its (app, caller) scope, and outbound HTTP.

    The scope is resolved on the first data request: a replayed call's shadow space is only
    prepared when the call touches data.
    """

    def __init__(self, data: AppData, resolve: Callable[[], Awaitable[Scope]],
                 http: CallHttp, cache: CacheView | None = None,
                 services: CallServices | None = None) -> None:
        self.data = data
        self.resolve = resolve
        self.http = http
        self.cache = cache
        self.services = services

    async def __call__(self, op: str, payload: dict[str, Any]) -> Any:
        method = getattr(self, f"op_{op}", None)
        if method is None:
            raise DataError(f"unknown SDK operation {op!r}")
        try:
            return await method(**payload)
        except TypeError as exc:
            raise DataError(f"{op}: {exc}") from None

    async def op_store(self, key: str, value: Any) -> None:
        await self.data.store(await self.resolve(), key, value)
        if self.cache is not None:
            self.cache.written({key: value})

    async def op_load(self, key: str) -> Any:
        if self.cache is not None and isinstance(key, str):
            cached = self.cache.get(key)
            if cached is not MISSING:
                return cached
        value = await self.data.load(await self.resolve(), key)
        if self.cache is not None:
            self.cache.put(key, value)
        return value

    async def op_remove(self, key: str) -> bool:
        existed = await self.data.remove(await self.resolve(), key)
        if self.cache is not None:
            self.cache.removed([key])
        return existed

    async def op_keys(self, prefix: str = "") -> list[str]:
        return await self.data.keys(await self.resolve(), prefix)

    async def op_query(self, prefix: str = "", where: dict[str, Any] | None = None,
                       order_by: str | None = None, limit: int | None = None,
                       offset: int = 0) -> list[dict[str, Any]]:
        return await self.data.query(await self.resolve(), prefix, where, order_by, limit, offset)

    async def op_store_many(self, items: dict[str, Any]) -> None:
        await self.data.store_many(await self.resolve(), items)
        if self.cache is not None:
            self.cache.written(items)

    async def op_load_many(self, keys: list[str]) -> dict[str, Any]:
        if self.cache is None or not isinstance(keys, list):
            return await self.data.load_many(await self.resolve(), keys)
        found: dict[str, Any] = {}
        wanted = []
        for key in keys:
            cached = self.cache.get(key) if isinstance(key, str) else MISSING
            if cached is MISSING:
                wanted.append(key)
            elif cached is not None:
                found[key] = cached
        if wanted:
            loaded = await self.data.load_many(await self.resolve(), wanted)
            for key in wanted:
                self.cache.put(key, loaded.get(key))
            found.update(loaded)
        return {key: found[key] for key in keys if key in found}

    async def op_remove_many(self, keys: list[str]) -> int:
        removed = await self.data.remove_many(await self.resolve(), keys)
        if self.cache is not None:
            self.cache.removed(list(keys))
        return removed

    async def op_ai(self, messages: Any, model: str | None = None,
                    max_tokens: int | None = None, temperature: float | None = None
                    ) -> dict[str, Any]:
        if self.services is None:
            raise DataError("ai is not available here")
        job = self.services.job
        if job.shadow is not None:
            raise DataError("ai: completions are not made during replays (they would spend "
                            "the original caller's provider key)")
        completion = await self.services.ai.complete(
            messages, model, lambda provider: sealing.PROVIDER_KEYS.get(job.call_id, provider),
            max_tokens=max_tokens, temperature=temperature)
        self.services.usage.append({k: v for k, v in completion.public().items()
                                    if k != "content"})
        return completion.public()

    async def op_call(self, app: str, function: str, args: dict[str, Any] | None = None) -> Any:
        if self.services is None:
            raise DataError("call is not available here")
        return await self.services.nested.call(self.services.job, app, function, args or {})

    async def op_http(self, method: str, url: str, headers: dict[str, str] | None = None,
                      body: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        if not isinstance(url, str) or not isinstance(method, str):
            raise DataError("http: method and url must be strings")
        try:
            payload = base64.b64decode(body, validate=True) if body is not None else None
        except (binascii.Error, TypeError):
            raise DataError("http: the request body is not valid base64") from None
        if headers is not None and not (isinstance(headers, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in headers.items())):
            raise DataError("http: headers must map strings to strings")
        if timeout is not None and not isinstance(timeout, (int, float)):
            raise DataError("http: timeout must be a number of seconds")
        result = await self.http.request(method, url, headers=headers, body=payload,
                                         timeout_s=timeout)
        return {"status": result.status, "headers": result.headers, "url": result.url,
                "body": base64.b64encode(result.body).decode("ascii")}


async def run_call(ctx: dict[str, Any], job: dict[str, Any]) -> None:
    farm: Farm = ctx["farm"]
    await farm.execute(CallJob.from_wire(job))


class WakingWorker(Worker):
    """An arq worker that looks at its queue when a gateway publishes a wake-up, not on a tick.

    arq polls every ``poll_delay`` (0.5 s by default); here the poll is only a safety net and a
    pub/sub message on ``WAKE_CHANNEL`` (or a finished job freeing a slot) starts the next look.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._wake = asyncio.Event()

    async def main(self) -> None:
        self.ctx["redis"] = self.pool
        if self.on_startup:
            await self.on_startup(self.ctx)
        listener = asyncio.create_task(self._listen())
        try:
            while True:
                self._wake.clear()
                await self._poll_iteration()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_delay_s)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        self._wake.set()

    async def _listen(self) -> None:
        while True:
            pubsub = self.pool.pubsub()
            try:
                await pubsub.subscribe(wake_channel(self.queue_name))
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._wake.set()
            except RedisError as exc:
                log.warning("wake_listener_lost", error=str(exc))
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(RedisError):
                    await pubsub.aclose()


def build_worker(settings: Settings, redis: ArqRedis, farm: Farm, queue_name: str,
                 max_jobs: int) -> WakingWorker:
    """An arq worker on one queue; the farm is started and stopped by the caller."""
    return WakingWorker(
        functions=[func(run_call, name=RUN_CALL, max_tries=1, keep_result=0,
                        timeout=settings.max_call_timeout_s + 5)],
        redis_pool=redis,
        queue_name=queue_name,
        max_jobs=max_jobs,
        poll_delay=settings.worker_poll_s,
        job_serializer=serialize_job,
        job_deserializer=deserialize_job,
        keep_result=0,
        ctx={"farm": farm},
        handle_signals=False,
        job_completion_wait=int(settings.max_call_timeout_s) + 1,
    )
