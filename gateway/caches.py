"""Per-gateway caches that every gateway empties at once through a Redis pub/sub channel.

A change (a revoked token, a new grant, a secret set) is published on ``INVALIDATE_CHANNEL``;
each gateway drops the matching entries within milliseconds. A TTL is the backstop, and while the
subscription is down nothing is cached at all, so a missed message can never keep a stale answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import orjson
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

log = structlog.get_logger(__name__)

INVALIDATE_CHANNEL = "ultralight:invalidate"
RECONNECT_DELAY_S = 0.5

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclasses.dataclass(frozen=True)
class Invalidation:
    """What changed: ``kind`` is token, app, access, secrets or user; ``key`` an id in it."""

    kind: str
    key: str


Listener = Callable[[Invalidation | None], None]


class Invalidations:
    """Publishes invalidations and applies everyone's (its own included) to local caches.

    A listener receives an ``Invalidation``, or None meaning "forget everything" (sent when the
    subscription is (re)established, since messages may have been missed in between).
    """

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.connected = False
        self._listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def start(self, wait_s: float = 2.0) -> None:
        self._task = asyncio.create_task(self._run())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), wait_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def publish(self, kind: str, key: str) -> None:
        """Apply locally at once, then tell every other gateway."""
        event = Invalidation(kind, key)
        self._apply(event)
        try:
            await self.redis.publish(INVALIDATE_CHANNEL, orjson.dumps(dataclasses.asdict(event)))
        except (RedisError, OSError) as exc:
            # Other gateways then rely on their TTL; they also stop caching once they notice.
            log.warning("invalidation_not_published", kind=kind, error=str(exc))

    def _apply(self, event: Invalidation | None) -> None:
        for listener in self._listeners:
            listener(event)

    async def _run(self) -> None:
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(INVALIDATE_CHANNEL)
                self._apply(None)
                self.connected = True
                self._ready.set()
                log.debug("invalidations_subscribed")
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._apply(_decode(message["data"]))
            except (RedisError, OSError) as exc:
                if self.connected:
                    log.warning("invalidations_lost", error=str(exc))
            finally:
                self.connected = False
                self._apply(None)
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(RECONNECT_DELAY_S)


def _decode(raw: bytes) -> Invalidation | None:
    try:
        data = orjson.loads(raw)
        return Invalidation(str(data["kind"]), str(data["key"]))
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None


class TtlCache(Generic[K, V]):
    """A bounded map whose entries expire, guarded against storing what a concurrent
    invalidation already made stale (loads record the generation they started in)."""

    def __init__(self, ttl_s: float, bus: Invalidations | None = None,
                 max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.bus = bus
        self.max_entries = max_entries
        self.generation = 0
        self._entries: dict[K, tuple[float, V]] = {}

    def get(self, key: K) -> V | None:
        found = self._entries.get(key)
        if found is None:
            return None
        if found[0] <= time.monotonic():
            self._entries.pop(key, None)
            return None
        return found[1]

    def put(self, key: K, value: V, generation: int, ttl_s: float | None = None) -> None:
        """Keep ``value`` unless something was invalidated since ``generation`` was read."""
        if generation != self.generation or (self.bus is not None and not self.bus.connected):
            return
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[key] = (time.monotonic() + (self.ttl_s if ttl_s is None else ttl_s), value)

    def drop(self, matches: Callable[[K, V], bool]) -> None:
        self.generation += 1
        for key in [k for k, (_, v) in self._entries.items() if matches(k, v)]:
            del self._entries[key]

    def clear(self) -> None:
        self.generation += 1
        self._entries.clear()
