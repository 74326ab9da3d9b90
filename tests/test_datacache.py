"""The worker's read-through data cache: callers read their own writes on any worker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import Farm, RedisServer, start_farm
from tests.test_farm import call
from workers.appdata import Scope
from workers.datacache import MISSING, DataCache

COUNTER = Path(__file__).parent / "apps" / "counter.py"


def test_values_are_served_only_for_the_version_they_were_read_at() -> None:
    """A new version of a space starts empty; an old one is gone."""
    cache = DataCache()
    scope = Scope("app", "user")
    view = cache.view(scope, 3)
    view.put("k", 1)

    assert cache.view(scope, 3).get("k") == 1
    assert cache.view(scope, 4).get("k") is MISSING


def test_own_bump_keeps_the_space_but_a_concurrent_writer_drops_it() -> None:
    """Our own bump by one keeps the cache; a bigger jump means someone else wrote."""
    cache = DataCache()
    scope = Scope("app", "user")
    cache.view(scope, 0).written({"k": 1})
    cache.settle(scope, 0, 1)
    assert cache.view(scope, 1).get("k") == 1

    cache.view(scope, 1).written({"k": 2})
    cache.settle(scope, 1, 3)
    assert cache.view(scope, 3).get("k") is MISSING


def test_spaces_and_keys_are_bounded() -> None:
    """The cache evicts the least recently used keys and spaces."""
    cache = DataCache(max_keys_per_space=2, max_spaces=2)
    view = cache.view(Scope("a", "u"), 0)
    for key in ("x", "y", "z"):
        view.put(key, key)
    cache.view(Scope("b", "u"), 0)
    cache.view(Scope("c", "u"), 0)

    assert view.get("x") is MISSING
    assert cache.view(Scope("a", "u"), 0).get("z") is MISSING


@pytest.fixture(scope="module")
def two_workers(redis_server: RedisServer) -> Iterator[Farm]:
    farm = start_farm(redis_server.url, workers=2)
    farm.deploy(COUNTER, "counter")
    yield farm
    farm.stop()


def test_a_write_is_read_back_on_whichever_worker_serves_next(two_workers: Farm) -> None:
    """Alternating writes and reads over two worker processes never read a stale value."""
    farm = two_workers
    for value in range(24):
        call(farm.url, farm.token, "counter", "put", {"value": value})
        got = call(farm.url, farm.token, "counter", "get", {})
        assert got["result"]["structuredContent"] == {"result": value}

    workers = _worker_infos(farm)
    assert len(workers) == 2
    assert sum(w["cache_hits"] for w in workers) > 0


def _worker_infos(farm: Farm) -> list[dict]:
    import orjson

    client = redis.Redis.from_url(farm.env["ULTRALIGHT_REDIS_URL"])
    try:
        infos = [orjson.loads(client.get(k)) for k in client.scan_iter("ultralight:worker:*")]
    finally:
        client.close()
    pids = {w.pid for w in farm.workers}
    return [i for i in infos if i["pid"] in pids]
