"""The management REST API under ``/api``: deploy, list versions, promote (and, through
``gateway.rest_access``, tokens, grants, limits, env vars, secrets and BYOK keys)."""

from __future__ import annotations

from typing import Any

import orjson
import structlog
from aiohttp import web

from gateway.auth import AuthError, Principal
from gateway.deploy import DeployError, build_version, check_name, version_summary, with_app
from gateway.registry import AppRecord, Conflict, NotFound, User
from gateway.state import GATEWAY, Gateway

log = structlog.get_logger(__name__)


def problem(status: int, code: str, message: str, headers: dict[str, str] | None = None
            ) -> web.Response:
    return web.Response(body=orjson.dumps({"error": {"code": code, "message": message}}),
                        status=status, content_type="application/json", headers=headers)


def ok(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


class ApiFailure(Exception):
    def __init__(self, response: web.Response) -> None:
        super().__init__(response.text)
        self.response = response


async def authenticated(request: web.Request, scope: str | None) -> tuple[Gateway, Principal]:
    """The caller, who must have sent credentials carrying ``scope`` (None: any scope)."""
    gateway = request.app[GATEWAY]
    try:
        principal = await gateway.principal(request)
    except AuthError as exc:
        raise ApiFailure(problem(401, exc.reason, str(exc),
                                 {"WWW-Authenticate": 'Bearer realm="ultralight"'})) from None
    if principal is None:
        raise ApiFailure(problem(401, "missing", "send 'Authorization: Bearer <token>'; create "
                                 "a token with 'ultralight token create'",
                                 {"WWW-Authenticate": 'Bearer realm="ultralight"'}))
    if scope is not None and not principal.has_scope(scope):
        raise ApiFailure(problem(403, "token_scope", f"this token lacks the {scope!r} scope"))
    return gateway, principal


async def owner(request: web.Request) -> tuple[Gateway, User]:
    """A caller managing apps (the ``apps`` scope)."""
    gateway, principal = await authenticated(request, "apps")
    return gateway, principal.user


async def owned_app(gateway: Gateway, user: User, ref: str,
                    principal: Principal | None = None) -> AppRecord:
    try:
        app = await gateway.registry.app(ref)
    except NotFound:
        raise ApiFailure(problem(404, "not_found", f"no app named {ref!r}")) from None
    if app.owner_id != user.id:
        raise ApiFailure(problem(403, "forbidden", f"the app {ref!r} belongs to another user"))
    if principal is not None and not principal.may_use_app(app):
        raise ApiFailure(problem(403, "token_scope", f"this token may not manage {ref!r}"))
    return app


async def json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise ApiFailure(problem(400, "bad_json", "the body must be a JSON object")) from None
    if not isinstance(body, dict):
        raise ApiFailure(problem(400, "bad_json", "the body must be a JSON object"))
    return body


async def deploy(request: web.Request) -> web.Response:
    gateway, principal = await authenticated(request, "apps")
    user = principal.user
    body = await json_body(request)
    source = body.get("source")
    if not isinstance(source, str):
        return problem(400, "bad_request", "'source' must be the module's text")
    visibility = body.get("visibility")
    if visibility is None and body.get("public"):
        visibility = "public"
    if visibility not in (None, "private", "unlisted", "public"):
        return problem(400, "bad_request", "'visibility' must be private, unlisted or public")
    try:
        name = check_name(request.match_info["app"])
        allowed = principal.apps
        if allowed is not None and name not in allowed:
            return problem(403, "token_scope", f"this token may not deploy {name!r}")
        code_hash = await gateway.blobs.put(source.encode())
        record = build_version(source, body.get("manifest"), code_hash)
        app = await gateway.registry.save_version(user, name, visibility, record,
                                                  make_live=not body.get("draft", False))
    except DeployError as exc:
        return problem(422, "invalid_app", str(exc))
    except Conflict as exc:
        return problem(409, "conflict", str(exc))
    await gateway.catalog.changed(app)
    log.info("deployed", app_id=app.id, app=app.name, version=record.version,
             live=app.live_version == record.version, user_id=user.id)
    return ok({"app_id": app.id, "name": app.name, "visibility": app.visibility,
               **version_summary(with_app(record, app.id), app.live_version),
               "tools_detail": record.tools}, status=201)


async def list_apps(request: web.Request) -> web.Response:
    gateway, principal = await authenticated(request, "apps")
    apps = [a for a in await gateway.registry.apps_of(principal.user.id)
            if principal.may_use_app(a)]
    return ok({"apps": [{"id": a.id, "name": a.name, "visibility": a.visibility,
                         "live_version": a.live_version, "limit_per_minute": a.limit_per_minute,
                         "limit_per_day": a.limit_per_day} for a in apps]})


async def list_versions(request: web.Request) -> web.Response:
    gateway, principal = await authenticated(request, "apps")
    app = await owned_app(gateway, principal.user, request.match_info["app"], principal)
    versions = await gateway.registry.versions(app.id)
    return ok({"app": app.name, "live_version": app.live_version,
               "versions": [version_summary(v, app.live_version) for v in versions]})


async def promote(request: web.Request) -> web.Response:
    gateway, principal = await authenticated(request, "apps")
    app = await owned_app(gateway, principal.user, request.match_info["app"], principal)
    version = (await json_body(request)).get("version")
    if not isinstance(version, str):
        return problem(400, "bad_request", "'version' must be a version id")
    matches = [v.version for v in await gateway.registry.versions(app.id)
               if v.version.startswith(version)]
    if len(matches) != 1:
        reason = "no version" if not matches else "more than one version"
        return problem(404, "not_found", f"{reason} of {app.name!r} starts with {version!r}")
    app = await gateway.registry.promote(app.id, matches[0])
    await gateway.catalog.changed(app)
    log.info("promoted", app_id=app.id, app=app.name, version=app.live_version,
             user_id=principal.user.id)
    return ok({"app": app.name, "live_version": app.live_version})


async def whoami(request: web.Request) -> web.Response:
    _, principal = await authenticated(request, None)
    user = principal.user
    return ok({"id": user.id, "email": user.email, "tier": user.tier,
               "scopes": sorted(principal.scopes), "token_id": principal.token_id})


@web.middleware
async def api_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiFailure as failure:
        return failure.response


def routes() -> list[web.RouteDef]:
    from gateway import rest_access

    return [
        web.get("/api/me", whoami),
        web.get("/api/apps", list_apps),
        web.post("/api/apps/{app}/versions", deploy),
        web.get("/api/apps/{app}/versions", list_versions),
        web.post("/api/apps/{app}/promote", promote),
        *rest_access.routes(),
    ]
