"""Hostile apps against the bubblewrap sandbox: each fails alone, clearly, and leaves nothing.

Every case runs beside a well-behaved bystander call started at the same time; the bystander must
finish normally, the hostile call must end with a clear error (or a harmless result), no process
of it may survive, and the worker must go on serving. Cases that could harm a weak sandbox (fork
bombs, kill(-1)) run only once the worker has reported bubblewrap isolation with per-slot uids, and
the worker itself runs in its own PID namespace.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import Farm, RedisServer, start_farm, wait_until
from tests.test_farm import call

HOSTILE = Path(__file__).parent / "apps" / "hostile.py"
Check = Callable[[dict[str, Any]], None]


def isolation(farm: Farm) -> dict[str, Any]:
    for line in farm.logs().splitlines():
        if '"sandbox_isolation"' in line:
            return orjson.loads(line)
    return {}


@pytest.fixture(scope="module", params=["zygote", "fresh"])
def hostile_farm(redis_server: RedisServer, request: pytest.FixtureRequest) -> Iterator[Farm]:
    """A worker in each sandbox mode: calls forked from zygotes, and a bwrap start per call."""
    if shutil.which("bwrap") is None or shutil.which("unshare") is None:
        pytest.skip("bubblewrap and unshare are needed for hostile-app tests")
    farm = start_farm(redis_server.url, workers=0, settings={
        "ULTRALIGHT_CALL_TIMEOUT_S": "4", "ULTRALIGHT_SANDBOX_CPU_S": "3",
        "ULTRALIGHT_SANDBOX_MEMORY_MB": "512", "ULTRALIGHT_SANDBOX_MAX_PROCESSES": "32",
        "ULTRALIGHT_WORKER_CONCURRENCY": "6", "ULTRALIGHT_SANDBOX_WARM": "2",
        "ULTRALIGHT_SANDBOX_MODE": request.param,
    })
    own_namespace = ("unshare", "--pid", "--fork", "--kill-child", "--mount-proc")
    wrap = own_namespace if os.geteuid() == 0 else ()
    farm.add_worker(wrap=wrap)
    wait_until(lambda: '"worker_started"' in farm.logs(), 30, "the worker did not start")
    if isolation(farm).get("mode") != request.param:
        farm.stop()
        pytest.skip(f"{request.param} sandboxes are not available here")
    farm.deploy(HOSTILE, "hostile")
    yield farm
    farm.stop()


def contained(farm: Farm) -> bool:
    info = isolation(farm)
    return info.get("isolation") == "bwrap" and info.get("slot_uids") is True


def survivors() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "ul-hostile":
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def run_beside_bystander(farm: Farm, function: str, args: dict[str, Any]
                         ) -> tuple[dict[str, Any], dict[str, Any]]:
    box: dict[str, Any] = {}
    attacker = threading.Thread(target=lambda: box.update(
        call(farm.url, farm.token, "hostile", function, args)))
    attacker.start()
    bystander = call(farm.url, farm.token, "hostile", "bystander", {"x": 1})
    attacker.join(60)
    return box["result"], bystander["result"]


def outcome(*names: str) -> Check:
    def check(result: dict[str, Any]) -> None:
        assert result["isError"] is True, result
        assert result["_meta"]["ultralight/outcome"] in names, result
        assert "Traceback" not in result["content"][0]["text"]
    return check


def value(predicate: Callable[[Any], bool]) -> Check:
    def check(result: dict[str, Any]) -> None:
        assert result["isError"] is False, result
        structured = result["structuredContent"]
        inner = structured.get("result", structured) if isinstance(structured, dict) else None
        assert predicate(inner), structured
    return check


def app_error(*phrases: str) -> Check:
    def check(result: dict[str, Any]) -> None:
        assert result["isError"] is True, result
        text = result["content"][0]["text"]
        assert any(p in text for p in phrases), text
    return check


CASES: list[tuple[str, dict[str, Any], Check]] = [
    ("spin", {}, outcome("timeout", "cpu_limit")),
    ("spin_in_children", {"n": 4}, outcome("timeout", "cpu_limit")),
    ("hog_memory", {}, outcome("memory_limit")),
    ("hog_memory_in_children", {}, outcome("memory_limit", "timeout", "crash")),
    ("fork_bomb", {}, outcome("process_limit", "app_error", "crash", "timeout")),
    ("thread_bomb", {}, outcome("process_limit", "app_error", "memory_limit")),
    ("open_files", {}, app_error("Too many open files")),
    ("fill_disk", {}, app_error("No space left", "File too large")),
    ("endless_output", {}, outcome("output_limit")),
    ("sleep_forever", {}, outcome("timeout")),
    ("stop_self", {}, outcome("timeout")),
    ("stopped_child", {}, value(lambda v: v == "left a stopped child")),
    ("daemon", {}, value(lambda v: v == "daemon started")),
    ("read_host_files", {}, value(lambda v: set(v) <= {"/sys/kernel", "/proc/1/environ"}
                                  and "ULTRALIGHT" not in str(v) and "REDIS" not in str(v))),
    ("environment", {}, value(lambda v: set(v) <= {"PATH", "LANG", "HOME", "PWD"})),
    ("snoop_proc", {}, value(lambda v: all("gateway" not in (c or "") and "redis" not in (c or "")
                                           and "worker" not in (c or "") for c in v.values()))),
    ("kill_parent", {}, value(lambda v: v == "still here")),
    ("kill_everything", {}, outcome("crash", "app_error")),
    ("ptrace_outside", {}, value(lambda v: v == 0)),
    ("new_user_namespace", {}, value(lambda v: v != 0)),
    ("write_runtime", {}, app_error("Read-only file system", "Permission denied")),
    ("forge_result", {}, outcome("crash", "invalid_result")),
    ("nan", {}, outcome("invalid_result")),
    ("huge_result", {}, outcome("output_limit")),
    ("deep_result", {}, outcome("invalid_result")),
    ("flood_sdk", {"n": 3000}, value(lambda v: v == 3000)),
    ("oversized_value", {}, app_error("larger than", "too large", "limit")),
    ("crash", {}, outcome("crash")),
]
DANGEROUS = {"fork_bomb", "kill_everything", "thread_bomb", "spin_in_children",
             "hog_memory_in_children"}


@pytest.mark.parametrize(("function", "args", "check"), CASES, ids=[c[0] for c in CASES])
def test_hostile_app_fails_alone(hostile_farm: Farm, function: str, args: dict[str, Any],
                                 check: Check) -> None:
    """The attack ends clearly, the bystander finishes, nothing survives, the worker serves on."""
    if function in DANGEROUS and not contained(hostile_farm):
        pytest.skip("needs bubblewrap isolation with per-slot uids")
    result, bystander = run_beside_bystander(hostile_farm, function, args)

    check(result)
    assert bystander["structuredContent"] == {"result": 2}
    wait_until(lambda: not survivors(), 5, f"processes of {function} outlived the call")
    after = call(hostile_farm.url, hostile_farm.token, "hostile", "bystander", {"x": 41})
    assert after["result"]["structuredContent"] == {"result": 42}


def test_network_has_only_loopback_and_no_host_services(hostile_farm: Farm,
                                                        redis_server: RedisServer) -> None:
    """Inside, loopback leads nowhere: not to Redis, not to the gateway; no name resolution."""
    port = redis_server.port
    body = call(hostile_farm.url, hostile_farm.token, "hostile", "network", {"port": port})
    report = body["result"]["structuredContent"]

    assert report["interfaces"] == ["lo"]
    assert report["loopback"] == "ConnectionRefusedError"
    assert report["dns"] != "resolved"


def test_concurrent_calls_cannot_see_each_other(hostile_farm: Farm) -> None:
    """A call's /tmp and processes are invisible to a call running at the same time."""
    box: dict[str, Any] = {}
    writer = threading.Thread(target=lambda: box.update(call(
        hostile_farm.url, hostile_farm.token, "hostile", "leave_marker", {"secret": "s3cr3t"})))
    writer.start()
    time.sleep(0.5)
    seen = call(hostile_farm.url, hostile_farm.token, "hostile", "look_for_marker", {})
    writer.join(30)
    found = seen["result"]["structuredContent"]

    assert "secret.txt" not in found["tmp"]
    assert len(found["pids"]) <= 3
    assert box["result"]["structuredContent"] == {"result": "done"}


def test_nothing_persists_from_one_call_to_the_next(hostile_farm: Farm) -> None:
    """Files a call wrote are gone for the next call, and its daemon is dead."""
    call(hostile_farm.url, hostile_farm.token, "hostile", "daemon", {})
    later = call(hostile_farm.url, hostile_farm.token, "hostile", "look_for_marker", {})

    assert later["result"]["structuredContent"]["tmp"] == []
    assert survivors() == []
