"""A small synchronous client of the gateway, for the command line and scripts."""

from __future__ import annotations

import base64
import itertools
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote

import orjson

from gateway import GatewayError

MODERN = "2026-07-28"
_ids = itertools.count(1)


class ClientError(GatewayError):
    """The gateway refused or could not be reached; the message is the gateway's own."""


class GatewayClient:
    def __init__(self, url: str, token: str | None, timeout_s: float = 330.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    def _send(self, method: str, path: str, body: Any = None,
              headers: dict[str, str] | None = None) -> tuple[int, Any]:
        try:
            data = None if body is None else orjson.dumps(body)
        except TypeError as exc:
            raise ClientError(f"cannot send that request: {exc}") from None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        for key, value in (headers or {}).items():
            request.add_header(key, value)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.status, _decode(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, _decode(exc.read())
        except (urllib.error.URLError, OSError) as exc:
            raise ClientError(f"cannot reach the gateway at {self.url}: {exc}") from exc
        except ValueError as exc:
            # http.client refuses header values with line breaks (a token pasted with one).
            raise ClientError(f"cannot send that request: {exc}; check ULTRALIGHT_TOKEN and "
                              "ULTRALIGHT_URL") from None

    def api(self, method: str, path: str, body: Any = None) -> Any:
        status, payload = self._send(method, path, body)
        if status >= 400:
            error = payload.get("error", {}) if isinstance(payload, dict) else {}
            raise ClientError(f"{status}: {error.get('message', payload)}")
        return payload

    def rpc(self, app: str, method: str, params: dict[str, Any] | None = None) -> Any:
        """One stateless MCP request (protocol revision 2026-07-28); returns its result."""
        params = dict(params or {})
        params["_meta"] = {
            "io.modelcontextprotocol/protocolVersion": MODERN,
            "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "ultralight-cli", "version": "1"},
        }
        headers = {"MCP-Protocol-Version": MODERN, "Mcp-Method": method}
        if method == "tools/call":
            headers["Mcp-Name"] = header_value(str(params.get("name", "")))
        body = {"jsonrpc": "2.0", "id": next(_ids), "method": method, "params": params}
        status, payload = self._send("POST", f"/mcp/{quote(app, safe='')}", body, headers)
        if not isinstance(payload, dict):
            raise ClientError(f"{status}: unexpected answer from the gateway")
        if "error" in payload:
            raise ClientError(f"{status}: {payload['error'].get('message')}")
        return payload.get("result")


def header_value(text: str) -> str:
    """Header-safe form of a name: non-ASCII goes as ``=?base64?...?=``."""
    if text.isascii():
        return text
    return "=?base64?" + base64.b64encode(text.encode()).decode() + "?="


def _decode(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", errors="replace")
