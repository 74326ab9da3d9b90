"""The ``ultralight`` module an app imports inside its sandbox.

Every data call is a request to the worker over the sandbox's pipe: the app never holds a database
connection, a network socket or a secret it was not meant to read.
"""

from __future__ import annotations

import datetime as _dt
import os as _os
import time as _time
import types as _types
from typing import Any

__all__ = [
    "AiError",
    "CallError",
    "HttpError",
    "ai",
    "call",
    "PlatformError",
    "SdkError",
    "env",
    "http",
    "keys",
    "load",
    "load_many",
    "new_id",
    "now",
    "query",
    "remove",
    "remove_many",
    "store",
    "store_many",
    "user",
]

# Filled in by the runtime before the app module is imported.
user: dict[str, Any] | None = None
env: _types.MappingProxyType[str, str] = _types.MappingProxyType({})
_request: Any = None


class PlatformError(RuntimeError):
    """The platform could not serve an SDK call."""


class SdkError(ValueError):
    """The platform refused an SDK call: a bad key, filter or value. The message says why."""


class HttpError(SdkError):
    """An outbound request was refused by the platform's policy or failed."""


class AiError(SdkError):
    """A chat completion could not be made (no key for the provider, or the provider refused)."""


class CallError(Exception):
    """A tool called with ``call`` failed, was refused, or the call chain went too deep."""


def _call(op: str, **payload: Any) -> Any:
    if _request is None:
        raise PlatformError("ultralight SDK calls only work inside a running call")
    return _request(op, payload)


def store(key: str, value: Any) -> None:
    """Save one JSON value under ``key`` in the caller's space of this app."""
    _call("store", key=key, value=value)


def load(key: str, default: Any = None) -> Any:
    """The value under ``key``, or ``default`` when there is none."""
    value = _call("load", key=key)
    return default if value is None else value


def remove(key: str) -> bool:
    """Delete ``key``; true when it existed."""
    return bool(_call("remove", key=key))


def keys(prefix: str = "") -> list[str]:
    """Every key under ``prefix``, sorted."""
    return list(_call("keys", prefix=prefix))


def query(
    prefix: str = "",
    where: dict[str, Any] | None = None,
    order_by: str | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """A filtered, sorted page of ``{key, value, updated_at}`` under ``prefix``.

    ``where`` maps dotted paths into the value to a value or to operators (``eq``, ``ne``, ``lt``,
    ``lte``, ``gt``, ``gte``, ``in``, ``contains``, ``exists``); ``order_by`` is ``key``,
    ``updated_at`` or a dotted path, with a leading ``-`` for descending.
    """
    return list(
        _call("query", prefix=prefix, where=where, order_by=order_by, limit=limit, offset=offset)
    )


def store_many(items: dict[str, Any]) -> None:
    """Save several keys at once."""
    _call("store_many", items=dict(items))


def load_many(keys: list[str]) -> dict[str, Any]:
    """The values of several keys; missing keys are left out."""
    return dict(_call("load_many", keys=list(keys)))


def remove_many(keys: list[str]) -> int:
    """Delete several keys; how many existed."""
    return int(_call("remove_many", keys=list(keys)))


def new_id() -> str:
    """A unique id that sorts by creation time (milliseconds, then randomness)."""
    return f"{int(_time.time() * 1000):012x}{_os.urandom(8).hex()}"


def now() -> _dt.datetime:
    """The current time, timezone-aware, in UTC."""
    return _dt.datetime.now(_dt.timezone.utc)


class Response:
    """What ``http`` requests return."""

    def __init__(self, status: int, headers: dict[str, str], content: bytes, url: str) -> None:
        self.status_code = status
        self.headers = headers
        self.content = content
        self.url = url

    @property
    def ok(self) -> bool:
        return self.status_code < 400

    @property
    def text(self) -> str:
        charset = "utf-8"
        for part in self.headers.get("content-type", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name.lower() == "charset" and value:
                charset = value.strip('"')
        try:
            return self.content.decode(charset, errors="replace")
        except LookupError:
            return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        import json

        return json.loads(self.content)

    def raise_for_status(self) -> None:
        if not self.ok:
            raise HttpError(f"{self.url}: HTTP {self.status_code}")

    def __repr__(self) -> str:
        return f"<Response {self.status_code} {self.url}>"


class _Http:
    """Outbound HTTP, made by the worker on the app's behalf (HTTPS, public addresses only)."""

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        data: bytes | str | None = None,
        json: Any = None,
        timeout: float | None = None,
    ) -> Response:
        import base64

        if json is not None:
            import json as _json

            data = _json.dumps(json)
            headers = {"content-type": "application/json", **(headers or {})}
        body = data.encode("utf-8") if isinstance(data, str) else data
        reply = _call(
            "http",
            method=method.upper(),
            url=url,
            headers=dict(headers or {}),
            body=base64.b64encode(body).decode("ascii") if body is not None else None,
            timeout=timeout,
        )
        content = base64.b64decode(reply["body"])
        return Response(reply["status"], reply["headers"], content, reply["url"])

    def get(self, url: str, **kwargs: Any) -> Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> Response:
        return self.request("POST", url, **kwargs)

    def put(self, url: str, **kwargs: Any) -> Response:
        return self.request("PUT", url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> Response:
        return self.request("DELETE", url, **kwargs)


http = _Http()


def ai(
    messages: list[dict[str, str]],
    model: str | None = None,
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
) -> dict[str, Any]:
    """A chat completion with the calling user's own provider key (which the app never sees).

    Returns ``{"content", "model", "provider", "usage", "cost_usd"}``.
    """
    return dict(_call("ai", messages=list(messages), model=model, max_tokens=max_tokens,
                      temperature=temperature))


def call(app: str, function: str, **args: Any) -> Any:
    """Call another app's tool as the same caller; returns its result or raises its error."""
    return _call("call", app=app, function=function, args=args)
