"""Management endpoints for access and secrets: tokens, visibility, app limits, grants, app env
vars, per-user secrets and BYOK keys. Secret values go in and never come back out."""

from __future__ import annotations

import time
from typing import Any

import structlog
from aiohttp import web

from gateway.auth import AuthError, Principal, check_scopes, issue_for
from gateway.grants import GrantError, parse_expiry, parse_rules, resolve_function
from gateway.registry import AppRecord, NotFound, TokenRecord
from gateway.rest import ApiFailure, authenticated, json_body, ok, owned_app, problem
from gateway.secrets import SecretError, declared
from gateway.state import Gateway

log = structlog.get_logger(__name__)

MAX_LIMIT = 10_000_000


def _fail(status: int, code: str, message: str) -> ApiFailure:
    return ApiFailure(problem(status, code, message))


async def _managed(request: web.Request, scope: str) -> tuple[Gateway, Principal, AppRecord]:
    gateway, principal = await authenticated(request, scope)
    app = await owned_app(gateway, principal.user, request.match_info["app"], principal)
    return gateway, principal, app


# Tokens.

def token_summary(record: TokenRecord) -> dict[str, Any]:
    return {"id": record.id, "name": record.name, "prefix": f"ul_{record.prefix}…",
            "scopes": list(record.scopes), "apps": record.apps, "functions": record.functions,
            "created_at": record.created_at, "last_used_at": record.last_used_at,
            "expires_at": record.expires_at, "revoked_at": record.revoked_at}


async def list_tokens(request: web.Request) -> web.Response:
    gateway, principal = await authenticated(request, "tokens")
    tokens = await gateway.registry.tokens_of(principal.user.id)
    return ok({"tokens": [token_summary(t) for t in tokens]})


async def create_token(request: web.Request) -> web.Response:
    """A new token of the caller's, never with more rights than the token asking for it."""
    gateway, principal = await authenticated(request, "tokens")
    body = await json_body(request)
    try:
        scopes = check_scopes(_strings(body.get("scopes") or ["*"], "scopes"))
    except AuthError as exc:
        raise _fail(400, "bad_request", str(exc)) from None
    apps = _optional_strings(body.get("apps"), "apps")
    functions = _optional_strings(body.get("functions"), "functions")
    _no_wider(principal, scopes, apps, functions)
    days = body.get("expires_days")
    if days is not None and (not isinstance(days, (int, float)) or days <= 0):
        raise _fail(400, "bad_request", "'expires_days' must be a positive number")
    name = str(body.get("name") or "api")[:100]
    issued = await issue_for(gateway.registry, principal.user, name,
                             days * 86400 if days else None, scopes, apps, functions)
    log.info("token_created", token_id=issued.token_id, user_id=principal.user.id)
    return ok({"token": issued.token, "token_id": issued.token_id}, status=201)


def _no_wider(principal: Principal, scopes: tuple[str, ...], apps: list[str] | None,
              functions: list[str] | None) -> None:
    if not principal.has_scope("*") and any(not principal.has_scope(s) for s in scopes):
        raise _fail(403, "token_scope", "a token cannot create a token with more scopes")
    if principal.apps is not None and (apps is None or not set(apps) <= principal.apps):
        raise _fail(403, "token_scope", "a token limited to some apps cannot create a token "
                    "for others")
    if principal.functions is not None and (functions is None
                                            or not set(functions) <= principal.functions):
        raise _fail(403, "token_scope", "a token limited to some functions cannot create a "
                    "token for others")


async def revoke_token(request: web.Request) -> web.Response:
    gateway, principal = await authenticated(request, "tokens")
    token_id = request.match_info["token_id"]
    try:
        await gateway.registry.revoke_token(principal.user.id, token_id)
    except NotFound as exc:
        raise _fail(404, "not_found", str(exc)) from None
    await gateway.bus.publish("token", token_id)
    log.info("token_revoked", token_id=token_id, user_id=principal.user.id)
    return ok({"revoked": token_id})


# Visibility and limits.

async def set_visibility(request: web.Request) -> web.Response:
    gateway, principal, app = await _managed(request, "apps")
    visibility = (await json_body(request)).get("visibility")
    if visibility not in ("private", "unlisted", "public"):
        raise _fail(400, "bad_request", "'visibility' must be private, unlisted or public")
    app = await gateway.registry.set_visibility(app.id, visibility)
    await gateway.catalog.changed(app)
    log.info("visibility_set", app_id=app.id, visibility=visibility, user_id=principal.user.id)
    return ok({"app": app.name, "visibility": app.visibility})


async def get_limits(request: web.Request) -> web.Response:
    _, _, app = await _managed(request, "apps")
    return ok(_limits(app))


