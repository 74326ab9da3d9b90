"""How much: per-caller rate limits, weekly quotas by tier and the owner's app limits, counted
in one Redis shared by two gateways, refused with 429 and Retry-After, and refused with 503
(fail closed) when Redis cannot answer."""

from __future__ import annotations

import datetime
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from redis.asyncio import Redis

from gateway.limits import Counter, Counters, LimitExceeded, LimitsUnavailable, window
from tests.conftest import (
    REPO,
    SHARED_APPS,
    Farm,
    RedisServer,
    modern_call,
    rpc_body,
    start_farm,
    start_redis,
    stop_process,
    wait_until,
)

LIMITS = {
    "ULTRALIGHT_CALL_TIMEOUT_S": "6",
    "ULTRALIGHT_RATE_LIMIT_CALL_PER_MIN": "5",
    "ULTRALIGHT_RATE_LIMIT_LIST_PER_MIN": "4",
    "ULTRALIGHT_RATE_LIMIT_INITIALIZE_PER_MIN": "3",
    "ULTRALIGHT_WEEKLY_QUOTAS": "anonymous:1000,free:1000,tiny:3",
}


@pytest.fixture(scope="module")
def farm(redis_server: RedisServer) -> Iterator[Farm]:
    """Two gateways with small limits on one Redis, and one worker."""
    running = start_farm(redis_server.url, gateways=2, settings=LIMITS)
    running.deploy(SHARED_APPS / "units.py", "counted", "--public")
    yield running
    running.stop()


def send(farm: Farm, token: str | None, method: str = "tools/call", app: str = "counted",
         gateway: int = 0) -> httpx2.Response:
    params = {"name": "echo", "arguments": {"message": "x"}} if method == "tools/call" else None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx2.Client(base_url=farm.gateways[gateway][0], timeout=30) as client:
        return modern_call(client, app, method, params, headers)


INITIALIZE = {"protocolVersion": "2025-11-25", "capabilities": {},
              "clientInfo": {"name": "limits-test", "version": "1"}}


def fresh_minute(needed_s: float = 8.0) -> None:
    """Wait for the next minute when this one is about to end, so a window does not reset
    halfway through a test."""
    left = 60 - time.time() % 60
    if left < needed_s:
        time.sleep(left + 0.05)


def limited(response: httpx2.Response, reason: str) -> dict[str, Any]:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["data"]["reason"] == reason, error
    assert int(response.headers["Retry-After"]) == error["data"]["retry_after_s"]
    return dict(error)


def seconds_until(moment: datetime.datetime) -> int:
    return math.ceil(moment.timestamp() - time.time())


# Rate limits.

def test_a_rate_limit_is_shared_by_two_gateways(farm: Farm) -> None:
    """Five calls a minute in all, wherever they land; the sixth waits for the next minute."""
    token = farm.new_token("rate@example.test")
    fresh_minute()

    statuses = [send(farm, token, gateway=i % 2).status_code for i in range(5)]
    sixth = send(farm, token, gateway=1)

    assert statuses == [200] * 5
    error = limited(sixth, "rate_limited")
    assert error["data"]["limit"] == 5 and "tools/call" in error["message"]
    assert 0 < int(sixth.headers["Retry-After"]) <= math.ceil(60 - time.time() % 60) + 1


def test_each_method_has_its_own_limit(farm: Farm) -> None:
    """tools/list allows 4 a minute and initialize 3, counted apart from tools/call."""
    token = farm.new_token("methods@example.test")
    fresh_minute()

    lists = [send(farm, token, "tools/list", gateway=i % 2).status_code for i in range(4)]
    with farm.http(token) as http:
        opens = [http.post("/mcp/counted", content=rpc_body("initialize", INITIALIZE),
                           headers={"Content-Type": "application/json"}).status_code
                 for _ in range(4)]

    assert lists == [200] * 4 and opens == [200, 200, 200, 429]
    limited(send(farm, token, "tools/list"), "rate_limited")
    assert send(farm, token).status_code == 200


