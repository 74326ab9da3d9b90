"""Conformance of POST, GET and DELETE /mcp/{app} to MCP Streamable HTTP, spoken as raw HTTP.

The handshake era (no MCP-Protocol-Version header, or a 2025 one) opens a session with
``initialize``. The stateless era (``MCP-Protocol-Version: 2026-07-28``) repeats the method, the
tool name and the version in headers and in ``_meta`` on every request, and has no session.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import httpx2
import orjson
import pytest

from tests.conftest import Farm, rpc_body

MODERN = "2026-07-28"
LATEST = "2025-11-25"
HANDSHAKE_VERSIONS = ("2025-03-26", "2025-06-18", "2025-11-25")
META = "io.modelcontextprotocol/"
JSON_HEADERS = {"Content-Type": "application/json",
                "Accept": "application/json, text/event-stream"}
UNITS_TOOLS = {"convert_length", "celsius_to_fahrenheit", "primes_below", "echo"}
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}
MAX_BODY = 1_048_576


# Sending and checking.

def no_traceback(response: httpx2.Response) -> None:
    """Response hook: whatever goes wrong, the caller never sees a Python traceback."""
    response.read()
    assert "Traceback" not in response.text, response.text


def post(client: httpx2.Client, app: str, body: Any,
         headers: dict[str, str] | None = None) -> httpx2.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return client.post(f"/mcp/{app}", content=content, headers={**JSON_HEADERS, **(headers or {})})


def rpc_error(response: httpx2.Response, status: int, code: int, id: Any = None
              ) -> dict[str, Any]:
    """The error object, after checking the status, the code and the echoed id."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert body["jsonrpc"] == "2.0"
    assert body["id"] == id, body
    assert body["error"]["code"] == code, body
    return dict(body["error"])


def rpc_result(response: httpx2.Response, id: Any = 1) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert "error" not in body, body
    assert body["jsonrpc"] == "2.0"
    assert body["id"] == id
    return dict(body["result"])


def accepted(response: httpx2.Response) -> bool:
    return response.status_code == 202 and response.content == b""


def text_of(result: dict[str, Any]) -> str:
    return " ".join(c["text"] for c in result["content"] if c["type"] == "text")


# The two eras.

def initialize_params(version: str) -> dict[str, Any]:
    return {"protocolVersion": version, "capabilities": {},
            "clientInfo": {"name": "raw-test", "version": "1"}}


@dataclasses.dataclass(frozen=True)
class Session:
    """A handshake-era session: the client that opened it and the headers it needs."""

    client: httpx2.Client
    app: str
    id: str
    version: str

    def send(self, body: Any, headers: dict[str, str] | None = None,
             app: str | None = None) -> httpx2.Response:
        session = {"Mcp-Session-Id": self.id, "MCP-Protocol-Version": self.version}
        return post(self.client, app or self.app, body, {**session, **(headers or {})})

    def call(self, method: str, params: dict[str, Any] | None = None, id: Any = 1
             ) -> httpx2.Response:
        return self.send(rpc_body(method, params, id))


def modern_body(method: str, params: dict[str, Any] | None = None, id: Any = 1,
                version: str = MODERN) -> dict[str, Any]:
    meta = {f"{META}protocolVersion": version, f"{META}clientCapabilities": {},
            f"{META}clientInfo": {"name": "raw-test", "version": "1"}}
    return {"jsonrpc": "2.0", "id": id, "method": method,
            "params": {**(params or {}), "_meta": meta}}


def modern_headers(method: str, name: str | None = None) -> dict[str, str]:
    headers = {"MCP-Protocol-Version": MODERN, "Mcp-Method": method}
    if name is not None:
        headers["Mcp-Name"] = name
    return headers


def modern(client: httpx2.Client, app: str, method: str, params: dict[str, Any] | None = None,
           id: Any = 1, headers: dict[str, str] | None = None) -> httpx2.Response:
    """A stateless-era request whose headers agree with its body unless overridden."""
    name = (params or {}).get("name") if method == "tools/call" else None
    stamped = {**modern_headers(method, name), **(headers or {})}
    return post(client, app, modern_body(method, params, id), stamped)


# Fixtures.