async def set_limits(request: web.Request) -> web.Response:
    gateway, principal, app = await _managed(request, "apps")
    body = await json_body(request)
    per_minute = _limit(body, "per_minute", app.limit_per_minute)
    per_day = _limit(body, "per_day", app.limit_per_day)
    app = await gateway.registry.set_limits(app.id, per_minute, per_day)
    await gateway.catalog.changed(app)
    log.info("limits_set", app_id=app.id, per_minute=per_minute, per_day=per_day,
             user_id=principal.user.id)
    return ok(_limits(app))


def _limits(app: AppRecord) -> dict[str, Any]:
    return {"app": app.name, "per_minute": app.limit_per_minute, "per_day": app.limit_per_day}


def _limit(body: dict[str, Any], name: str, current: int | None) -> int | None:
    """Absent keeps the current limit; null or 0 removes it."""
    if name not in body:
        return current
    value = body[name]
    if value is None or value == 0:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_LIMIT:
        raise _fail(400, "bad_request", f"'{name}' must be a whole number from 1 to {MAX_LIMIT}"
                    ", or 0 for no limit")
    return value


# Grants.

async def list_grants(request: web.Request) -> web.Response:
    gateway, _, app = await _managed(request, "grants")
    everything = request.query.get("all") in ("1", "true")
    grants = await gateway.grants.of_app(app.id, include_revoked=everything)
    return ok({"app": app.name, "grants": [g.summary() for g in grants]})


async def add_grant(request: web.Request) -> web.Response:
    gateway, principal, app = await _managed(request, "grants")
    body = await json_body(request)
    email = body.get("email")
    if not isinstance(email, str) or "@" not in email or len(email) > 320:
        raise _fail(400, "bad_request", "'email' must be the email address to grant access to")
    try:
        function = await _function(gateway, app, body.get("function"))
        rules = parse_rules(body)
        expires_at = parse_expiry(body.get("expires"), time.time())
    except GrantError as exc:
        raise _fail(400, "bad_grant", str(exc)) from None
    grant = await gateway.grants.add(app.id, email, function, rules, expires_at,
                                     principal.user.id)
    await gateway.bus.publish("access", app.id)
    log.info("grant_added", app_id=app.id, grant_id=grant.id, user_id=principal.user.id)
    return ok(grant.summary(), status=201)


async def _function(gateway: Gateway, app: AppRecord, name: Any) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str):
        raise GrantError("'function' must be a tool name")
    tools: set[str] = set()
    for version in await gateway.registry.versions(app.id):
        tools.update(t["name"] for t in version.tools)
    return resolve_function(name, app.name, sorted(tools))


async def revoke_grant(request: web.Request) -> web.Response:
    gateway, principal, app = await _managed(request, "grants")
    try:
        grant = await gateway.grants.revoke(app.id, request.match_info["grant_id"])
    except NotFound as exc:
        raise _fail(404, "not_found", str(exc)) from None
    await gateway.bus.publish("access", app.id)
    log.info("grant_revoked", app_id=app.id, grant_id=grant.id, user_id=principal.user.id)
    return ok(grant.summary())


# App env vars.

async def list_env(request: web.Request) -> web.Response:
    gateway, _, app = await _managed(request, "env")
    names = await gateway.secrets.env_names(app.id)
    return ok({"app": app.name, "env": names})


async def set_env(request: web.Request) -> web.Response:
    gateway, principal, app = await _managed(request, "env")
    name = request.match_info["name"]
    per_user = {n for n, spec in (await _declared(gateway, app)).items() if spec.per_user}
    if name in per_user:
        raise _fail(400, "per_user", f"{name} is a per-user secret of this app: each caller "
                    f"sets their own with 'ultralight secret set {app.name} {name}'")
    value: Any = (await json_body(request)).get("value")
    try:
        await gateway.secrets.set_env(app.id, name, value)
    except SecretError as exc:
        raise _fail(400, "bad_secret", str(exc)) from None
    log.info("env_set", app_id=app.id, name=name, user_id=principal.user.id)
    return ok({"app": app.name, "name": name, "set": True})


async def unset_env(request: web.Request) -> web.Response:
    gateway, principal, app = await _managed(request, "env")
    name = request.match_info["name"]
    removed = await gateway.secrets.unset_env(app.id, name)
    log.info("env_unset", app_id=app.id, name=name, removed=removed, user_id=principal.user.id)
    return ok({"app": app.name, "name": name, "removed": removed})


async def _declared(gateway: Gateway, app: AppRecord) -> dict[str, Any]:
    if app.live_version is None:
        return {}
    return declared((await gateway.catalog.version(app, app.live_version)).manifest)


# Per-user secrets.

