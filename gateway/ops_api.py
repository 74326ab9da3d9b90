"""HTTP endpoints for operating the farm: call logs, replays, status and metrics."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import orjson
from aiohttp import web

from gateway.calllog import CallLog, CallLogStore, CallRecord
from gateway.ops import GatewayMetrics, farm_status
from gateway.calls import MissingSecrets, seal_call
from gateway.replay import Replays, ReplayError, ReplayState, Selection, replay_call_id
from workers.appdata import AppData
from gateway.rest import ApiFailure, json_body, ok, owned_app, owner, problem


@dataclasses.dataclass
class Ops:
    calls: CallLog
    store: CallLogStore
    replays: Replays
    metrics: GatewayMetrics
    app_data: AppData


OPS = web.AppKey("ops", Ops)


def _number(request: web.Request, name: str) -> float | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        raise ApiFailure(problem(400, "bad_request", f"{name} must be a Unix time in "
                                 "seconds")) from None


async def list_calls(request: web.Request) -> web.Response:
    """GET /api/apps/{app}/calls?function=&since=&until=&outcome=&limit="""
    gateway, user = await owner(request)
    app = await owned_app(gateway, user, request.match_info["app"])
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        return problem(400, "bad_request", "limit must be a whole number")
    if not 1 <= limit <= 10_000:
        return problem(400, "bad_request", "limit must be between 1 and 10000")
    records = await request.app[OPS].store.query(
        app.id, function=request.query.get("function"), since=_number(request, "since"),
        until=_number(request, "until"), outcome=request.query.get("outcome"), limit=limit)
    return ok({"app": app.name, "calls": [r.public() for r in records]})


async def start_replay(request: web.Request) -> web.Response:
    """POST /api/apps/{app}/replays {version, function?, since?, until?, limit?}"""
    gateway, user = await owner(request)
    app = await owned_app(gateway, user, request.match_info["app"])
    body = await json_body(request)
    wanted = body.get("version")
    if not isinstance(wanted, str) or not wanted:
        return problem(400, "bad_request", "'version' must name the version to replay against")
    matches = [v for v in await gateway.registry.versions(app.id) if v.version.startswith(wanted)]
    if len(matches) != 1:
        return problem(404, "not_found", f"no single version of {app.name!r} starts with "
                       f"{wanted!r}")
    try:
        selection = Selection(body.get("function"), body.get("since"), body.get("until"),
                              int(body.get("limit", 1000)))
        state, records = await request.app[OPS].replays.start(app, matches[0], selection)
    except (ReplayError, ValueError, TypeError) as exc:
        return problem(400, "bad_request", str(exc))
    return ok({"replay_id": state.replay_id, "app": app.name, "version": state.version,
               "calls": [_logged(r) for r in records]}, status=201)


def _logged(record: CallRecord) -> dict[str, Any]:
    return {"request_id": record.request_id, "function": record.function,
            "args": orjson.loads(record.args), "user_id": record.user_id,
            "outcome": record.outcome, "error": record.error,
            "result": orjson.loads(record.result) if record.result else None,
            "result_digest": record.result_digest, "duration_ms": record.duration_ms,
            "version": record.version, "args_truncated": record.args_truncated}


async def owned_replay(request: web.Request, user_id: str) -> ReplayState:
    """The replay the path names, if it is the caller's; otherwise the answer says why not."""
    try:
        state = await request.app[OPS].replays.state(request.match_info["replay"])
    except ReplayError as exc:
        raise ApiFailure(problem(404, "not_found", str(exc))) from None
    if state.owner_id != user_id:
        raise ApiFailure(problem(403, "forbidden", "this replay belongs to another user"))
    return state


async def replay_call(request: web.Request) -> web.Response:
    """POST /api/replays/{replay}/calls {request_id}: run one logged call, answer its result."""
    gateway, user = await owner(request)
    ops = request.app[OPS]
    state = await owned_replay(request, user.id)
    request_id = (await json_body(request)).get("request_id")
    records = await ops.store.by_ids(state.app_id, [str(request_id)])
    if not records:
        return problem(404, "not_found", f"no logged call {request_id!r} of this app")
    record = records[0]
    caller = await gateway.registry.user_by_id(record.user_id) if record.user_id else None
    app = await gateway.catalog.app(state.app_id)
    version = await gateway.catalog.version(app, state.version)
    try:
        # Replays get the app's env vars but never the caller's secrets or provider keys: the
        # new code must not be able to read or spend what the caller entrusted to the old one.
        sealed = await seal_call(gateway, app, version, caller, replay_call_id(state, record),
                                 caller_secrets=False)
    except MissingSecrets:
        return ok({"request_id": record.request_id, "outcome": "skipped", "result": None,
                   "result_digest": None, "duration_ms": 0,
                   "error": "the app needs the caller's own secrets, which replays never get"})
    identity = ({"id": caller.id, "email": caller.email, "tier": caller.tier}
                if caller else None)
    result = await ops.replays.run_one(state, record, identity, sealed)
    ops.calls.record(CallRecord.build(
        args=orjson.loads(record.args), value=result.get("result"),
        ok=result["outcome"] == "ok", request_id=replay_call_id(state, record),
        at=time.time(), app_id=state.app_id, app_name=state.app_name, version=state.version,
        code_hash=state.code_hash, function=record.function, user_id=record.user_id,
        source="replay", session_id=None, seq=None, outcome=result["outcome"],
        error=result.get("error"), duration_ms=result["duration_ms"], worker_id=None,
        replay_of=record.request_id))
    return ok(result)


async def finish_replay(request: web.Request) -> web.Response:
    """DELETE /api/replays/{replay}: drop the shadow data and forget the replay."""
    _, user = await owner(request)
    await request.app[OPS].replays.finish(await owned_replay(request, user.id))
    return web.Response(status=204)


async def status(request: web.Request) -> web.Response:
    gateway, _ = await owner(request)
    return ok(await farm_status(gateway.redis, gateway.settings))


async def metrics(request: web.Request) -> web.Response:
    from gateway.state import GATEWAY

    gateway = request.app[GATEWAY]
    body, content_type = await request.app[OPS].metrics.exposition(gateway.redis,
                                                                   gateway.settings)
    return web.Response(body=body, headers={"Content-Type": content_type})


def routes() -> list[web.RouteDef]:
    return [
        web.get("/api/apps/{app}/calls", list_calls),
        web.post("/api/apps/{app}/replays", start_replay),
        web.post("/api/replays/{replay}/calls", replay_call),
        web.delete("/api/replays/{replay}", finish_replay),
        web.get("/api/status", status),
        web.get("/metrics", metrics),
    ]
