"""The MCP endpoint ``/mcp/{app}``: Streamable HTTP with JSON responses.

Two eras share the endpoint. Requests carrying ``MCP-Protocol-Version: 2026-07-28`` are stateless
(``server/discover``, per-request ``_meta``, no session). Anything else follows the handshake era
(``initialize``, then an ``Mcp-Session-Id`` kept in Redis so any gateway can serve it).
"""

from __future__ import annotations

import asyncio
import contextlib
import base64
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import orjson
import structlog
from aiohttp import web
from redis.exceptions import RedisError

from gateway import GatewayError
from gateway.auth import AuthError, Principal
from gateway.calls import MissingSecrets, seal_call
from gateway.calllog import CallRecord
from gateway.dispatch import DispatchError
from gateway.ops_api import OPS
from gateway.gates import Admission, Caller, GateRefusal
from gateway.registry import AppRecord, NotFound, User, VersionRecord
from gateway.sessions import Session
from gateway.state import GATEWAY, Gateway
from gateway.tools import ArgumentError, error_result, prepare_arguments, tool_result
from workers.jobs import CallJob, CallReply

log = structlog.get_logger(__name__)

MODERN = "2026-07-28"
HANDSHAKE_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26")
ASSUMED_VERSION = "2025-03-26"
SUPPORTED = (MODERN, *HANDSHAKE_VERSIONS)
META_VERSION = "io.modelcontextprotocol/protocolVersion"
SERVER_NAME = "ultralight"

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
HEADER_MISMATCH = -32020
UNSUPPORTED_VERSION = -32022
# Implementation-defined: a rate limit, quota, app limit or grant budget is used up (HTTP 429).
LIMITED = -32029


