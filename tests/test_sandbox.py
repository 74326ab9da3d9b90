"""The sandbox: an isolated interpreter per call, rlimits, and an outcome for every kind of end.

Every test runs against both kinds of sandbox: a fresh interpreter per call (without namespaces
here, so that it runs anywhere) and a call forked from a slot's zygote (bubblewrap, a uid and a
cgroup of its own: root only).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from workers.jail import Slot, allocate_slots, make_jail, release_slots
from workers.pool import SandboxPool
from workers.sandbox import CallInput, CallResult, Limits, Outcome, Sandbox, SandboxProcess
from workers.zygote import Zygotes

Spawn = Callable[[Limits], Awaitable[Sandbox]]

APP = '''
import os, resource, signal, sys
import ultralight as ul

def add(a: int, b: int = 2) -> int:
    print("adding", a, b)
    return a + b

async def later(text: str) -> str:
    return text.upper()

def fails():
    raise KeyError("missing thing")

def not_json():
    return {1, 2}

def nan():
    return float("nan")

def surrogate():
    return "\\ud800"

def deep():
    value = []
    for _ in range(100_000):
        value = [value]
    return value

def huge():
    return "x" * (6 * 1024 * 1024)

def crash():
    os.kill(os.getpid(), signal.SIGSEGV)

def leave():
    os._exit(3)

def environment():
    return dict(os.environ)

def limits():
    names = ["RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_NOFILE", "RLIMIT_FSIZE", "RLIMIT_CORE"]
    return {n: resource.getrlimit(getattr(resource, n))[1] for n in names}

def burn():
    while True:
        pass

def big_file():
    with open("/tmp/ul-sandbox-big", "wb") as handle:
        handle.write(b"x" * (32 * 1024 * 1024))

def who():
    return ul.user

def store_it(key: str):
    ul.store(key, {"v": 1})
    return ul.load(key)
'''

LIMITS = Limits(cpu_s=2, memory_mb=256, max_file_mb=1)
SLOT_MEMORY_MB = 512


def zygote_slots(count: int, memory_mb: int = SLOT_MEMORY_MB) -> list[Slot]:
    """Slots a zygote can run in (a uid and a cgroup each), or skip the test."""
    if os.geteuid() != 0 or shutil.which("bwrap") is None:
        pytest.skip("zygote sandboxes need root (a uid per slot) and bubblewrap")
    slots = allocate_slots(count, 640_000, memory_mb * 1024 * 1024, 32, use_uids=True)
    if any(slot.cgroup is None for slot in slots):
        release_slots(slots)
        pytest.skip("zygote sandboxes need writable memory and pids cgroups")
    return slots


@pytest.fixture(params=["fresh", "zygote"])
def kind(request: pytest.FixtureRequest) -> str:
    """Which kind of sandbox the test runs against."""
    return str(request.param)


@pytest.fixture
async def spawn(kind: str) -> AsyncIterator[Spawn]:
    """Starts a sandbox of the kind under test, ready for its call."""
    if kind == "fresh":
        async def fresh(limits: Limits) -> Sandbox:
            sandbox = SandboxProcess(limits)
            await sandbox.start()
            return sandbox

        yield fresh
        return
    slots = zygote_slots(1)
    zygotes = Zygotes(make_jail("bwrap", "", 16))

    async def forked(limits: Limits) -> Sandbox:
        return await zygotes.spawn(limits, slots[0])

    try:
        yield forked
    finally:
        await zygotes.close()
        release_slots(slots)


@pytest.fixture(autouse=True)
def _use(spawn: Spawn) -> None:
    global SPAWN
    SPAWN = spawn


SPAWN: Spawn


async def run(function: str, args: dict[str, Any] | None = None, timeout_s: float = 10,
              handler: Any = None, limits: Limits = LIMITS, **call: Any) -> CallResult:
    async def refuse(op: str, payload: dict[str, Any]) -> Any:
        raise AssertionError(f"unexpected SDK request {op}")

    sandbox = await SPAWN(limits)
    try:
        return await sandbox.run(CallInput(APP, function, args or {}, **call), timeout_s,
                                 handler or refuse)
    finally:
        await sandbox.reclaim()


async def test_a_result_and_its_logs_come_back() -> None:
    """A plain call returns its value and what it printed."""
    result = await run("add", {"a": 1})

    assert result.outcome is Outcome.OK and result.value == 3
    assert result.logs == "adding 1 2\n"


async def test_async_tools_are_awaited() -> None:
    """An async function is run to completion."""
    assert (await run("later", {"text": "hi"})).value == "HI"


async def test_an_exception_is_an_app_error_with_its_message() -> None:
    """The app's exception type and message make the error; the traceback goes to the logs."""
    result = await run("fails")

    assert result.outcome is Outcome.APP_ERROR
    assert result.error == "KeyError: 'missing thing'"
    assert "line" in result.logs


