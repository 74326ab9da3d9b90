"""``POST /internal/call``: a worker runs another app's tool for an app, as the original caller.

Only a worker can reach it usefully: the body carries the caller's identity sealed under the farm
key. The call then goes through the same permission and limit gates as a client's call.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
from aiohttp import web

from gateway.auth import Principal
from gateway.calls import MissingSecrets, seal_call
from gateway.dispatch import DispatchError
from gateway.gates import Caller, GateRefusal
from gateway.registry import AppRecord, NotFound, User
from gateway.state import GATEWAY
from gateway.tools import ArgumentError, prepare_arguments
from workers.jobs import CallJob
from workers.nested import NestedCallError, open_identity


def answer(result: Any = None, error: str | None = None) -> web.Response:
    body = {"isError": error is not None, "result": result, "error": error}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def internal_call(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    try:
        body = orjson.loads(await request.read())
        identity = open_identity(gateway.farm_keys, str(body.get("token", "")))
    except (orjson.JSONDecodeError, AttributeError, NestedCallError) as exc:
        return web.Response(status=403, text=f"refused: {exc}")
    app_ref, function = str(body.get("app", "")), str(body.get("function", ""))
    try:
        app = await gateway.catalog.app(app_ref)
    except NotFound:
        return answer(error=f"no app named {app_ref!r}")
    if app.live_version is None:
        return answer(error=f"the app {app.name!r} has no live version")
    refusal = await _crossing(gateway, identity, app)
    if refusal:
        return answer(error=refusal)
    version = await gateway.catalog.version(app, app.live_version)
    user = User(**identity["user"]) if identity.get("user") else None
    caller = Caller(Principal(user) if user else None, None)
    tool = version.tool(function)
    try:
        await gateway.gates.admit(app, caller, "tools/call", tool or {"name": function},
                                  body.get("arguments") or {})
    except GateRefusal as refusal:
        return answer(error=str(refusal))
    if tool is None:
        return answer(error=f"the app {app.name!r} has no tool named {function!r}")
    try:
        arguments = prepare_arguments(tool, body.get("arguments"))
        call_id = uuid.uuid4().hex
        sealed = await seal_call(gateway, app, version, user, call_id)
    except (ArgumentError, MissingSecrets) as exc:
        return answer(error=str(exc))
    job = CallJob(call_id=call_id, app_id=app.id, app_name=app.name, version=version.version,
                  code_hash=version.code_hash, function=function, args=arguments,
                  deadline=min(float(identity["deadline"]),
                               time.time() + gateway.settings.call_timeout_s),
                  user={"id": user.id, "email": user.email, "tier": user.tier} if user else None,
                  sealed=sealed, depth=int(identity.get("depth", 1)),
                  chain=list(identity.get("chain", [])),
                  caller_apps=identity.get("caller_apps"))
    try:
        reply = await gateway.dispatcher.call(job)
    except DispatchError as exc:
        return answer(error=str(exc))
    if not reply.ok:
        return answer(error=reply.error or reply.outcome)
    return answer(result=reply.value)


async def _crossing(gateway: Any, identity: dict[str, Any], target: AppRecord) -> str | None:
    """Why the calling app may not reach ``target`` for this caller, or None.

    A nested call carries the caller's identity, so it must not let one owner's app reach into
    apps it could not call itself: a private app is reachable only from apps of the same owner.
    A token limited to some apps stays limited inside app-to-app calls.
    """
    allowed = identity.get("caller_apps")
    if allowed is not None and target.name not in allowed and target.id not in allowed:
        return f"the caller's token may not call the app {target.name!r}"
    try:
        calling = await gateway.catalog.app(str(identity.get("from_app", "")))
    except NotFound:
        return "the calling app no longer exists"
    if target.visibility == "private" and target.owner_id != calling.owner_id:
        return (f"the app {calling.name!r} may not call the private app {target.name!r}: "
                "only apps of the same owner may, or make it unlisted or public")
    return None


def routes() -> list[web.RouteDef]:
    return [web.post("/internal/call", internal_call)]