@pytest.fixture(scope="module")
def connect(farm: Farm, deployed: dict[str, str]) -> Iterator[Callable[..., httpx2.Client]]:
    """Makes clients, with or without a token, that fail on any response with a traceback."""
    clients: list[httpx2.Client] = []

    def make(token: str | None = None) -> httpx2.Client:
        client = farm.http(token)
        client.event_hooks = {"request": [], "response": [no_traceback]}
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture(scope="module")
def anon(connect: Callable[..., httpx2.Client]) -> httpx2.Client:
    return connect()


@pytest.fixture(scope="module")
def owner(farm: Farm, connect: Callable[..., httpx2.Client]) -> httpx2.Client:
    return connect(farm.token)


@pytest.fixture(scope="module")
def open_session(anon: httpx2.Client) -> Callable[..., Session]:
    """Opens a handshake-era session: initialize, then notifications/initialized."""
    def open_(app: str = "units", version: str = LATEST,
              client: httpx2.Client | None = None) -> Session:
        client = client or anon
        response = post(client, app, rpc_body("initialize", initialize_params(version)))
        result = rpc_result(response)
        session = Session(client, app, response.headers["Mcp-Session-Id"],
                          result["protocolVersion"])
        assert accepted(session.send(INITIALIZED))
        return session

    return open_


@pytest.fixture(scope="module")
def units(open_session: Callable[..., Session]) -> Session:
    """A session on the public units app, shared by the tests that only read."""
    return open_session()


# Handshake era: initialize and the session's methods.

@pytest.mark.parametrize("version", HANDSHAKE_VERSIONS)
def test_initialize_echoes_a_known_version(anon: httpx2.Client, version: str) -> None:
    """initialize answers a supported version with that version, capabilities and a session."""
    response = post(anon, "units", rpc_body("initialize", initialize_params(version), id=7))

    result = rpc_result(response, id=7)
    assert result["protocolVersion"] == version
    assert "tools" in result["capabilities"]
    assert result["serverInfo"]["name"] == "units"
    assert result["serverInfo"]["version"]
    assert len(response.headers["Mcp-Session-Id"]) >= 16


def test_initialize_answers_an_unknown_version_with_the_latest(anon: httpx2.Client) -> None:
    """initialize with a version the server does not know is answered with 2025-11-25."""
    response = post(anon, "units", rpc_body("initialize", initialize_params("2024-01-01")))

    assert rpc_result(response)["protocolVersion"] == LATEST
    assert response.headers["Mcp-Session-Id"]


@pytest.mark.parametrize("method", ["notifications/initialized", "notifications/cancelled",
                                    "notifications/no-such-thing"])
def test_notifications_are_accepted_with_no_body(units: Session, method: str) -> None:
    """Any notification in a session gets 202 Accepted and an empty body."""
    response = units.send({"jsonrpc": "2.0", "method": method, "params": {}})

    assert accepted(response)


@pytest.mark.parametrize("reply", [{"result": {}},
                                   {"error": {"code": -32601, "message": "no sampling here"}}])
def test_a_response_from_the_client_is_accepted(units: Session, reply: dict[str, Any]) -> None:
    """A JSON-RPC response object (result or error) sent by the client gets 202 Accepted."""
    response = units.send({"jsonrpc": "2.0", "id": 99, **reply})

    assert accepted(response)


def test_ping_returns_an_empty_result(units: Session) -> None:
    """ping is answered with an empty object."""
    assert rpc_result(units.call("ping", id="p-1"), id="p-1") == {}


def test_tools_list_names_every_tool(units: Session) -> None:
    """tools/list lists each function with an object input schema."""
    tools = rpc_result(units.call("tools/list"))["tools"]

    assert {t["name"] for t in tools} == UNITS_TOOLS
    assert all(t["inputSchema"]["type"] == "object" for t in tools)


def test_tools_call_on_the_public_app(units: Session) -> None:
    """A public app runs a tool for a caller with no token."""
    params = {"name": "celsius_to_fahrenheit", "arguments": {"celsius": 100}}

    result = rpc_result(units.call("tools/call", params, id=3), id=3)

    assert result["isError"] is False
    assert result["structuredContent"] == {"result": 212.0}


def test_tools_call_on_the_private_app(open_session: Callable[..., Session],
                                       owner: httpx2.Client) -> None:
    """The owner's session on the private notes app runs its tools."""
    notes = open_session("notes", client=owner)

    added = rpc_result(notes.call("tools/call", {"name": "add_note",
                                                 "arguments": {"text": "hello"}}))
    key = added["structuredContent"]["key"]
    fetched = rpc_result(notes.call("tools/call", {"name": "get_note", "arguments": {"key": key}}))

    assert fetched["structuredContent"]["text"] == "hello"


