"""Operating the farm: call log, replay, status, metrics, supervision, overload and faults."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest

from tests.conftest import (
    SHARED_APPS,
    Farm,
    RedisServer,
    rpc_body,
    start_farm,
    start_redis,
    stop_process,
    wait_until,
)
from tests.test_farm import MISBEHAVING, call

NOTES_V2 = Path(__file__).parent / "apps" / "notes_v2.py"


@pytest.fixture(scope="module")
def ops_farm(redis_server: RedisServer) -> Iterator[Farm]:
    farm = start_farm(redis_server.url, settings={"ULTRALIGHT_CALL_TIMEOUT_S": "10"})
    yield farm
    farm.stop()


def app_rows(farm: Farm, app: str) -> list[tuple[Any, ...]]:
    """Every stored row of one app, exactly as in the database."""
    apps = {line.split()[0]: line.split()[-1] for line in farm.cli("apps").stdout.splitlines()}
    with sqlite3.connect(farm.data_dir / "ultralight.db") as conn:
        return conn.execute("SELECT app_id, user_id, key, value, updated_at FROM app_data "
                            "WHERE app_id = ? ORDER BY key", (apps[app],)).fetchall()


def logged(farm: Farm, app: str, *extra: str) -> list[dict[str, Any]]:
    return orjson.loads(farm.cli("logs", app, "--json", *extra).stdout)["calls"]


def test_calls_are_logged_with_arguments_outcome_and_caps(ops_farm: Farm) -> None:
    """Each call lands in the log: function, args, outcome, error text; big args are capped."""
    farm = ops_farm
    farm.deploy(SHARED_APPS / "notes.py", "logged-notes")
    call(farm.url, farm.token, "logged-notes", "add_note", {"text": "hello", "tags": ["t"]})
    call(farm.url, farm.token, "logged-notes", "add_note", {"text": " "})
    call(farm.url, farm.token, "logged-notes", "add_note", {"text": "x" * 20_000})
    wait_until(lambda: len(logged(farm, "logged-notes")) >= 3, 15, "calls were not logged")

    calls = logged(farm, "logged-notes")
    failed = logged(farm, "logged-notes", "--outcome", "app_error")
    big = next(c for c in calls if c["args_size"] > 10_000)
    assert {c["function"] for c in calls} == {"add_note"}
    assert failed[0]["error"] == "ValueError: a note needs some text"
    assert big["args_truncated"] is True and big["args"]["ultralight/truncated"] is True
    assert big["args"]["original_bytes"] == big["args_size"]
    assert all(c["result_digest"] for c in calls if c["outcome"] == "ok")
    assert all(c["worker_id"] for c in calls)
    assert farm.token not in farm.logs()


def test_session_sequence_numbers_count_up(ops_farm: Farm) -> None:
    """Calls in one MCP session carry increasing sequence numbers in the log."""
    farm = ops_farm
    farm.deploy(MISBEHAVING, "seq-app")
    headers = {"Content-Type": "application/json", "Accept": "application/json",
               "Authorization": f"Bearer {farm.token}"}
    init = httpx2.post(f"{farm.url}/mcp/seq-app", headers=headers, content=rpc_body(
        "initialize", {"protocolVersion": "2025-11-25", "capabilities": {},
                       "clientInfo": {"name": "t", "version": "1"}}))
    headers |= {"Mcp-Session-Id": init.headers["Mcp-Session-Id"],
                "MCP-Protocol-Version": "2025-11-25"}
    for x in range(3):
        httpx2.post(f"{farm.url}/mcp/seq-app", headers=headers, timeout=60, content=rpc_body(
            "tools/call", {"name": "double", "arguments": {"x": x}}, id=x + 2))
    wait_until(lambda: len(logged(farm, "seq-app")) >= 3, 15, "calls were not logged")

    calls = logged(farm, "seq-app")
    assert sorted(c["seq"] for c in calls) == [1, 2, 3]
    assert len({c["session_id"] for c in calls}) == 1


def test_replay_reports_exactly_what_changed_and_leaves_live_data_alone(ops_farm: Farm,
                                                                       tmp_path: Path) -> None:
    """Replaying notes against a changed version finds the changed results, and nothing else."""
    farm = ops_farm
    farm.deploy(SHARED_APPS / "notes.py", "replay-notes")
    first = call(farm.url, farm.token, "replay-notes", "add_note", {"text": "a", "tags": ["x"]})
    call(farm.url, farm.token, "replay-notes", "add_note", {"text": "b", "pinned": True})
    key = first["result"]["structuredContent"]["key"]
    window_start = time.time()
    for tool, args in (("count_notes", {}), ("find_notes", {"tag": "x"}),
                       ("find_notes", {"pinned_only": True}), ("get_note", {"key": key}),
                       ("count_notes", {})):
        call(farm.url, farm.token, "replay-notes", tool, args)
    wait_until(lambda: len(logged(farm, "replay-notes")) >= 7, 15, "calls were not logged")
    before = app_rows(farm, "replay-notes")
    v2 = farm.deploy(NOTES_V2, "replay-notes", "--draft")

    report_path = tmp_path / "report.json"
    result = farm.cli("replay", "replay-notes", "--version", v2, "--since", str(window_start),
                      "--report", str(report_path), check=False)
    report = json.loads(report_path.read_text())

    assert result.returncode == 1, result.stderr
    assert report["calls"] == 5
    assert report["counts"] == {"same": 3, "different": 2, "newly_failing": 0,
                                "newly_passing": 0, "skipped": 0}
    assert [(d["function"], d["old"]["result"], d["new"]["result"])
            for d in report["differences"]] == [("count_notes", 2, 3)] * 2
    assert "REGRESSED" in result.stdout
    assert app_rows(farm, "replay-notes") == before


def test_writes_during_a_replay_never_reach_live_data(ops_farm: Farm) -> None:
    """Replayed adds and deletes land in a shadow space that is dropped afterwards."""
    farm = ops_farm
    version = farm.deploy(SHARED_APPS / "notes.py", "shadowed-notes")
    first = call(farm.url, farm.token, "shadowed-notes", "add_note", {"text": "keep"})
    key = first["result"]["structuredContent"]["key"]
    call(farm.url, farm.token, "shadowed-notes", "add_note", {"text": "extra"})
    call(farm.url, farm.token, "shadowed-notes", "delete_note", {"key": key})
    call(farm.url, farm.token, "shadowed-notes", "count_notes", {})
    wait_until(lambda: len(logged(farm, "shadowed-notes")) >= 4, 15, "calls were not logged")
    before = app_rows(farm, "shadowed-notes")

    farm.cli("replay", "shadowed-notes", "--version", version, check=False)

    assert app_rows(farm, "shadowed-notes") == before
    with sqlite3.connect(farm.data_dir / "ultralight.db") as conn:
        shadows = conn.execute("SELECT count(*) FROM app_data WHERE app_id LIKE '%@rpl_%'")
        assert shadows.fetchone()[0] == 0


def test_replay_against_the_same_code_reports_no_regression(ops_farm: Farm) -> None:
    """Replaying logged calls against an identical version is all 'same', exit code 0."""
    farm = ops_farm
    version = farm.deploy(MISBEHAVING, "replay-same")
    for x in range(5):
        call(farm.url, farm.token, "replay-same", "double", {"x": x})
    wait_until(lambda: len(logged(farm, "replay-same")) >= 5, 15, "calls were not logged")
    result = farm.cli("replay", "replay-same", "--version", version, check=False)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 same" in result.stdout and "no regressions" in result.stdout


def test_status_and_metrics_describe_the_farm(ops_farm: Farm) -> None:
    """status shows queues, live workers and latency; /metrics speaks Prometheus."""
    farm = ops_farm
    farm.deploy(MISBEHAVING, "status-app")
    call(farm.url, farm.token, "status-app", "double", {"x": 1})
    status = orjson.loads(farm.cli("status", "--json").stdout)
    metrics = httpx2.get(f"{farm.url}/metrics", headers={
        "Authorization": f"Bearer {farm.token}"}).text

    assert farm.env["ULTRALIGHT_QUEUE_NAME"] in status["queues"]
    assert any(w["pid"] == farm.workers[0].pid for w in status["workers"])
    assert status["latency_ms"]["samples"] >= 1 and status["latency_ms"]["p50"] > 0
    assert 'ultralight_gateway_calls_total{outcome="ok"}' in metrics
    assert "ultralight_queue_depth" in metrics
    assert httpx2.get(f"{farm.url}/healthz").status_code == 200
    assert httpx2.get(f"{farm.url}/readyz").status_code == 200


def test_a_deep_queue_gets_503_with_retry_after(redis_server: RedisServer) -> None:
    """With no worker and a shallow queue limit, extra calls are refused at once, not queued."""
    farm = start_farm(redis_server.url, workers=0, settings={
        "ULTRALIGHT_MAX_QUEUE_DEPTH": "2", "ULTRALIGHT_CALL_TIMEOUT_S": "3"})
    try:
        farm.deploy(MISBEHAVING, "deep")
        waiting = [threading.Thread(target=call, args=(farm.url, farm.token, "deep", "double",
                                                        {"x": 1})) for _ in range(3)]
        for thread in waiting:
            thread.start()
        time.sleep(1.0)
        refused = _raw_call(farm, "deep", "double", {"x": 2})
        for thread in waiting:
            thread.join(30)
    finally:
        farm.stop()

    assert refused.status_code == 503
    assert refused.headers["Retry-After"]
    assert "waiting for a worker" in refused.json()["error"]["message"]


def _raw_call(farm: Farm, app: str, tool: str, arguments: dict[str, Any]) -> httpx2.Response:
    params = {"name": tool, "arguments": arguments,
              "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                        "io.modelcontextprotocol/clientCapabilities": {}}}
    return httpx2.post(f"{farm.url}/mcp/{app}", content=rpc_body("tools/call", params),
                       timeout=60, headers={
                           "Content-Type": "application/json", "Accept": "application/json",
                           "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call",
                           "Mcp-Name": tool, "Authorization": f"Bearer {farm.token}"})


def test_supervisor_restarts_a_dead_worker_and_drains_on_sigterm(
        redis_server: RedisServer) -> None:
    """A killed worker process comes back; SIGTERM lets a running call finish, then exits."""
    farm = start_farm(redis_server.url, workers=0, settings={"ULTRALIGHT_CALL_TIMEOUT_S": "20"})
    try:
        farm.deploy(MISBEHAVING, "supervised")
        supervisor = farm.add_worker("--processes", "2")
        wait_until(lambda: farm.logs().count('"worker_started"') >= 2, 30, "workers not up")
        victim = _children(supervisor.pid)[0]
        subprocess.run(["kill", "-9", str(victim)], check=True)
        wait_until(lambda: farm.logs().count('"worker_started"') >= 3, 30, "no restart")

        box: dict[str, Any] = {}
        slow = threading.Thread(target=lambda: box.update(call(
            farm.url, farm.token, "supervised", "count_and_sleep", {"seconds": 2})))
        slow.start()
        time.sleep(1.0)
        supervisor.send_signal(signal.SIGTERM)
        slow.join(30)
        code = supervisor.wait(30)
    finally:
        farm.stop()

    assert '"worker_process_died"' in farm.logs()
    assert box["result"]["structuredContent"] == {"result": 1}
    assert code == 0


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_redis_restart_gives_503_then_recovers(tmp_path: Path) -> None:
    """While Redis is down the gateway answers 503 quickly; afterwards calls work again."""
    redis = start_redis(tmp_path)
    farm = start_farm(redis.url, settings={"ULTRALIGHT_CALL_TIMEOUT_S": "10"})
    try:
        farm.deploy(MISBEHAVING, "flaky")
        assert call(farm.url, farm.token, "flaky", "double", {"x": 1})["result"][
            "structuredContent"] == {"result": 2}
        stop_process(redis.proc)
        started = time.monotonic()
        down = _raw_call(farm, "flaky", "double", {"x": 2})
        took = time.monotonic() - started
        redis = start_redis(tmp_path, port=redis.port)
        wait_until(lambda: _raw_call(farm, "flaky", "double", {"x": 3}).status_code == 200, 30,
                   "the farm did not recover")
        after = _raw_call(farm, "flaky", "double", {"x": 4})
    finally:
        farm.stop()
        stop_process(redis.proc)

    assert down.status_code == 503 and down.headers.get("Retry-After")
    assert took < 5
    assert after.json()["result"]["structuredContent"] == {"result": 8}


def test_sessions_survive_a_gateway_restart(redis_server: RedisServer) -> None:
    """A session opened before a gateway restarts is served after it."""
    farm = start_farm(redis_server.url)
    try:
        farm.deploy(MISBEHAVING, "restart-app")
        headers = {"Content-Type": "application/json", "Accept": "application/json",
                   "Authorization": f"Bearer {farm.token}"}
        init = httpx2.post(f"{farm.url}/mcp/restart-app", headers=headers, content=rpc_body(
            "initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                           "clientInfo": {"name": "t", "version": "1"}}))
        stop_process(farm.gateways[0][1])
        url = farm.add_gateway()
        headers |= {"Mcp-Session-Id": init.headers["Mcp-Session-Id"],
                    "MCP-Protocol-Version": "2025-06-18"}
        listed = httpx2.post(f"{url}/mcp/restart-app", headers=headers,
                             content=rpc_body("tools/list", id=2))
    finally:
        farm.stop()

    assert listed.status_code == 200 and "double" in listed.text


def test_cli_status_without_redis_is_a_clear_error(tmp_path: Path) -> None:
    """status against a Redis that is not there says so, without a traceback."""
    result = subprocess.run([sys.executable, "-m", "gateway", "status", "--redis-url",
                             "redis://127.0.0.1:1/0"], capture_output=True, text=True,
                            timeout=60)

    assert result.returncode == 1
    assert "cannot reach Redis" in result.stderr and "Traceback" not in result.stderr


def test_the_call_log_masks_the_calls_secret_values(ops_farm: Farm) -> None:
    """An app that returns or quotes its env var does not put the value in the call log."""
    farm = ops_farm
    farm.deploy(Path(__file__).parent / "apps" / "leaky.py", "leaky")
    farm.cli("env", "set", "leaky", "API_KEY", "s3cr3t-value-7781")
    shown = call(farm.url, farm.token, "leaky", "reveal", {})
    call(farm.url, farm.token, "leaky", "fail_with_it", {})
    wait_until(lambda: len(logged(farm, "leaky")) >= 2, 15, "calls were not logged")

    text = farm.cli("logs", "leaky", "--json").stdout
    assert shown["result"]["structuredContent"] == {"api_key": "s3cr3t-value-7781"}
    assert "s3cr3t-value-7781" not in text and "[secret]" in text
    with sqlite3.connect(farm.data_dir / "ultralight.db") as conn:
        rows = conn.execute("SELECT result, error FROM call_log WHERE app_name = 'leaky'")
        assert "s3cr3t-value-7781" not in str(rows.fetchall())


def test_one_caller_cannot_fill_every_worker(redis_server: RedisServer) -> None:
    """Past the per-caller cap of running calls a caller gets 429; another caller still runs."""
    farm = start_farm(redis_server.url, settings={
        "ULTRALIGHT_MAX_CALLS_IN_FLIGHT_PER_CALLER": "2", "ULTRALIGHT_CALL_TIMEOUT_S": "20"})
    try:
        farm.deploy(MISBEHAVING, "busy", "--public")
        other = farm.new_token("patient@example.test")
        hogs = [threading.Thread(target=call, args=(farm.url, farm.token, "busy",
                                                     "count_and_sleep", {"seconds": 3}))
                for _ in range(2)]
        for thread in hogs:
            thread.start()
        time.sleep(1.0)
        third = _raw_call(farm, "busy", "double", {"x": 1})
        bystander = call(farm.url, other, "busy", "double", {"x": 2})
        for thread in hogs:
            thread.join(30)
    finally:
        farm.stop()

    assert third.status_code == 429 and third.headers["Retry-After"] == "1"
    assert third.json()["error"]["data"]["reason"] == "too_many_running"
    assert bystander["result"]["structuredContent"] == {"result": 4}