def test_anonymous_callers_are_limited_by_address(farm: Farm) -> None:
    """Without a token the caller's address is what is counted."""
    fresh_minute()
    before = send(farm, None, "tools/list")
    assert before.status_code in (200, 429)

    responses = [send(farm, None, "tools/list") for _ in range(5)]

    limited(responses[-1], "rate_limited")


# Quotas and app limits.

def test_a_weekly_quota_per_tier(farm: Farm) -> None:
    """The tiny tier gets 3 calls a week; the next waits until Sunday 00:00 UTC."""
    token = farm.new_token("tiny@example.test")
    farm.cli("tier", "tiny@example.test", "tiny")
    fresh_minute()

    statuses = [send(farm, token, gateway=i % 2).status_code for i in range(3)]
    over = send(farm, token)

    today = datetime.datetime.now(datetime.UTC).replace(hour=0, minute=0, second=0,
                                                        microsecond=0)
    sunday = today + datetime.timedelta(days=7 - (today.weekday() + 1) % 7)
    assert statuses == [200] * 3
    limited(over, "quota_exceeded")
    assert abs(int(over.headers["Retry-After"]) - seconds_until(sunday)) <= 2


def test_app_limits_count_everyone_but_the_owner(farm: Farm) -> None:
    """An app's per-minute limit binds its other callers together; the owner is not counted."""
    farm.deploy(SHARED_APPS / "units.py", "per-minute", "--public")
    farm.cli("limits", "per-minute", "--per-minute", "2")
    first, second = farm.new_token("pm1@example.test"), farm.new_token("pm2@example.test")
    fresh_minute()

    allowed = [send(farm, first, app="per-minute").status_code,
               send(farm, second, app="per-minute", gateway=1).status_code]
    owner = [send(farm, farm.token, app="per-minute").status_code for _ in range(3)]
    over = send(farm, second, app="per-minute")

    assert allowed == [200, 200] and owner == [200] * 3
    assert "a minute" in limited(over, "app_limit")["message"]


def test_the_daily_app_limit_has_its_own_window(farm: Farm) -> None:
    """A per-day limit runs out before a generous per-minute one, until midnight UTC."""
    farm.deploy(SHARED_APPS / "units.py", "per-day", "--public")
    shown = farm.cli("limits", "per-day", "--per-minute", "50", "--per-day", "2").stdout
    token = farm.new_token("pd@example.test")

    statuses = [send(farm, token, app="per-day").status_code for _ in range(2)]
    over = send(farm, token, app="per-day")

    tomorrow = datetime.datetime.now(datetime.UTC).date() + datetime.timedelta(days=1)
    midnight = datetime.datetime.combine(tomorrow, datetime.time(), datetime.UTC)
    assert "50 a minute, 2 a day" in shown
    assert statuses == [200, 200]
    limited(over, "app_limit")
    assert abs(int(over.headers["Retry-After"]) - seconds_until(midnight)) <= 2


# Redis gone: fail closed.

@pytest.fixture()
def lonely_farm() -> Iterator[tuple[Farm, list[RedisServer]]]:
    """A gateway on a Redis of its own, which the test stops and starts again."""
    directory = Path(tempfile.mkdtemp(prefix="ultralight-redis-"))
    servers = [start_redis(directory)]
    running = start_farm(servers[0].url, workers=0, settings=LIMITS)
    running.deploy(SHARED_APPS / "units.py", "lonely", "--public")
    yield running, servers
    running.stop()
    for server in servers:
        stop_process(server.proc)
    shutil.rmtree(directory, ignore_errors=True)