# Malformed messages.

def test_invalid_json_is_a_parse_error(units: Session) -> None:
    """A body that is not JSON gets 400 with -32700 and a null id."""
    rpc_error(units.send(b'{"jsonrpc": "2.0", "id": 1, "method": '), 400, -32700)


# Each shape, and the id its error must echo: the message's when it is a string or an integer.
INVALID_SHAPES: dict[str, tuple[Any, Any]] = {
    "number": (42, None),
    "string": ("tools/list", None),
    "null": (None, None),
    "no jsonrpc": ({"id": 1, "method": "ping"}, 1),
    "jsonrpc 1.0": ({"jsonrpc": "1.0", "id": "a", "method": "ping"}, "a"),
    "method not a string": ({"jsonrpc": "2.0", "id": 2, "method": 7}, 2),
    "id a bool": ({"jsonrpc": "2.0", "id": True, "method": "ping"}, None),
    "id an object": ({"jsonrpc": "2.0", "id": {"n": 1}, "method": "ping"}, None),
}


@pytest.mark.parametrize("shape", INVALID_SHAPES)
def test_invalid_request_shapes_in_a_session(units: Session, shape: str) -> None:
    """A message that is not a JSON-RPC 2.0 request gets 400 and -32600."""
    message, id = INVALID_SHAPES[shape]

    rpc_error(units.send(message), 400, -32600, id)


@pytest.mark.parametrize("shape", INVALID_SHAPES)
def test_invalid_request_shapes_stateless(anon: httpx2.Client, shape: str) -> None:
    """A stateless message that is not a JSON-RPC 2.0 request gets 400 and -32600."""
    message, id = INVALID_SHAPES[shape]

    response = post(anon, "units", message, modern_headers("ping"))

    rpc_error(response, 400, -32600, id)


@pytest.mark.parametrize("message", [
    {"jsonrpc": "2.0", "id": True, "method": "tools/list"},
    {"jsonrpc": "2.0", "id": {"n": 1}, "method": "tools/list"},
    {"jsonrpc": "2.0", "id": [1], "method": "tools/list"},
])
def test_an_invalid_id_is_never_echoed(anon: httpx2.Client, message: dict[str, Any]) -> None:
    """Errors raised before dispatch (session, version, auth) answer an invalid id with null."""
    rpc_error(post(anon, "units", message), 400, -32600)
    rpc_error(post(anon, "units", message, {"MCP-Protocol-Version": "1999-01-01"}), 400, -32022)
    rpc_error(post(anon, "notes", message), 401, -32600)


# Batches.

BATCH = [
    {"jsonrpc": "2.0", "id": 1, "method": "ping"},
    {"jsonrpc": "2.0", "method": "notifications/progress", "params": {}},
    {"jsonrpc": "2.0", "id": "two", "method": "tools/list"},
]


@pytest.mark.parametrize("version", ["2025-06-18", "2025-11-25"])
def test_batches_are_rejected_after_2025_03_26(open_session: Callable[..., Session],
                                               version: str) -> None:
    """Sessions on versions without JSON-RPC batching reject an array with 400 and -32600."""
    session = open_session(version=version)

    rpc_error(session.send(BATCH), 400, -32600)


def test_batches_are_rejected_in_the_stateless_era(anon: httpx2.Client) -> None:
    """A stateless request may not be a batch."""
    batch = [modern_body("tools/list", id=1), modern_body("tools/list", id=2)]

    rpc_error(post(anon, "units", batch, modern_headers("tools/list")), 400, -32600)


def test_a_batch_is_answered_on_2025_03_26(open_session: Callable[..., Session]) -> None:
    """A 2025-03-26 batch gets an array with one response per request, none for notifications."""
    session = open_session(version="2025-03-26")

    response = session.send(BATCH)

    assert response.status_code == 200, response.text
    replies = {reply["id"]: reply for reply in response.json()}
    assert set(replies) == {1, "two"}
    assert replies[1]["result"] == {}
    assert {t["name"] for t in replies["two"]["result"]["tools"]} == UNITS_TOOLS


def test_a_batch_of_notifications_is_accepted(open_session: Callable[..., Session]) -> None:
    """A 2025-03-26 batch holding only notifications and responses gets 202 and no body."""
    session = open_session(version="2025-03-26")
    batch = [INITIALIZED, {"jsonrpc": "2.0", "id": 5, "result": {}}]

    assert accepted(session.send(batch))


