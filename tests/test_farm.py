"""Calls through real gateways, Redis and worker processes when apps and workers misbehave."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import Farm, RedisServer, rpc_body, start_farm, wait_until

MISBEHAVING = Path(__file__).parent / "apps" / "misbehaving.py"
MODERN = "2026-07-28"


def call(url: str, token: str | None, app: str, tool: str, arguments: dict[str, Any],
         timeout: float = 60) -> dict[str, Any]:
    """One stateless tools/call; the JSON-RPC response body."""
    import httpx2

    params = {"name": tool, "arguments": arguments,
              "_meta": {"io.modelcontextprotocol/protocolVersion": MODERN,
                        "io.modelcontextprotocol/clientCapabilities": {}}}
    headers = {"Content-Type": "application/json", "Accept": "application/json",
               "MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": tool}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    response = httpx2.post(f"{url}/mcp/{app}", content=rpc_body("tools/call", params),
                           headers=headers, timeout=timeout)
    assert response.status_code == 200, response.text
    return orjson.loads(response.content)


def result_text(body: dict[str, Any]) -> str:
    return " ".join(c["text"] for c in body["result"]["content"])


@pytest.fixture(scope="module")
def misbehaving(farm: Farm) -> str:
    farm.deploy(MISBEHAVING, "misbehaving")
    return "misbehaving"


def test_endless_loop_times_out_while_a_concurrent_call_completes(
        farm: Farm, misbehaving: str) -> None:
    """`while True: pass` ends in a clear timeout error; a call started beside it still works."""
    spun: dict[str, Any] = {}
    spinner = threading.Thread(target=lambda: spun.update(
        call(farm.url, farm.token, misbehaving, "spin", {})))
    spinner.start()
    time.sleep(0.5)
    bystander = call(farm.url, farm.token, misbehaving, "double", {"x": 21})
    spinner.join(60)

    assert bystander["result"]["structuredContent"] == {"result": 42}
    assert spun["result"]["isError"] is True
    assert "ran longer than" in result_text(spun) and "stopped" in result_text(spun)
    assert spun["result"]["_meta"]["ultralight/outcome"] == "timeout"


def test_memory_bomb_fails_clearly_and_the_worker_keeps_serving(
        farm: Farm, misbehaving: str) -> None:
    """Allocating without end is stopped with a memory error; the next call is served."""
    bomb = call(farm.url, farm.token, misbehaving, "hog_memory", {})
    after = call(farm.url, farm.token, misbehaving, "double", {"x": 2})

    assert bomb["result"]["isError"] is True
    assert "out of memory" in result_text(bomb)
    assert bomb["result"]["_meta"]["ultralight/outcome"] == "memory_limit"
    assert after["result"]["structuredContent"] == {"result": 4}


def test_output_is_captured_and_capped_for_the_owner(farm: Farm, misbehaving: str) -> None:
    """print output comes back to the owner in _meta, capped, and never to other callers."""
    body = call(farm.url, farm.token, misbehaving, "shout", {"times": 20_000})

    logs = body["result"]["_meta"]["ultralight/logs"]
    assert body["result"]["structuredContent"] == {"result": "done"}
    assert logs.startswith("line 0\n")
    assert "[logs truncated:" in logs
    assert len(logs) < 70_000


def test_gateway_and_worker_log_one_event_per_call(farm: Farm, misbehaving: str) -> None:
    """Each call is one structured event at the gateway and one at the worker, secrets-free."""
    call(farm.url, farm.token, misbehaving, "double", {"x": 5})
    wait_until(lambda: farm.logs().count('"function": "double"') >= 2, 10, "no call events")

    events = [orjson.loads(line) for line in farm.logs().splitlines()
              if line.startswith("{") and '"event": "call"' in line]
    by_logger = {e["logger"] for e in events if e["function"] == "double"}
    assert by_logger == {"gateway.mcp", "workers.farm"}
    for event in events:
        assert {"request_id", "app", "version", "function", "elapsed_ms", "outcome"} <= set(event)
    assert farm.token not in farm.logs()


@pytest.fixture()
def lonely_farm(redis_server: RedisServer) -> Iterator[Farm]:
    """A farm whose tests kill and start workers themselves."""
    running = start_farm(redis_server.url, settings={"ULTRALIGHT_CALL_TIMEOUT_S": "20",
                                                      "ULTRALIGHT_WORKER_POLL_S": "30"})
    running.deploy(MISBEHAVING, "misbehaving")
    yield running
    running.stop()


def test_worker_killed_mid_call_gives_a_clear_error_and_no_second_run(lonely_farm: Farm) -> None:
    """SIGKILL of the worker: the caller hears of it well before the deadline; no re-run."""
    farm = lonely_farm
    outcome: dict[str, Any] = {}

    def slow_call() -> None:
        started = time.monotonic()
        outcome.update(call(farm.url, farm.token, "misbehaving", "count_and_sleep",
                            {"seconds": 8}))
        outcome["took"] = time.monotonic() - started

    before = _claims(farm)
    caller = threading.Thread(target=slow_call)
    caller.start()
    wait_until(lambda: bool(_claims(farm) - before), 10, "the call did not start")
    time.sleep(1.0)
    farm.workers[0].send_signal(signal.SIGKILL)
    caller.join(30)
    farm.add_worker()
    time.sleep(2)

    assert outcome["result"]["isError"] is True
    assert "worker running this call stopped" in result_text(outcome)
    assert outcome["took"] < 12
    runs = call(farm.url, farm.token, "misbehaving", "runs", {})
    assert runs["result"]["structuredContent"] == {"result": 1}


def _claims(farm: Farm) -> set[bytes]:
    """The calls some worker has claimed (their claim keys in Redis)."""
    import redis

    client = redis.Redis.from_url(farm.env["ULTRALIGHT_REDIS_URL"])
    try:
        return set(client.scan_iter("ultralight:claim:*"))
    finally:
        client.close()


def test_idle_worker_is_woken_on_enqueue_not_by_polling(lonely_farm: Farm) -> None:
    """With a 30 s safety poll, an idle worker still answers at once: enqueue wakes it."""
    farm = lonely_farm
    time.sleep(1.5)
    started = time.monotonic()
    body = call(farm.url, farm.token, "misbehaving", "double", {"x": 1})
    took = time.monotonic() - started

    assert body["result"]["structuredContent"] == {"result": 2}
    assert took < 10


def test_call_with_no_worker_times_out_and_is_abandoned(redis_server: RedisServer) -> None:
    """No worker running: the caller gets a timeout at the deadline and the job leaves the queue."""
    farm = start_farm(redis_server.url, workers=0,
                      settings={"ULTRALIGHT_CALL_TIMEOUT_S": "2"})
    try:
        farm.deploy(MISBEHAVING, "misbehaving")
        body = call(farm.url, farm.token, "misbehaving", "count_and_sleep", {"seconds": 0})
        farm.add_worker()
        wait_until(lambda: '"worker_started"' in farm.logs(), 30, "worker did not start")
        time.sleep(1.0)
        runs = call(farm.url, farm.token, "misbehaving", "runs", {})
    finally:
        farm.stop()

    assert body["result"]["isError"] is True
    assert "deadline" in result_text(body) and "abandoned" in result_text(body)
    assert runs["result"]["structuredContent"] == {"result": 0}


def test_a_session_opened_on_one_gateway_is_served_by_another(redis_server: RedisServer) -> None:
    """Sessions live in Redis: initialize on gateway A, then list and call tools on gateway B."""
    import httpx2

    farm = start_farm(redis_server.url, gateways=2)
    try:
        farm.deploy(MISBEHAVING, "misbehaving")
        (url_a, _), (url_b, _) = farm.gateways
        headers = {"Content-Type": "application/json", "Accept": "application/json",
                   "Authorization": f"Bearer {farm.token}"}
        init = httpx2.post(f"{url_a}/mcp/misbehaving", headers=headers, content=rpc_body(
            "initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                           "clientInfo": {"name": "t", "version": "1"}}))
        session = init.headers["Mcp-Session-Id"]
        headers |= {"Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-06-18"}
        listed = httpx2.post(f"{url_b}/mcp/misbehaving", headers=headers,
                             content=rpc_body("tools/list", id=2))
        called = httpx2.post(f"{url_b}/mcp/misbehaving", headers=headers, content=rpc_body(
            "tools/call", {"name": "double", "arguments": {"x": 4}}, id=3), timeout=60)
    finally:
        farm.stop()

    assert init.status_code == 200
    assert listed.status_code == 200 and "double" in listed.text
    assert orjson.loads(called.content)["result"]["structuredContent"] == {"result": 8}