class RpcFailure(GatewayError):
    """A request that ends in a JSON-RPC error with a fitting HTTP status."""

    def __init__(self, code: int, message: str, status: int = 400, *, id: Any = None,
                 data: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status
        self.id, self.data, self.headers = id, data, headers or {}

    def response(self) -> web.Response:
        return json_response(error_body(self.id, self.code, self.message, self.data),
                             status=self.status, headers=self.headers)


def error_body(id: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": id, "error": error}


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, headers=headers,
                        content_type="application/json")


@dataclasses.dataclass
class Context:
    """One HTTP request to the endpoint, after its headers were checked."""

    gateway: Gateway
    request: web.Request
    app: AppRecord
    version: VersionRecord
    caller: Caller
    protocol: str
    modern: bool
    started: float = 0.0
    session: Session | None = None
    new_session: Session | None = None
    # Milliseconds spent per step before the call reached the farm, for Server-Timing.
    timing: dict[str, float] = dataclasses.field(default_factory=dict)
    # Values sealed into the call, masked wherever the platform records the call.
    secret_values: list[str] = dataclasses.field(default_factory=list)

    @property
    def principal(self) -> Principal | None:
        return self.caller.principal

    @property
    def user(self) -> User | None:
        return self.caller.principal.user if self.caller.principal else None


# Entry points.

async def post(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    started = time.perf_counter()
    context: Context | None = None
    try:
        check_origin(request, gateway)
        check_media_types(request)
        message = parse(await read_body(request, gateway.settings.max_body_bytes))
        protocol, modern = protocol_of(request, message)
        context = await open_context(request, gateway, message, protocol, modern, started)
        response = await respond(context, message)
    except RpcFailure as failure:
        response = failure.response()
    except RedisError:
        log.warning("redis_unavailable", path=request.path)
        response = json_response(error_body(None, INTERNAL_ERROR, "the platform's Redis is "
                                            "unavailable; try again shortly"),
                                 status=503, headers={"Retry-After": "1"})
    response.headers["X-Elapsed-Ms"] = f"{(time.perf_counter() - started) * 1000:.2f}"
    if context is not None and context.timing:
        response.headers["Server-Timing"] = ", ".join(
            f"{step};dur={ms:.3f}" for step, ms in context.timing.items())
    return response


async def get(request: web.Request) -> web.Response:
    try:
        check_origin(request, request.app[GATEWAY])
    except RpcFailure as failure:
        return failure.response()
    return json_response(
        error_body(None, INVALID_REQUEST, "this endpoint has no server-to-client stream; "
                   "send JSON-RPC requests with POST"),
        status=405, headers={"Allow": "POST, DELETE"})


async def delete(request: web.Request) -> web.Response:
    """Ends a handshake-era session."""
    gateway = request.app[GATEWAY]
    session_id = request.headers.get("Mcp-Session-Id")
    try:
        check_origin(request, gateway)
        if not session_id:
            raise RpcFailure(INVALID_REQUEST, "DELETE needs an Mcp-Session-Id header")
        session = await gateway.sessions.get(session_id)
        app = await find_app(gateway, request.match_info["app"])
        owner = await caller_id(gateway, request)
        if session is None or session.app_id != app.id or session.user_id != owner:
            raise RpcFailure(INVALID_REQUEST, "no such session (it may have expired)", 404)
        await gateway.sessions.delete(session_id)
    except RpcFailure as failure:
        return failure.response()
    return web.Response(status=204)


# Request checks, in the order they run.

def check_origin(request: web.Request, gateway: Gateway) -> None:
    """Browsers send Origin; only loopback, same-host and configured origins may call."""
    origin = request.headers.get("Origin")
    if origin is None:
        return
    try:
        parts = urlsplit(origin)
    except ValueError:
        raise RpcFailure(INVALID_REQUEST, f"origin {origin!r} is not a valid URL", 403) from None
    # Not "same as Host": a DNS-rebinding page sends a Host that matches its own Origin.
    allowed = (
        parts.hostname in {"localhost", "127.0.0.1", "::1"}
        or origin.rstrip("/") in gateway.settings.origin_allowlist
    )
    if not allowed:
        raise RpcFailure(INVALID_REQUEST, f"origin {origin!r} is not allowed to call this "
                         "endpoint", 403)


def check_media_types(request: web.Request) -> None:
    if request.content_type != "application/json":
        raise RpcFailure(INVALID_REQUEST, "send the JSON-RPC message with Content-Type: "
                         "application/json", 415)
    accept = request.headers.get("Accept", "*/*").lower()
    if not any(kind in accept for kind in ("application/json", "*/*", "application/*")):
        raise RpcFailure(INVALID_REQUEST, "this endpoint answers with application/json; "
                         "include it in the Accept header", 406)


async def read_body(request: web.Request, limit: int) -> bytes:
    too_large = RpcFailure(INVALID_REQUEST, f"the request body is larger than {limit} bytes", 413)
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(65_536):
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def parse(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RpcFailure(PARSE_ERROR, f"parse error: the body is not valid JSON ({exc})") from None


def protocol_of(request: web.Request, message: Any) -> tuple[str, bool]:
    """The protocol version from the header, and whether it is the stateless era."""
    header = request.headers.get("MCP-Protocol-Version")
    if header is None:
        return ASSUMED_VERSION, False
    if header not in SUPPORTED:
        raise RpcFailure(UNSUPPORTED_VERSION, "Unsupported protocol version",
                         id=_valid_id(message),
                         data={"supported": list(SUPPORTED), "requested": header})
    return header, header == MODERN


async def find_app(gateway: Gateway, ref: str, message_id: Any = None) -> AppRecord:
    try:
        return await gateway.catalog.app(ref)
    except NotFound:
        raise RpcFailure(INVALID_REQUEST, f"no app named {ref!r} on this server", 404,
                         id=message_id) from None


async def open_context(request: web.Request, gateway: Gateway, message: Any, protocol: str,
                       modern: bool, started: float) -> Context:
    """Authenticate and look up the app together, then the version and the session.

    Who may do what (grants, limits) is decided per request by the gates (``admit``)."""
    message_id = _valid_id(message)
    authenticating = asyncio.ensure_future(gateway.principal(request))
    try:
        app = await find_app(gateway, request.match_info["app"], message_id)
        principal = await authenticating
    except AuthError as exc:
        raise unauthorized(exc.reason, str(exc), message_id) from None
    finally:
        if not authenticating.done():
            authenticating.cancel()
        elif not authenticating.cancelled():
            # An unknown app wins over bad credentials; fetch the loser's error so asyncio
            # does not log it as never retrieved.
            authenticating.exception()
    if principal is None and app.visibility == "private":
        raise unauthorized("missing", f"the app {app.name!r} is private: send "
                           "'Authorization: Bearer <token>'", message_id)
    if app.live_version is None:
        raise RpcFailure(INVALID_REQUEST, f"the app {app.name!r} has no live version; promote "
                         "one with 'ultralight promote'", 404, id=message_id)
    version = await gateway.catalog.version(app, app.live_version)
    context = Context(gateway, request, app, version, gateway.gates.caller(request, principal),
                      protocol, modern, started)
    context.timing["auth"] = (time.perf_counter() - started) * 1000
    if not modern and not is_initialize(message):
        context.session = await require_session(context, message_id)
    return context


async def caller_id(gateway: Gateway, request: web.Request) -> str | None:
    try:
        user = await gateway.caller(request)
    except AuthError as exc:
        raise unauthorized(exc.reason, str(exc), None) from None
    return user.id if user else None


async def admit(context: Context, method: str, tool: dict[str, Any] | None = None,
                arguments: dict[str, Any] | None = None) -> Admission:
    """Run the gates for one request; a refusal becomes its HTTP status and JSON-RPC error."""
    started = time.perf_counter()
    try:
        admission = await context.gateway.gates.admit(context.app, context.caller, method, tool,
                                                      arguments)
    except GateRefusal as refusal:
        raise refused(refusal, context.app) from None
    finally:
        context.timing["gates"] = (time.perf_counter() - started) * 1000
    return admission


def refused(refusal: GateRefusal, app: AppRecord) -> RpcFailure:
    if refusal.status == 401:
        return unauthorized(refusal.reason, str(refusal), None)
    headers = {}
    if refusal.retry_after_s is not None:
        headers["Retry-After"] = str(refusal.retry_after_s)
    code = {429: LIMITED, 503: INTERNAL_ERROR}.get(refusal.status, INVALID_REQUEST)
    # A caller hammering a limit must not flood the log: limits at DEBUG, refusals at INFO.
    level = log.debug if refusal.status == 429 else log.info
    level("refused", app_id=app.id, status=refusal.status, reason=refusal.reason)
    return RpcFailure(code, str(refusal), refusal.status, data=refusal.data, headers=headers)


def unauthorized(reason: str, message: str, message_id: Any) -> RpcFailure:
    challenge = f'Bearer realm="ultralight", error="invalid_token", error_description="{reason}"'
    if reason == "missing":
        challenge = 'Bearer realm="ultralight"'
    return RpcFailure(INVALID_REQUEST, message, 401, id=message_id, data={"reason": reason},
                      headers={"WWW-Authenticate": challenge})


def is_initialize(message: Any) -> bool:
    return isinstance(message, dict) and message.get("method") == "initialize"


async def require_session(context: Context, message_id: Any) -> Session:
    session_id = context.request.headers.get("Mcp-Session-Id")
    if not session_id:
        raise RpcFailure(INVALID_REQUEST, "missing Mcp-Session-Id header: send initialize first",
                         id=message_id)
    session = await context.gateway.sessions.get(session_id)
    if session is None or session.app_id != context.app.id:
        raise RpcFailure(INVALID_REQUEST, "unknown or expired session: send initialize again",
                         404, id=message_id)
    owner = context.user.id if context.user else None
    if session.user_id != owner:
        raise RpcFailure(INVALID_REQUEST, "this session belongs to another caller", 404,
                         id=message_id)
    header = context.request.headers.get("MCP-Protocol-Version")
    if header is not None and header != session.protocol_version:
        raise RpcFailure(INVALID_REQUEST, f"MCP-Protocol-Version {header} differs from the "
                         f"session's {session.protocol_version}", id=message_id)
    context.protocol = session.protocol_version
    return session


# Dispatch of messages.

async def respond(context: Context, message: Any) -> web.Response:
    if isinstance(message, list):
        return await respond_batch(context, message)
    reply = await handle(context, message)
    headers = {}
    if context.new_session is not None:
        headers["Mcp-Session-Id"] = context.new_session.id
    if reply is None:
        return web.Response(status=202, headers=headers)
    status = 200
    if "error" in reply:
        status = error_status(context, reply["error"]["code"])
    return json_response(reply, status=status, headers=headers)


def error_status(context: Context, code: int) -> int:
    if not context.modern:
        return 200
    return {METHOD_NOT_FOUND: 404, INVALID_PARAMS: 400, INVALID_REQUEST: 400}.get(code, 200)


async def respond_batch(context: Context, batch: list[Any]) -> web.Response:
    if context.protocol != "2025-03-26":
        raise RpcFailure(INVALID_REQUEST, f"JSON-RPC batches are not part of protocol version "
                         f"{context.protocol}; send one message per request")
    if not batch:
        raise RpcFailure(INVALID_REQUEST, "an empty JSON-RPC batch")
    if any(is_initialize(m) for m in batch):
        raise RpcFailure(INVALID_REQUEST, "initialize must not be part of a batch")
    replies = await asyncio.gather(*(handle_member(context, m) for m in batch))
    answered = [r for r in replies if r is not None]
    if not answered:
        return web.Response(status=202)
    return json_response(answered)


async def handle_member(context: Context, message: Any) -> dict[str, Any] | None:
    """One message of a batch: its failure is its own error response, not the batch's."""
    try:
        return await handle(context, message)
    except RpcFailure as failure:
        return error_body(failure.id, failure.code, failure.message, failure.data)


async def handle(context: Context, message: Any) -> dict[str, Any] | None:
    """One JSON-RPC message: a response object, or None for notifications and responses."""
    kind, message_id = classify(message)
    if kind == "invalid":
        raise RpcFailure(INVALID_REQUEST, "invalid request: expected a JSON-RPC 2.0 object with "
                         "'jsonrpc': '2.0' and a string 'method'", id=message_id)
    if kind != "request":
        return None
    method, params = message["method"], message.get("params")
    if params is not None and not isinstance(params, dict):
        return error_body(message_id, INVALID_PARAMS, "params must be an object")
    params = params or {}
    if context.modern:
        check_modern_headers(context, method, params, message_id)
    handler = MODERN_METHODS.get(method) if context.modern else HANDSHAKE_METHODS.get(method)
    if handler is None:
        return error_body(message_id, METHOD_NOT_FOUND, f"method not found: {method}")
    try:
        result = await handler(context, params)
    except RpcFailure as failure:
        if failure.status != 200:
            failure.id = message_id
            raise
        return error_body(message_id, failure.code, failure.message, failure.data)
    return {"jsonrpc": "2.0", "id": message_id, "result": result}


def classify(message: Any) -> tuple[str, Any]:
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        return "invalid", _valid_id(message)
    message_id = _valid_id(message)
    if "method" in message:
        if not isinstance(message["method"], str):
            return "invalid", message_id
        if "id" not in message:
            return "notification", None
        return ("request", message_id) if message_id is not None else ("invalid", None)
    if "id" in message and ("result" in message or "error" in message):
        return "response", message_id
    return "invalid", message_id


def _valid_id(message: Any) -> Any:
    if not isinstance(message, dict):
        return None
    value = message.get("id")
    return value if isinstance(value, (str, int)) and not isinstance(value, bool) else None


def check_modern_headers(context: Context, method: str, params: dict[str, Any],
                         message_id: Any) -> None:
    """In the stateless era the headers repeat the body so proxies can route on them."""
    headers = context.request.headers
    meta = params.get("_meta") if isinstance(params.get("_meta"), dict) else {}
    problems = []
    if meta.get(META_VERSION) != context.protocol:
        problems.append(f"_meta {META_VERSION} is {meta.get(META_VERSION)!r}, the header says "
                        f"{context.protocol!r}")
    if headers.get("Mcp-Method") != method:
        problems.append(f"Mcp-Method header is {headers.get('Mcp-Method')!r}, the body says "
                        f"{method!r}")
    if method == "tools/call" and decode_header(headers.get("Mcp-Name")) != params.get("name"):
        problems.append("Mcp-Name header does not match the tool name in the body")
    if problems:
        raise RpcFailure(HEADER_MISMATCH, "header mismatch: " + "; ".join(problems),
                         id=message_id)


def decode_header(value: str | None) -> str | None:
    """Non-ASCII header values arrive as ``=?base64?...?=``."""
    if value and value.startswith("=?base64?") and value.endswith("?="):
        try:
            return base64.b64decode(value[9:-2]).decode()
        except (ValueError, UnicodeDecodeError):
            return None
    return value


# Methods.

def server_info(context: Context) -> dict[str, Any]:
    return {"name": context.app.name, "version": context.version.version,
            "title": f"{context.app.name} on {SERVER_NAME}"}


async def initialize(context: Context, params: dict[str, Any]) -> dict[str, Any]:
    await admit(context, "initialize")
    requested = params.get("protocolVersion")
    chosen = requested if requested in HANDSHAKE_VERSIONS else HANDSHAKE_VERSIONS[0]
    user_id = context.user.id if context.user else None
    context.new_session = await context.gateway.sessions.create(
        context.app.id, chosen, user_id, params.get("clientInfo"))
    context.protocol = chosen
    result: dict[str, Any] = {
        "protocolVersion": chosen,
        "capabilities": {"tools": {"listChanged": False}},
        "serverInfo": server_info(context),
    }
    if context.version.description:
        result["instructions"] = context.version.description
    return result


async def ping(context: Context, params: dict[str, Any]) -> dict[str, Any]:
    return {}


async def discover(context: Context, params: dict[str, Any]) -> dict[str, Any]:
    await admit(context, "server/discover")
    result: dict[str, Any] = {
        "supportedVersions": list(SUPPORTED),
        "capabilities": {"tools": {"listChanged": False}},
        "_meta": {"io.modelcontextprotocol/serverInfo": server_info(context)},
    }
    if context.version.description:
        result["instructions"] = context.version.description
    return modern_result(context, result, cacheable=True)


def modern_result(context: Context, result: dict[str, Any], cacheable: bool = False
                  ) -> dict[str, Any]:
    if not context.modern:
        return result
    result["resultType"] = "complete"
    if cacheable:
        # Tools change whenever a version is promoted, so clients must not cache them.
        result["ttlMs"] = 0
        result["cacheScope"] = "private"
    return result


def public_tool(tool: dict[str, Any]) -> dict[str, Any]:
    listed = {"name": tool["name"], "description": tool["description"],
              "inputSchema": tool["inputSchema"]}
    if tool.get("outputSchema") is not None:
        listed["outputSchema"] = tool["outputSchema"]
    return listed


async def list_tools(context: Context, params: dict[str, Any]) -> dict[str, Any]:
    allowed = (await admit(context, "tools/list")).permit.functions
    tools = [public_tool(t) for t in context.version.tools
             if allowed is None or t["name"] in allowed]
    return modern_result(context, {"tools": tools}, cacheable=True)


async def call_tool(context: Context, params: dict[str, Any]) -> dict[str, Any]:
    """Gates first (so a caller who may not call learns nothing of the tools), then the
    arguments, then the sealed secrets, then the farm."""
    name = params.get("name")
    if not isinstance(name, str):
        raise RpcFailure(INVALID_PARAMS, "tools/call needs a string 'name'", 200)
    raw = params.get("arguments")
    tool = context.version.tool(name)
    admission = await admit(context, "tools/call", tool or {"name": name},
                            raw if isinstance(raw, dict) else {})
    refund = context.gateway.gates.refund
    if tool is None:
        await refund(admission.counted)
        allowed = admission.permit.functions
        raise RpcFailure(INVALID_PARAMS, f"Unknown tool: {name}", 200, data={"tools": [
            t["name"] for t in context.version.tools if allowed is None or t["name"] in allowed]})
    try:
        arguments = prepare_arguments(tool, raw)
    except ArgumentError as exc:
        await refund(admission.counted)
        message = f"invalid arguments for {name}: {exc}"
        if context.protocol in ("2025-03-26", "2025-06-18"):
            raise RpcFailure(INVALID_PARAMS, message, 200) from None
        return modern_result(context, error_result(message))
    return await run_tool(context, tool, arguments, admission)


async def run_tool(context: Context, tool: dict[str, Any], arguments: dict[str, Any],
                   admission: Admission) -> dict[str, Any]:
    started = time.perf_counter()
    call_id = uuid.uuid4().hex
    try:
        sealed = await seal_call(context.gateway, context.app, context.version, context.user,
                                 call_id, reveal=context.secret_values)
    except MissingSecrets as exc:
        await context.gateway.gates.refund(admission.counted)
        return modern_result(context, error_result(str(exc)))
    context.timing["seal"] = (time.perf_counter() - started) * 1000
    async with in_flight(context, admission):
        reply = await dispatch(context, tool["name"], arguments, call_id, sealed)
    is_owner = context.user is not None and context.user.id == context.app.owner_id
    return modern_result(context, tool_result(tool, reply, with_logs=is_owner))


@contextlib.asynccontextmanager
async def in_flight(context: Context, admission: Admission) -> AsyncIterator[None]:
    """Hold one of the caller's running-call slots, so one caller cannot fill every worker."""
    cap = context.gateway.settings.max_calls_in_flight_per_caller
    if not cap:
        yield
        return
    key = f"ultralight:inflight:{context.caller.who}"
    async with context.gateway.redis.pipeline(transaction=False) as pipe:
        pipe.incr(key)
        pipe.expire(key, int(context.gateway.settings.max_call_timeout_s) + 60)
        running, _ = await pipe.execute()
    try:
        if running > cap:
            await context.gateway.gates.refund(admission.counted)
            raise RpcFailure(LIMITED, f"you already have {cap} calls running; wait for one to "
                             "finish", 429, headers={"Retry-After": "1"},
                             data={"reason": "too_many_running", "retry_after_s": 1})
        yield
    finally:
        await asyncio.shield(context.gateway.redis.decr(key))


async def dispatch(context: Context, function: str, arguments: dict[str, Any], call_id: str,
                   sealed: str | None) -> CallReply:
    gateway = context.gateway
    user = context.user
    job = CallJob(
        call_id=call_id,
        app_id=context.app.id,
        app_name=context.app.name,
        version=context.version.version,
        code_hash=context.version.code_hash,
        function=function,
        args=arguments,
        deadline=time.time() + gateway.settings.call_timeout_s,
        user={"id": user.id, "email": user.email, "tier": user.tier} if user else None,
        sealed=sealed,
        caller_apps=sorted(context.principal.apps)
        if context.principal and context.principal.apps is not None else None,
    )
    started = time.perf_counter()
    context.timing["pre"] = (started - context.started) * 1000
    try:
        reply = await gateway.dispatcher.call(job)
    except DispatchError as exc:
        if exc.outcome in ("unavailable", "overloaded"):
            raise RpcFailure(INTERNAL_ERROR, str(exc), 503,
                             headers={"Retry-After": "1"}) from None
        reply = CallReply(exc.outcome, error=str(exc))
    elapsed = time.perf_counter() - started
    log.info("call", request_id=job.call_id, app_id=job.app_id, app=job.app_name,
             version=job.version, function=function, outcome=reply.outcome,
             elapsed_ms=round(elapsed * 1000, 2), user_id=user.id if user else None)
    record_call(context, job, reply, elapsed)
    return reply


def record_call(context: Context, job: CallJob, reply: CallReply, elapsed_s: float) -> None:
    """One call-log entry and the gateway's metrics, without making the caller wait."""
    ops = context.request.app[OPS]
    ops.metrics.observe(reply.outcome, elapsed_s)
    address = context.caller.address
    ops.calls.record(CallRecord.build(
        args=job.args, value=reply.value, ok=reply.ok, secrets=context.secret_values,
        request_id=job.call_id, at=time.time() - elapsed_s, app_id=job.app_id,
        app_name=job.app_name, version=job.version, code_hash=job.code_hash,
        function=job.function, user_id=context.user.id if context.user else None,
        source=str(address) if address else None,
        session_id=context.session.id if context.session else None, seq=None,
        outcome=reply.outcome, error=reply.error, duration_ms=round(elapsed_s * 1000, 3),
        worker_id=reply.worker_id or None,
        ai_usage=orjson.dumps(reply.ai_usage).decode() if reply.ai_usage else None))


HANDSHAKE_METHODS = {
    "initialize": initialize,
    "ping": ping,
    "tools/list": list_tools,
    "tools/call": call_tool,
    "server/discover": discover,
}
MODERN_METHODS = {
    "server/discover": discover,
    "tools/list": list_tools,
    "tools/call": call_tool,
}