def test_an_empty_batch_is_invalid(open_session: Callable[..., Session]) -> None:
    """An empty array is not a valid batch, even on 2025-03-26."""
    session = open_session(version="2025-03-26")

    rpc_error(session.send([]), 400, -32600)


def test_an_invalid_member_of_a_batch_gets_its_own_error(
        open_session: Callable[..., Session]) -> None:
    """Per JSON-RPC 2.0, a bad batch member gets an error response; the others still run."""
    session = open_session(version="2025-03-26")
    batch = [{"jsonrpc": "2.0", "id": 1, "method": "ping"}, 42,
             {"jsonrpc": "1.0", "id": 3, "method": "ping"}]

    response = session.send(batch)

    assert response.status_code == 200, response.text
    replies = response.json()
    assert replies[0] == {"jsonrpc": "2.0", "id": 1, "result": {}}
    assert [(r["id"], r["error"]["code"]) for r in replies[1:]] == [(None, -32600), (3, -32600)]


# Methods, tools and arguments.

def test_an_unknown_method_in_a_session(units: Session) -> None:
    """In the handshake era an unknown method is -32601 in a 200 response."""
    rpc_error(units.call("resources/list", id=11), 200, -32601, 11)


def test_an_unknown_method_stateless(anon: httpx2.Client) -> None:
    """In the stateless era an unknown method is -32601 with 404."""
    rpc_error(modern(anon, "units", "resources/list", id=12), 404, -32601, 12)


def test_an_unknown_tool_in_a_session(units: Session) -> None:
    """Calling a tool the app does not have is -32602 for that request's id."""
    error = rpc_error(units.call("tools/call", {"name": "nope", "arguments": {}}, id=13),
                      200, -32602, 13)

    assert "nope" in error["message"]


def test_an_unknown_tool_stateless(anon: httpx2.Client) -> None:
    """In the stateless era an unknown tool is -32602 with 400."""
    rpc_error(modern(anon, "units", "tools/call", {"name": "nope"}, id=14), 400, -32602, 14)


BAD_ARGUMENTS = {"name": "convert_length",
                 "arguments": {"value": "far", "from_unit": "km", "to_unit": "mi"}}


def test_invalid_arguments_are_a_tool_error_on_2025_11_25(units: Session) -> None:
    """From 2025-11-25 on, arguments that fail the schema give a tool result with isError."""
    result = rpc_result(units.call("tools/call", BAD_ARGUMENTS))

    assert result["isError"] is True
    assert "value" in text_of(result) and "far" in text_of(result)


def test_invalid_arguments_are_a_tool_error_stateless(anon: httpx2.Client) -> None:
    """In the stateless era invalid arguments give a complete tool result with isError."""
    result = rpc_result(modern(anon, "units", "tools/call", BAD_ARGUMENTS))

    assert result["resultType"] == "complete"
    assert result["isError"] is True
    assert "value" in text_of(result) and "far" in text_of(result)


def test_invalid_arguments_are_invalid_params_on_2025_06_18(
        open_session: Callable[..., Session]) -> None:
    """Before 2025-11-25, arguments that fail the schema are a -32602 protocol error."""
    session = open_session(version="2025-06-18")

    error = rpc_error(session.call("tools/call", BAD_ARGUMENTS, id=15), 200, -32602, 15)

    assert "value" in error["message"] and "far" in error["message"]


def test_lists_sent_as_json_strings_are_decoded(open_session: Callable[..., Session],
                                               owner: httpx2.Client) -> None:
    """A list argument sent as a JSON string arrives in the function as the list."""
    notes = open_session("notes", client=owner)
    arguments = {"text": "tagged", "tags": '["b","a"]'}

    added = rpc_result(notes.call("tools/call", {"name": "add_note", "arguments": arguments}))
    key = added["structuredContent"]["key"]
    fetched = rpc_result(notes.call("tools/call", {"name": "get_note", "arguments": {"key": key}}))

    assert added["isError"] is False
    assert fetched["structuredContent"]["tags"] == ["a", "b"]


def test_params_that_are_not_an_object_are_invalid(units: Session) -> None:
    """params given as an array is -32602."""
    message = {"jsonrpc": "2.0", "id": 16, "method": "tools/list", "params": [1]}

    rpc_error(units.send(message), 200, -32602, 16)