def test_limits_fail_closed_when_redis_stops(lonely_farm: tuple[Farm, list[RedisServer]]
                                            ) -> None:
    """Redis stopped: 503 with Retry-After and a clear reason; Redis back: served again."""
    farm, servers = lonely_farm
    assert send(farm, farm.token, "tools/list", app="lonely").status_code == 200

    stop_process(servers[0].proc)
    refused = [send(farm, farm.token, method, app="lonely") for method in
               ("tools/list", "tools/call")]
    servers.append(start_redis(Path(tempfile.mkdtemp(prefix="ultralight-redis-")),
                               servers[0].port))
    wait_until(lambda: send(farm, farm.token, "tools/list", app="lonely").status_code == 200,
               10, "the gateway did not recover")

    for response in refused:
        assert response.status_code == 503, response.text
        assert int(response.headers["Retry-After"]) > 0
        error = response.json()["error"]
        assert error["data"]["reason"] == "limits_unavailable"
        assert "refused" in error["message"] and "Traceback" not in response.text


# The counting itself, against the real Redis.

async def test_counting_is_all_or_nothing(redis_server: RedisServer) -> None:
    """A refused take counts nothing; a refund gives back refundable counters only."""
    redis = Redis.from_url(redis_server.url)
    counters = Counters(redis)
    now = time.time()
    tag = f"{now:.6f}"
    tight = Counter(f"test:tight:{tag}", 1, now + 60, "tight", "tight")
    loose = Counter(f"test:loose:{tag}", 5, now + 60, "loose", "loose")
    attempts = Counter(f"test:attempts:{tag}", 5, now + 60, "rate", "rate", refundable=False)

    await counters.take([tight, loose, attempts], now)
    with pytest.raises(LimitExceeded) as caught:
        await counters.take([tight, loose, attempts], now)
    counts_after_refusal = [await redis.get(c.key) for c in (tight, loose, attempts)]
    await counters.refund([tight, loose, attempts])
    counts_after_refund = [await redis.get(c.key) for c in (tight, loose, attempts)]
    ttl = await redis.pttl(tight.key)
    await redis.aclose()

    assert caught.value.counter is tight and 59 <= caught.value.retry_after_s <= 60
    assert counts_after_refusal == [b"1", b"1", b"1"]
    assert counts_after_refund == [b"0", b"0", b"1"]
    assert 0 < ttl <= 61_000


async def test_counting_without_redis_raises_unavailable() -> None:
    """A Redis that does not answer is an error, never a silent pass."""
    redis = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    counter = Counter("test:nowhere", 1, time.time() + 60, "x", "x")

    with pytest.raises(LimitsUnavailable):
        await Counters(redis).take([counter], time.time())
    await redis.aclose()


def test_windows_start_where_they_should() -> None:
    """Weeks start on Sunday 00:00 UTC, days at midnight UTC, months on the first."""
    saturday_night = datetime.datetime(2025, 1, 4, 23, 59, 59, tzinfo=datetime.UTC).timestamp()
    sunday = datetime.datetime(2025, 1, 5, tzinfo=datetime.UTC).timestamp()

    week_before, ends_before = window("week", saturday_night)
    week_after, ends_after = window("week", sunday)

    assert ends_before == sunday and week_before == "w20241229"
    assert week_after == "w20250105" and ends_after == sunday + 7 * 86400
    assert window("day", sunday + 5)[1] == sunday + 86400
    assert window("month", sunday)[1] == datetime.datetime(
        2025, 2, 1, tzinfo=datetime.UTC).timestamp()
    assert window("minute", 120.5) == ("m2", 180.0)


def test_the_gates_benchmark_runs(redis_server: RedisServer) -> None:
    """bench/gates.py runs in its quick mode and reports both modes and their ratio."""
    result = subprocess.run([sys.executable, "-m", "bench.gates", "--quick", "--redis-url",
                             redis_server.url], cwd=REPO, capture_output=True, text=True,
                            timeout=120, check=True)

    assert "gateway, request to enqueue, gates on" in result.stdout
    assert "gateway, request to enqueue, gates off" in result.stdout
    assert "gates on / off at p50" in result.stdout
