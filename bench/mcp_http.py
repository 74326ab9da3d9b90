"""Bare stateless MCP calls (revision 2026-07-28) with httpx2, and the times each answer reports.

The official client does more per call than a benchmark needs (validation, typed models), so the
throughput and overhead figures use these bare POSTs; the latency section uses both.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable
from typing import Any

import httpx2
import orjson

from bench import BenchError

MODERN = "2026-07-28"
CLIENT_NAME = "httpx2 (raw stateless POST)"


@dataclasses.dataclass(frozen=True)
class Timed:
    """One call: whether it succeeded, and its times in milliseconds."""

    ok: bool
    client_ms: float
    # The gateway's own view: X-Elapsed-Ms (whole request) and Server-Timing steps.
    gateway_ms: float | None = None
    steps: dict[str, float] = dataclasses.field(default_factory=dict)
    # The worker's view: the sandbox call as the worker timed it.
    worker_ms: float | None = None
    error: str = ""


def http_client(token: str | None, connections: int = 10) -> httpx2.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    limits = httpx2.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx2.AsyncClient(headers=headers, timeout=60, limits=limits, trust_env=False)


class StatelessCaller:
    """Calls one tool of one app over POST /mcp/{app}, one request per call, no session."""

    def __init__(self, http: httpx2.AsyncClient, gateway_url: str, app: str, tool: str) -> None:
        self.http = http
        self.url = f"{gateway_url}/mcp/{app}"
        self.tool = tool
        self.headers = {"Content-Type": "application/json", "Accept": "application/json",
                        "MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call",
                        "Mcp-Name": tool}
        self._ids = itertools.count(1)

    def body(self, arguments: dict[str, Any]) -> bytes:
        return orjson.dumps({
            "jsonrpc": "2.0", "id": next(self._ids), "method": "tools/call",
            "params": {"name": self.tool, "arguments": arguments,
                       "_meta": {"io.modelcontextprotocol/protocolVersion": MODERN,
                                 "io.modelcontextprotocol/clientCapabilities": {}}},
        })

    async def call(self, arguments: dict[str, Any], expect: Any = None) -> Timed:
        content = self.body(arguments)
        started = time.perf_counter()
        try:
            response = await self.http.post(self.url, content=content, headers=self.headers)
        except httpx2.HTTPError as exc:
            return Timed(False, (time.perf_counter() - started) * 1000, error=repr(exc))
        client_ms = (time.perf_counter() - started) * 1000
        gateway_ms = _float(response.headers.get("X-Elapsed-Ms"))
        steps = parse_server_timing(response.headers.get("Server-Timing", ""))
        if response.status_code != 200:
            return Timed(False, client_ms, gateway_ms, steps,
                         error=f"HTTP {response.status_code}: {response.text[:200]}")
        result = orjson.loads(response.content).get("result") or {}
        meta = result.get("_meta") or {}
        worker_ms = _float(meta.get("ultralight/elapsed_ms"))
        if result.get("isError"):
            text = " ".join(c.get("text", "") for c in result.get("content", []))
            return Timed(False, client_ms, gateway_ms, steps, worker_ms, error=text[:200])
        if expect is not None and (result.get("structuredContent") or {}).get("result") != expect:
            return Timed(False, client_ms, gateway_ms, steps, worker_ms,
                         error=f"unexpected result {result.get('structuredContent')!r}")
        return Timed(True, client_ms, gateway_ms, steps, worker_ms)


def parse_server_timing(header: str) -> dict[str, float]:
    """``auth;dur=0.4, gates;dur=0.3`` -> {"auth": 0.4, "gates": 0.3}."""
    steps: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in header.split(","))):
        name, _, rest = part.partition(";")
        for attribute in rest.split(";"):
            key, _, value = attribute.strip().partition("=")
            if key == "dur" and (number := _float(value)) is not None:
                steps[name.strip()] = number
    return steps


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


@dataclasses.dataclass
class Sequential:
    """Calls made one after another: the answered ones, and how many failed."""

    answered: list[Timed] = dataclasses.field(default_factory=list)
    errors: int = 0
    first_error: str = ""

    @property
    def client_ms(self) -> list[float]:
        return [t.client_ms for t in self.answered]

    def note(self) -> str:
        return f"{self.errors} calls failed, first: {self.first_error}" if self.errors else ""


# More failures than this share means the farm is broken, and its figures would mislead.
MAX_FAILED_SHARE = 0.1


async def sequential(caller: StatelessCaller, calls: int, warm_up: int,
                     on_progress: Callable[[int], None] | None = None,
                     arguments: Callable[[int], tuple[dict[str, Any], Any]] | None = None
                     ) -> Sequential:
    """``warm_up`` calls left out, then ``calls`` timed ones; failures are counted, not timed."""
    found = Sequential()
    make = arguments or (lambda n: ({"a": n, "b": 1}, n + 1))
    for number in range(warm_up + calls):
        args, expect = make(number)
        result = await caller.call(args, expect=expect)
        if number < warm_up:
            continue
        if result.ok:
            found.answered.append(result)
        else:
            found.errors += 1
            found.first_error = found.first_error or result.error
            if found.errors > max(2, calls * MAX_FAILED_SHARE):
                raise BenchError(f"{found.errors} of {number - warm_up + 1} calls failed; "
                                 f"first: {found.first_error}")
        if on_progress is not None:
            on_progress(number - warm_up + 1)
    return found