# Sessions.

def test_a_request_without_a_session_is_refused(anon: httpx2.Client) -> None:
    """In the handshake era anything but initialize needs Mcp-Session-Id: 400 and -32600."""
    rpc_error(post(anon, "units", rpc_body("tools/list", id=21)), 400, -32600, 21)


def test_an_unknown_session_is_not_found(anon: httpx2.Client) -> None:
    """A session id the server never issued (or forgot) gets 404."""
    headers = {"Mcp-Session-Id": "0" * 32, "MCP-Protocol-Version": LATEST}

    rpc_error(post(anon, "units", rpc_body("tools/list", id=22), headers), 404, -32600, 22)


def test_a_session_belongs_to_its_app(owner: httpx2.Client,
                                      open_session: Callable[..., Session]) -> None:
    """A session opened on one app is unknown on another app."""
    session = open_session("units", client=owner)

    rpc_error(session.send(rpc_body("tools/list", id=23), app="notes"), 404, -32600, 23)


def test_a_session_belongs_to_its_caller(open_session: Callable[..., Session],
                                         owner: httpx2.Client, anon: httpx2.Client) -> None:
    """A session opened by one caller is unknown to another one."""
    session = open_session("units", client=owner)
    borrowed = dataclasses.replace(session, client=anon)

    rpc_error(borrowed.call("tools/list", id=24), 404, -32600, 24)


def test_delete_ends_the_session(open_session: Callable[..., Session]) -> None:
    """DELETE with the session header gets 204; the session is then unknown."""
    session = open_session()
    headers = {"Mcp-Session-Id": session.id}

    deleted = session.client.delete("/mcp/units", headers=headers)

    assert deleted.status_code == 204
    rpc_error(session.call("tools/list", id=25), 404, -32600, 25)
    rpc_error(session.client.delete("/mcp/units", headers=headers), 404, -32600)


def test_only_its_caller_may_delete_a_session(open_session: Callable[..., Session],
                                              owner: httpx2.Client, anon: httpx2.Client) -> None:
    """DELETE by anyone but the session's caller gets 404 and leaves the session alive."""
    session = open_session("notes", client=owner)

    response = anon.delete("/mcp/notes", headers={"Mcp-Session-Id": session.id})

    rpc_error(response, 404, -32600)
    assert rpc_result(session.call("ping")) == {}


def test_delete_with_a_bad_token_is_unauthorized(open_session: Callable[..., Session],
                                                 connect: Callable[..., httpx2.Client]) -> None:
    """DELETE authenticates like POST: a malformed token gets 401."""
    session = open_session()

    response = connect("nope").delete("/mcp/units", headers={"Mcp-Session-Id": session.id})

    assert rpc_error(response, 401, -32600)["data"]["reason"] == "malformed"


def test_delete_needs_a_session_header(anon: httpx2.Client) -> None:
    """DELETE without Mcp-Session-Id is a bad request."""
    rpc_error(anon.delete("/mcp/units"), 400, -32600)


def test_delete_of_an_unknown_session(anon: httpx2.Client) -> None:
    """DELETE naming a session that does not exist gets 404."""
    rpc_error(anon.delete("/mcp/units", headers={"Mcp-Session-Id": "f" * 32}), 404, -32600)


# Protocol versions and the stateless era.

def test_an_unsupported_protocol_version_header(anon: httpx2.Client) -> None:
    """An unknown MCP-Protocol-Version gets 400 and -32022 listing the supported versions."""
    response = post(anon, "units", rpc_body("tools/list", id=31),
                    {"MCP-Protocol-Version": "1999-01-01"})

    data = rpc_error(response, 400, -32022, 31)["data"]
    assert set(data["supported"]) >= {MODERN, *HANDSHAKE_VERSIONS}
    assert data["requested"] == "1999-01-01"


def test_discover_describes_the_server(anon: httpx2.Client) -> None:
    """server/discover returns a complete, cacheable description and opens no session."""
    response = modern(anon, "units", "server/discover")

    result = rpc_result(response)
    assert "Mcp-Session-Id" not in response.headers
    assert result["resultType"] == "complete"
    assert MODERN in result["supportedVersions"]
    assert "tools" in result["capabilities"]
    assert result["ttlMs"] >= 0
    assert result["cacheScope"] in {"public", "private"}
    assert result["_meta"][f"{META}serverInfo"]["name"] == "units"


