"""The gateway's aiohttp application: ``create_app(settings)`` and its start-up and shut-down."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog
from aiohttp import web
from arq.connections import ArqRedis
from redis.exceptions import RedisError

from config import Settings
from gateway import GatewayError, internal, mcp, ops_api, rest
from gateway.calllog import CallLog, open_call_log
from gateway.ops import GatewayMetrics
from gateway.replay import Replays
from gateway.auth import Authenticator, TokenVerifier
from gateway.caches import Invalidations
from gateway.dispatch import Dispatcher
from gateway.gates import Gates
from gateway.grants import GrantStore
from gateway.registry import Registry, open_registry
from gateway.secrets import SecretError, SecretKeys, Secrets
from gateway.sessions import Sessions
from gateway.state import GATEWAY, Catalog, Gateway
from gateway.supabase import JwtConfig, JwtVerifier
from workers.appdata import open_app_data
from workers.blobs import open_blob_store
from workers.process import connect
from workers.sealing import SealingError, farm_keyring
from workers.shadow import shadow_app_id

log = structlog.get_logger(__name__)


@web.middleware
async def no_tracebacks(request: web.Request, handler: Any) -> web.StreamResponse:
    """Whatever breaks, the caller gets a short JSON error and the log gets the details."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except RedisError:
        log.warning("redis_unavailable", path=request.path)
        return rest.problem(503, "unavailable", "the platform's Redis is unavailable; try again "
                            "shortly", {"Retry-After": "1"})
    except GatewayError as exc:
        log.warning("request_failed", path=request.path, error=str(exc))
        return rest.problem(500, "internal", str(exc))
    except Exception:
        log.exception("request_crashed", path=request.path)
        return rest.problem(500, "internal", "the gateway hit an unexpected error; it was logged")


async def healthz(request: web.Request) -> web.Response:
    return rest.ok({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    try:
        await gateway.redis.ping()
    except (RedisError, OSError):
        return rest.problem(503, "unavailable", "Redis does not answer")
    return rest.ok({"status": "ready"})


def create_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[no_tracebacks, rest.api_errors],
                          client_max_size=settings.max_body_bytes)
    app.cleanup_ctx.append(_lifecycle(settings))
    app.add_routes([
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
        *rest.routes(),
        *ops_api.routes(),
        *internal.routes(),
    ])
    for path in ("/mcp/{app}", "/mcp/{app}/"):
        app.router.add_post(path, mcp.post)
        app.router.add_get(path, mcp.get, allow_head=False)
        app.router.add_delete(path, mcp.delete)
    return app


def _lifecycle(settings: Settings) -> Any:
    async def lifecycle(app: web.Application) -> Any:
        registry = open_registry(settings.resolved_database_url)
        await registry.open()
        redis = await connect(settings)
        gateway = app[GATEWAY] = await _assemble(settings, registry, redis)
        await gateway.blobs.check()
        ops = app[ops_api.OPS] = await _operations(settings, redis)
        drainer = asyncio.create_task(ops.calls.drain_forever())
        await gateway.bus.start()
        if gateway.auth.jwts is not None:
            await gateway.auth.jwts.start()
        log.info("gateway_started", host=settings.host, port=settings.port,
                 jwt=gateway.auth.jwts is not None)
        yield
        await ops.calls.flush()
        drainer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drainer
        await ops.store.close()
        await ops.app_data.close()
        await gateway.bus.stop()
        await redis.aclose()
        await registry.close()
        log.info("gateway_stopped")

    return lifecycle


async def _assemble(settings: Settings, registry: Registry, redis: ArqRedis) -> Gateway:
    """Build the gateway's parts; keys that cannot be loaded stop the start-up here."""
    try:
        farm_keys = farm_keyring(settings)
        secret_keys = SecretKeys(settings)
    except (SealingError, SecretError) as exc:
        raise GatewayError(f"cannot load the encryption keys: {exc}") from exc
    bus = Invalidations(redis)
    verifier = TokenVerifier(registry, settings.access_cache_ttl_s, bus)
    jwt_config = JwtConfig.from_settings(settings)
    jwts = JwtVerifier(jwt_config) if jwt_config.enabled else None
    grants = GrantStore(registry)
    return Gateway(
        settings=settings,
        registry=registry,
        redis=redis,
        sessions=Sessions(redis, settings.session_ttl_s),
        dispatcher=Dispatcher(redis, settings.queue_name, settings.max_queue_depth),
        verifier=verifier,
        catalog=Catalog(registry, settings.cache_ttl_s, bus),
        blobs=open_blob_store(settings),
        auth=Authenticator(registry, verifier, jwts, settings.access_cache_ttl_s, bus),
        bus=bus,
        gates=Gates(settings, redis, grants, bus),
        grants=grants,
        secrets=Secrets(registry, secret_keys, bus, settings.access_cache_ttl_s),
        farm_keys=farm_keys,
    )


async def _operations(settings: Settings, redis: ArqRedis) -> ops_api.Ops:
    """The call log, its drainer's store, replays and metrics of this gateway."""
    store = open_call_log(settings.resolved_database_url)
    await store.open()
    app_data = open_app_data(settings.resolved_database_url,
                             max_value_bytes=settings.max_value_bytes,
                             max_query_limit=settings.max_query_limit)
    await app_data.open()

    async def drop_shadow(app_id: str, replay_id: str) -> None:
        await app_data.drop_app(shadow_app_id(app_id, replay_id))
        async for key in redis.scan_iter(f"ultralight:replay:{replay_id}:cloned:*"):
            await redis.delete(key)

    replays = Replays(redis, store, Dispatcher(redis, settings.replay_queue_name),
                      settings.call_timeout_s, drop_shadow)
    calls = CallLog(redis, store, settings.call_log_retention_days * 86_400)
    return ops_api.Ops(calls, store, replays, GatewayMetrics(), app_data)


def serve(settings: Settings) -> None:
    web.run_app(create_app(settings), host=settings.host, port=settings.port, print=None,
                access_log=None, shutdown_timeout=settings.call_timeout_s)