async def _usable_app(request: web.Request) -> tuple[Gateway, Principal, AppRecord]:
    """An app the caller may call (owner, grantee, or not private): others' apps stay unseen."""
    gateway, principal = await authenticated(request, "secrets")
    ref = request.match_info["app"]
    missing = _fail(404, "not_found", f"no app named {ref!r}")
    try:
        app = await gateway.registry.app(ref)
    except NotFound:
        raise missing from None
    if not principal.may_use_app(app):
        raise _fail(403, "token_scope", f"this token may not use {ref!r}")
    if app.visibility == "private" and app.owner_id != principal.user.id:
        if not await gateway.grants.for_caller(app.id, principal.user.email):
            raise missing
    return gateway, principal, app


async def list_secrets(request: web.Request) -> web.Response:
    gateway, principal, app = await _usable_app(request)
    stored = {s["name"]: s for s in
              await gateway.secrets.user_secret_names(principal.user.id, app.id)}
    specs = [s for s in (await _declared(gateway, app)).values() if s.per_user]
    return ok({"app": app.name, "secrets": [
        {"name": s.name, "required": s.required, "description": s.description,
         "configured": s.name in stored,
         "updated_at": stored[s.name]["updated_at"] if s.name in stored else None}
        for s in specs]})


async def set_secret(request: web.Request) -> web.Response:
    gateway, principal, app = await _usable_app(request)
    name = request.match_info["name"]
    per_user = [n for n, s in (await _declared(gateway, app)).items() if s.per_user]
    if name not in per_user:
        raise _fail(400, "undeclared", f"the app {app.name!r} declares no per-user secret "
                    f"{name!r}; it declares {', '.join(per_user) or 'none'}")
    value: Any = (await json_body(request)).get("value")
    try:
        await gateway.secrets.set_user_secret(principal.user.id, app.id, name, value)
    except SecretError as exc:
        raise _fail(400, "bad_secret", str(exc)) from None
    log.info("secret_set", app_id=app.id, name=name, user_id=principal.user.id)
    return ok({"app": app.name, "name": name, "set": True})


async def unset_secret(request: web.Request) -> web.Response:
    gateway, principal, app = await _usable_app(request)
    name = request.match_info["name"]
    removed = await gateway.secrets.unset_user_secret(principal.user.id, app.id, name)
    log.info("secret_unset", app_id=app.id, name=name, user_id=principal.user.id)
    return ok({"app": app.name, "name": name, "removed": removed})


# BYOK provider keys.

async def list_byok(request: web.Request) -> web.Response:
    gateway, principal = await authenticated(request, "secrets")
    return ok({"providers": await gateway.secrets.byok_names(principal.user.id)})


async def set_byok(request: web.Request) -> web.Response:
    gateway, principal = await authenticated(request, "secrets")
    provider = request.match_info["provider"]
    value: Any = (await json_body(request)).get("value")
    try:
        await gateway.secrets.set_byok(principal.user.id, provider, value)
    except SecretError as exc:
        raise _fail(400, "bad_secret", str(exc)) from None
    log.info("byok_set", provider=provider, user_id=principal.user.id)
    return ok({"provider": provider, "set": True})


async def unset_byok(request: web.Request) -> web.Response:
    gateway, principal = await authenticated(request, "secrets")
    provider = request.match_info["provider"]
    removed = await gateway.secrets.unset_byok(principal.user.id, provider)
    log.info("byok_unset", provider=provider, user_id=principal.user.id)
    return ok({"provider": provider, "removed": removed})


def _strings(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(400, "bad_request", f"'{what}' must be a list of strings")
    return value


def _optional_strings(value: Any, what: str) -> list[str] | None:
    return None if value is None else _strings(value, what)


def routes() -> list[web.RouteDef]:
    app = "/api/apps/{app}"
    return [
        web.get("/api/tokens", list_tokens),
        web.post("/api/tokens", create_token),
        web.delete("/api/tokens/{token_id}", revoke_token),
        web.post(f"{app}/visibility", set_visibility),
        web.get(f"{app}/limits", get_limits),
        web.put(f"{app}/limits", set_limits),
        web.get(f"{app}/grants", list_grants),
        web.post(f"{app}/grants", add_grant),
        web.delete(f"{app}/grants/{{grant_id}}", revoke_grant),
        web.get(f"{app}/env", list_env),
        web.put(f"{app}/env/{{name}}", set_env),
        web.delete(f"{app}/env/{{name}}", unset_env),
        web.get(f"{app}/secrets", list_secrets),
        web.put(f"{app}/secrets/{{name}}", set_secret),
        web.delete(f"{app}/secrets/{{name}}", unset_secret),
        web.get("/api/byok", list_byok),
        web.put("/api/byok/{provider}", set_byok),
        web.delete("/api/byok/{provider}", unset_byok),
    ]