def test_stateless_tools_list(anon: httpx2.Client) -> None:
    """Stateless tools/list carries resultType, ttlMs and cacheScope."""
    response = modern(anon, "units", "tools/list")

    result = rpc_result(response)
    assert {t["name"] for t in result["tools"]} == UNITS_TOOLS
    assert result["resultType"] == "complete"
    assert result["ttlMs"] >= 0
    assert result["cacheScope"] in {"public", "private"}
    assert "Mcp-Session-Id" not in response.headers


def test_stateless_tools_call(owner: httpx2.Client) -> None:
    """Stateless tools/call on the private app returns a complete result."""
    response = modern(owner, "notes", "tools/call", {"name": "count_notes", "arguments": {}})

    result = rpc_result(response)
    assert result["resultType"] == "complete"
    assert result["isError"] is False
    assert isinstance(result["structuredContent"]["result"], int)


def without(headers: dict[str, str], name: str) -> dict[str, str]:
    return {key: value for key, value in headers.items() if key != name}


MISMATCHES = {
    "Mcp-Method missing": ("tools/list", without(modern_headers("tools/list"), "Mcp-Method")),
    "Mcp-Method differs": ("tools/list", modern_headers("server/discover")),
    "Mcp-Name missing": ("tools/call", modern_headers("tools/call")),
    "Mcp-Name differs": ("tools/call", modern_headers("tools/call", "primes_below")),
}


@pytest.mark.parametrize("case", MISMATCHES)
def test_headers_must_match_the_body(anon: httpx2.Client, case: str) -> None:
    """Mcp-Method and Mcp-Name must repeat the body: 400 and -32020 otherwise."""
    method, headers = MISMATCHES[case]
    params = {"name": "echo", "arguments": {"message": "x"}} if method == "tools/call" else None

    response = post(anon, "units", modern_body(method, params, id=41), headers)

    rpc_error(response, 400, -32020, 41)


def test_meta_version_must_match_the_header(anon: httpx2.Client) -> None:
    """A _meta protocolVersion different from the header is 400 and -32020."""
    body = modern_body("tools/list", id=42, version=LATEST)

    rpc_error(post(anon, "units", body, modern_headers("tools/list")), 400, -32020, 42)


def test_stateless_notifications_are_accepted(anon: httpx2.Client) -> None:
    """A stateless-era notification gets 202 and no body."""
    body = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {}}

    assert accepted(post(anon, "units", body, modern_headers("notifications/cancelled")))


# HTTP: methods, origins, sizes and media types.

def test_get_is_not_allowed(anon: httpx2.Client) -> None:
    """GET opens no stream: 405 with an Allow header naming POST."""
    response = anon.get("/mcp/units", headers={"Accept": "text/event-stream"})

    assert response.status_code == 405
    assert "POST" in response.headers["Allow"]


def test_get_from_a_foreign_origin_is_forbidden(anon: httpx2.Client) -> None:
    """The Origin check covers GET too: 403 before anything else."""
    response = anon.get("/mcp/units", headers={"Origin": "https://evil.example"})

    rpc_error(response, 403, -32600)


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://[::1"])
def test_a_foreign_origin_is_forbidden(anon: httpx2.Client, origin: str) -> None:
    """A browser page from another origin may not call the endpoint: 403."""
    response = post(anon, "units", rpc_body("initialize", initialize_params(LATEST)),
                    {"Origin": origin})

    rpc_error(response, 403, -32600)


def test_a_loopback_origin_is_allowed(anon: httpx2.Client) -> None:
    """A page served from localhost may call the endpoint."""
    response = post(anon, "units", rpc_body("initialize", initialize_params(LATEST)),
                    {"Origin": "http://localhost:3000"})

    assert rpc_result(response)["protocolVersion"] == LATEST


def oversized_message() -> bytes:
    padding = "x" * MAX_BODY
    return orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping",
                         "params": {"padding": padding}})


def test_an_oversized_body_is_refused(units: Session) -> None:
    """A body over the limit, announced by Content-Length, gets 413."""
    rpc_error(units.send(oversized_message()), 413, -32600)


def test_an_oversized_chunked_body_is_refused(units: Session) -> None:
    """A chunked body that grows over the limit gets 413 too."""
    message = oversized_message()

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(message), 65_536):
            yield message[start:start + 65_536]

    headers = {**JSON_HEADERS, "Mcp-Session-Id": units.id, "MCP-Protocol-Version": LATEST}
    response = units.client.post("/mcp/units", content=chunks(), headers=headers)

    assert "Content-Length" not in response.request.headers
    rpc_error(response, 413, -32600)


