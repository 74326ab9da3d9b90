"""Shadow spaces for replays: a replayed call writes to its own copy, never to live data.

The first time a replay touches a caller's data, that caller's live rows are copied into the
replay's shadow space in one statement (timestamps kept, so orderings match); from then on every
read and write of that replay goes to the copy. Reads therefore see live data as it was when the
replay first needed it, plus the replay's own writes. The gateway drops the space at the end.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from workers.appdata import AppData, Scope, StoreError

CLONE_WAIT_S = 30.0
FLAG_TTL_S = 86_400


def shadow_app_id(app_id: str, replay_id: str) -> str:
    return f"{app_id}@{replay_id}"


class ShadowScopes:
    def __init__(self, data: AppData, redis: Redis) -> None:
        self.data = data
        self.redis = redis

    def resolver(self, live: Scope, replay_id: str | None) -> Callable[[], Awaitable[Scope]]:
        """A coroutine factory giving the scope a call's data requests should use."""
        resolved: list[Scope] = []

        async def resolve() -> Scope:
            if replay_id is None:
                return live
            if not resolved:
                resolved.append(await self.prepare(live, replay_id))
            return resolved[0]

        return resolve

    async def prepare(self, live: Scope, replay_id: str) -> Scope:
        """The shadow scope, copied from live data once per replay and caller, across workers."""
        shadow = Scope(shadow_app_id(live.app_id, replay_id), live.user_id)
        flag = f"ultralight:replay:{replay_id}:cloned:{live.app_id}:{live.user_id}"
        if await self.redis.set(flag, b"copying", nx=True, ex=FLAG_TTL_S):
            try:
                await self.data.clone_scope(live, shadow)
            except BaseException:
                await self.redis.delete(flag)
                raise
            await self.redis.set(flag, b"done", ex=FLAG_TTL_S)
            return shadow
        deadline = time.monotonic() + CLONE_WAIT_S
        while await self.redis.get(flag) != b"done":
            if time.monotonic() > deadline:
                raise StoreError("the replay's copy of the caller's data was not ready in time")
            await asyncio.sleep(0.01)
        return shadow
