"""MCP sessions kept in Redis, so any gateway serves any session; idle ones expire."""

from __future__ import annotations

import dataclasses
import secrets

import orjson
from redis.asyncio import Redis


def session_key(session_id: str) -> str:
    return f"ultralight:session:{session_id}"


@dataclasses.dataclass(frozen=True)
class Session:
    id: str
    app_id: str
    protocol_version: str
    user_id: str | None


class Sessions:
    def __init__(self, redis: Redis, ttl_s: int) -> None:
        self.redis = redis
        self.ttl_s = ttl_s

    async def create(self, app_id: str, protocol_version: str, user_id: str | None,
                     client_info: object) -> Session:
        session = Session(secrets.token_hex(16), app_id, protocol_version, user_id)
        value = orjson.dumps({"app_id": app_id, "protocol_version": protocol_version,
                              "user_id": user_id, "client": client_info})
        await self.redis.set(session_key(session.id), value, ex=self.ttl_s)
        return session

    async def get(self, session_id: str) -> Session | None:
        """The session, its idle timer restarted; None when unknown or expired."""
        if not (8 <= len(session_id) <= 128) or not session_id.isascii():
            return None
        raw = await self.redis.getex(session_key(session_id), ex=self.ttl_s)
        if raw is None:
            return None
        data = orjson.loads(raw)
        return Session(session_id, data["app_id"], data["protocol_version"], data.get("user_id"))

    async def delete(self, session_id: str) -> bool:
        return bool(await self.redis.delete(session_key(session_id)))