@pytest.mark.parametrize(("function", "phrase"), [
    ("not_json", "not JSON"),
    ("nan", "Out of range float"),
    ("surrogate", "lone surrogate"),
    ("deep", "nested too deeply"),
])
async def test_results_that_are_not_json_data_are_refused(function: str, phrase: str) -> None:
    """Sets, NaN, lone surrogates and absurd nesting end as invalid results."""
    result = await run(function)

    assert result.outcome is Outcome.INVALID_RESULT
    assert phrase in (result.error or "")


async def test_an_oversized_result_is_refused() -> None:
    """A result over the result cap is an output-limit error, not a memory problem."""
    result = await run("huge")

    assert result.outcome is Outcome.OUTPUT_LIMIT and "larger than" in (result.error or "")


async def test_a_crash_reports_its_signal() -> None:
    """A segfault ends as a crash naming SIGSEGV."""
    result = await run("crash")

    assert result.outcome is Outcome.CRASH and "SIGSEGV" in (result.error or "")


async def test_exiting_without_a_result_is_a_crash() -> None:
    """os._exit before returning is reported with its status."""
    result = await run("leave")

    assert result.outcome is Outcome.CRASH and "status 3" in (result.error or "")


async def test_wall_clock_deadline_stops_the_call() -> None:
    """A call past its deadline is killed and reported as a timeout."""
    result = await run("burn", timeout_s=0.5, limits=Limits(cpu_s=30))

    assert result.outcome is Outcome.TIMEOUT and "0.5 s" in (result.error or "")


async def test_cpu_limit_stops_the_call() -> None:
    """Burning more CPU than allowed ends as a CPU-limit error before the wall deadline."""
    result = await run("burn", timeout_s=20, limits=Limits(cpu_s=1))

    assert result.outcome is Outcome.CPU_LIMIT


async def test_file_size_limit_applies() -> None:
    """Writing a file past RLIMIT_FSIZE fails inside the app."""
    result = await run("big_file")

    assert result.outcome is not Outcome.OK


async def test_the_environment_is_empty_of_worker_settings(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """Nothing of the worker's environment (Redis URL, keys) reaches the app."""
    monkeypatch.setenv("ULTRALIGHT_REDIS_URL", "redis://secret@127.0.0.1:1/0")
    result = await run("environment")

    assert result.outcome is Outcome.OK
    assert not any("ULTRALIGHT" in k or "secret" in v for k, v in result.value.items())


async def test_rlimits_are_set() -> None:
    """CPU, address space, files, file size and core dumps are capped."""
    hard = (await run("limits")).value

    assert hard["RLIMIT_CPU"] == 3
    assert hard["RLIMIT_AS"] == 256 * 1024 * 1024
    assert hard["RLIMIT_NOFILE"] == 64
    assert hard["RLIMIT_FSIZE"] == 1024 * 1024
    assert hard["RLIMIT_CORE"] == 0


async def test_sdk_requests_are_served_by_the_handler() -> None:
    """ul.store and ul.load travel to the worker's handler and back."""
    stored: dict[str, Any] = {}

    async def handler(op: str, payload: dict[str, Any]) -> Any:
        if op == "store":
            stored[payload["key"]] = payload["value"]
            return None
        return stored.get(payload["key"])

    result = await run("store_it", {"key": "k"}, handler=handler, user={"id": "u1"})

    assert result.value == {"v": 1} and stored == {"k": {"v": 1}}


async def test_the_caller_is_visible_as_ul_user() -> None:
    """ul.user carries the caller the gateway identified."""
    user = {"id": "usr_1", "email": "a@example.test", "tier": "free"}

    assert (await run("who", user=user)).value == user


async def test_pool_hands_out_warm_sandboxes_once_each(kind: str) -> None:
    """A pooled sandbox is started ahead, used once, and replaced."""
    if kind == "fresh":
        pool = SandboxPool(LIMITS, size=2)
    else:
        slots = zygote_slots(5)  # as a worker sizes it: calls at once + warm + 1
        jail = make_jail("bwrap", "", 16)
        pool = SandboxPool(LIMITS, size=2, jail=jail, slots=slots, zygotes=Zygotes(jail))
    pool.fill()
    try:
        first = await pool.acquire()
        second = await pool.acquire()
        assert first is not second
        one = await first.run(CallInput(APP, "add", {"a": 1}), 10, None)  # type: ignore[arg-type]
        two = await second.run(CallInput(APP, "add", {"a": 2}), 10, None)  # type: ignore[arg-type]
        await pool.retire(first)
        await pool.retire(second)
    finally:
        await pool.close()
        if kind == "zygote":
            release_slots(slots)

    assert (one.value, two.value) == (3, 4)