def test_a_body_that_is_not_json_typed(units: Session) -> None:
    """Content-Type text/plain gets 415."""
    response = units.send(rpc_body("ping"), {"Content-Type": "text/plain"})

    rpc_error(response, 415, -32600)


def test_an_accept_header_without_json(units: Session) -> None:
    """Accept: text/html only gets 406."""
    response = units.send(rpc_body("ping"), {"Accept": "text/html"})

    rpc_error(response, 406, -32600)


# Authentication and addressing.

def test_a_private_app_needs_a_token(anon: httpx2.Client) -> None:
    """No Authorization on a private app: 401 with a Bearer challenge and reason missing."""
    response = post(anon, "notes", rpc_body("initialize", initialize_params(LATEST), id=51))

    error = rpc_error(response, 401, -32600, 51)
    assert error["data"]["reason"] == "missing"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(("token", "reason"), [
    ("nope", "malformed"),
    ("ul_" + "A" * 32, "unknown"),
])
def test_a_bad_token_is_unauthorized(connect: Callable[..., httpx2.Client], token: str,
                                     reason: str) -> None:
    """A malformed or unknown bearer token gets 401 with the reason."""
    response = post(connect(token), "notes", rpc_body("initialize", initialize_params(LATEST)))

    assert rpc_error(response, 401, -32600, 1)["data"]["reason"] == reason
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_another_users_token_is_forbidden(farm: Farm,
                                          connect: Callable[..., httpx2.Client]) -> None:
    """A valid token of someone who does not own the private app gets 403."""
    stranger = connect(farm.new_token("someone@example.test"))

    response = post(stranger, "notes", rpc_body("initialize", initialize_params(LATEST)))

    rpc_error(response, 403, -32600, 1)


def test_an_unknown_app_is_not_found(owner: httpx2.Client) -> None:
    """An app name nobody deployed gets 404."""
    response = post(owner, "no-such-app", rpc_body("initialize", initialize_params(LATEST)))

    rpc_error(response, 404, -32600, 1)


@pytest.mark.parametrize("path", ["/mcp/units", "/mcp/units/"])
def test_both_paths_answer_without_redirect(anon: httpx2.Client, path: str) -> None:
    """The endpoint answers with and without a trailing slash, never with a redirect."""
    response = anon.post(path, content=rpc_body("initialize", initialize_params(LATEST)),
                         headers=JSON_HEADERS)

    assert response.status_code == 200
    assert rpc_result(response)["protocolVersion"] == LATEST


def test_an_app_is_addressed_by_its_id(farm: Farm, anon: httpx2.Client) -> None:
    """/mcp/{id} serves the same app as /mcp/{name}, sessions included."""
    rows = [line.split() for line in farm.cli("apps").stdout.splitlines()]
    app_id = next(row[3] for row in rows if row[0] == "units")

    response = post(anon, app_id, rpc_body("initialize", initialize_params(LATEST)))
    session = Session(anon, app_id, response.headers["Mcp-Session-Id"], LATEST)

    assert rpc_result(response)["serverInfo"]["name"] == "units"
    tools = rpc_result(session.call("tools/list"))["tools"]
    assert {t["name"] for t in tools} == UNITS_TOOLS
    assert rpc_result(session.send(rpc_body("tools/list"), app="units"))["tools"] == tools


# Robustness.

HOSTILE = {
    "not UTF-8": b"\xff\xfe{}",
    "deeply nested": b"[" * 5000 + b"]" * 5000,
    "huge id": b'{"jsonrpc": "2.0", "id": 1e400, "method": "ping"}',
    "tool name not a string": {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                               "params": {"name": 5}},
    "arguments not an object": {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                                "params": {"name": "echo", "arguments": "hi"}},
    "nested initialize params": {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                                 "params": {"protocolVersion": {"a": [1]}, "clientInfo": 7}},
}


@pytest.mark.parametrize("case", HOSTILE)
def test_odd_messages_get_json_rpc_answers(units: Session, case: str) -> None:
    """Odd but parseable-looking bodies get a JSON-RPC answer below 500, never a crash."""
    response = units.send(HOSTILE[case])

    assert response.status_code < 500, response.text
    assert response.json()["jsonrpc"] == "2.0"
