"""Replaying logged calls against another version, on the replay queue, with shadowed writes.

The gateway selects the calls and runs each one it is asked to; the command line drives the run
(concurrency, progress, comparison and report). Writes made by replayed calls land in a shadow
space named after the replay; reads fall through to live data; the shadow is dropped at the end.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from redis.asyncio import Redis

from gateway import GatewayError
from gateway.calllog import CallLogStore, CallRecord, digest
from gateway.dispatch import Dispatcher, DispatchError
from gateway.registry import AppRecord, VersionRecord
from workers.jobs import CallJob

STATE_TTL_S = 86_400
MAX_SELECTED = 100_000


class ReplayError(GatewayError):
    """A replay cannot start or go on; the message says why."""


def state_key(replay_id: str) -> str:
    return f"ultralight:replay:{replay_id}"


@dataclasses.dataclass(frozen=True)
class ReplayState:
    replay_id: str
    app_id: str
    app_name: str
    version: str
    code_hash: str
    owner_id: str


@dataclasses.dataclass(frozen=True)
class Selection:
    function: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = 1000


def replay_call_id(state: ReplayState, record: CallRecord) -> str:
    return f"{state.replay_id}-{record.request_id}"


class Replays:
    def __init__(self, redis: Redis, calls: CallLogStore, dispatcher: Dispatcher,
                 timeout_s: float, drop_shadow: Callable[[str, str], Awaitable[None]]) -> None:
        self.redis = redis
        self.calls = calls
        self.dispatcher = dispatcher
        self.timeout_s = timeout_s
        self.drop_shadow = drop_shadow

    async def start(self, app: AppRecord, version: VersionRecord, selection: Selection
                    ) -> tuple[ReplayState, list[CallRecord]]:
        if not 1 <= selection.limit <= MAX_SELECTED:
            raise ReplayError(f"limit must be between 1 and {MAX_SELECTED}")
        records = await self.calls.query(app.id, function=selection.function,
                                          since=selection.since, until=selection.until,
                                          limit=selection.limit)
        state = ReplayState(f"rpl_{secrets.token_hex(8)}", app.id, app.name, version.version,
                            version.code_hash, app.owner_id)
        await self.redis.set(state_key(state.replay_id),
                             orjson.dumps(dataclasses.asdict(state)), ex=STATE_TTL_S)
        return state, list(reversed(records))

    async def state(self, replay_id: str) -> ReplayState:
        raw = await self.redis.get(state_key(replay_id))
        if raw is None:
            raise ReplayError(f"no replay {replay_id!r} (it may have finished or expired)")
        return ReplayState(**orjson.loads(raw))

    async def run_one(self, state: ReplayState, record: CallRecord,
                      user: dict[str, Any] | None, sealed: str | None = None
                      ) -> dict[str, Any]:
        """Run one logged call against the replay's version; its outcome and result digest."""
        if record.args_truncated:
            return {"request_id": record.request_id, "outcome": "skipped",
                    "error": "its arguments were too large to log in full", "duration_ms": 0}
        job = CallJob(
            call_id=replay_call_id(state, record),
            app_id=state.app_id, app_name=state.app_name, version=state.version,
            code_hash=state.code_hash, function=record.function,
            args=orjson.loads(record.args), deadline=time.time() + self.timeout_s,
            user=user, sealed=sealed, shadow=state.replay_id,
        )
        started = time.perf_counter()
        try:
            reply = await self.dispatcher.call(job)
            outcome, value, error = reply.outcome, reply.value, reply.error
        except DispatchError as exc:
            outcome, value, error = exc.outcome, None, str(exc)
        return {
            "request_id": record.request_id,
            "outcome": outcome,
            "result": value if outcome == "ok" else None,
            "result_digest": digest(value) if outcome == "ok" else None,
            "error": error,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
        }

    async def finish(self, state: ReplayState) -> None:
        """Drop everything the replay wrote, then forget it."""
        await self.drop_shadow(state.app_id, state.replay_id)
        await self.redis.delete(state_key(state.replay_id))


def compare(old: dict[str, Any], new: dict[str, Any]) -> str:
    """same, different, newly_failing or newly_passing."""
    was_ok, is_ok = old["outcome"] == "ok", new["outcome"] == "ok"
    if was_ok and is_ok:
        return "same" if old["result_digest"] == new["result_digest"] else "different"
    if was_ok:
        return "newly_failing"
    if is_ok:
        return "newly_passing"
    return "same" if old.get("error") == new.get("error") else "different"
