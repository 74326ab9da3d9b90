"""Zygote sandboxes: what forking calls from a warm fork server must not give away.

Each test forks real calls from real zygotes (bubblewrap, a uid and a cgroup per slot), so they
run as root only. What every sandbox guarantees (outcomes, rlimits, the protocol) is tested for
both kinds in test_sandbox.py; here is what is specific to forked calls: a call cannot reach its
zygote, calls that follow each other in one slot share nothing, and a broken zygote is replaced.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_sandbox import zygote_slots
from workers.jail import Isolation, Jail, JailError, Slot, make_jail, release_slots
from workers.pool import SandboxPool
from workers.sandbox import CallInput, CallResult, Limits, Outcome
from workers.zygote import SandboxMode, Zygotes, select_mode

APP = r'''
import ctypes, os, platform, signal, time
import ultralight as ul

libc = ctypes.CDLL(None, use_errno=True)
KEY = 0x0756C7
SYSCALLS = {"x86_64": (248, 250), "aarch64": (217, 219)}[platform.machine()]
KEYCTL_SEARCH = 10
SESSION_KEYRING, USER_KEYRING = -3, -4
IPC_CREAT = 0o1000
calls = 0


def pids() -> list:
    return sorted(int(p) for p in os.listdir("/proc") if p.isdigit())


def network() -> dict:
    import socket
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    client = socket.create_connection(server.getsockname(), timeout=2)
    client.close()
    server.close()
    with open("/proc/net/dev") as handle:
        lo = [line.split() for line in handle if line.strip().startswith("lo:")][0]
    return {"ns": os.readlink("/proc/self/ns/net"), "lo_packets": int(lo[2])}


def names() -> dict:
    return {pid: open(f"/proc/{pid}/comm").read().strip() for pid in pids()}


def what_it_sees() -> dict:
    status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines()
                  if ":\t" in line)
    return {
        "names": names(),
        "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
        "caps": [status[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")],
        "no_new_privs": status["NoNewPrivs"].strip(),
        "max_user_namespaces": open("/proc/sys/user/max_user_namespaces").read().strip(),
        "new_user_namespace": libc.unshare(0x10000000),
        "ptrace_init": libc.ptrace(16, 1, 0, 0),
        "uid": os.getuid(),
    }


def signal_everything() -> dict:
    sent = []
    for pid in range(1, 4096):
        if pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
                sent.append(pid)
            except OSError:
                pass
    try:
        os.kill(-1, signal.SIGKILL)
    except OSError:
        pass
    return {"sent": sent, "names": names()}


def leave_traces(secret: str) -> dict:
    global calls
    calls += 1
    for path in ("/tmp/secret", "/dev/shm/secret"):
        with open(path, "w") as handle:
            handle.write(secret)
    add_key, _ = SYSCALLS
    traces = {
        "shm": libc.shmget(KEY, 4096, IPC_CREAT | 0o600),
        "msg": libc.msgget(KEY, IPC_CREAT | 0o600),
        "mq": libc.mq_open(b"/ul-secret", os.O_CREAT | os.O_RDWR, 0o600, None),
        "session_key": libc.syscall(add_key, b"user", b"ul-secret", secret.encode(),
                                    len(secret), SESSION_KEYRING),
        "user_key": libc.syscall(add_key, b"user", b"ul-secret", secret.encode(),
                                 len(secret), USER_KEYRING),
    }
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            time.sleep(1000)
        os._exit(0)
    time.sleep(0.1)
    return traces


def look_for_traces() -> dict:
    global calls
    calls += 1
    _, keyctl = SYSCALLS
    return {
        "calls": calls,
        "tmp": os.listdir("/tmp"),
        "dev_shm": os.listdir("/dev/shm"),
        "pids": pids(),
        "shm": libc.shmget(KEY, 0, 0),
        "msg": libc.msgget(KEY, 0),
        "mq": libc.mq_open(b"/ul-secret", os.O_RDONLY, 0, None),
        "session_key": libc.syscall(keyctl, KEYCTL_SEARCH, SESSION_KEYRING, b"user",
                                    b"ul-secret", 0),
        "user_key": libc.syscall(keyctl, KEYCTL_SEARCH, USER_KEYRING, b"user", b"ul-secret", 0),
    }


def count() -> int:
    global calls
    calls += 1
    return calls


def family_in_view() -> str:
    if os.fork() == 0:
        time.sleep(1000)
    ul.load("anything")
    return "seen"


def spread_memory(children: int, mb: int) -> str:
    forked = []
    for _ in range(children):
        pid = os.fork()
        if pid == 0:
            block = b"x" * (mb * 1024 * 1024)
            time.sleep(0.5)
            os._exit(len(block) * 0)
        forked.append(pid)
    statuses = [os.waitpid(pid, 0)[1] for pid in forked]
    if any(statuses):
        raise RuntimeError(f"children ended with {statuses}")
    return "survived"
'''


@pytest.fixture
def jail() -> Jail:
    return make_jail("bwrap", "", 16)


@pytest.fixture
def slots() -> Iterator[list[Slot]]:
    taken = zygote_slots(3)
    yield taken
    release_slots(taken)


@pytest.fixture
async def zygotes(jail: Jail) -> AsyncIterator[Zygotes]:
    running = Zygotes(jail, answer_timeout_s=0.5)
    yield running
    await running.close()


async def call(zygotes: Zygotes, slot: Slot, function: str, args: dict[str, Any] | None = None,
               handler: Any = None, limits: Limits | None = None) -> CallResult:
    """One call forked in ``slot``, and the slot cleared after it, as the pool does."""
    async def refuse(op: str, payload: dict[str, Any]) -> Any:
        raise AssertionError(f"unexpected SDK request {op}")

    sandbox = await zygotes.spawn(limits or Limits(cpu_s=5), slot)
    try:
        return await sandbox.run(CallInput(APP, function, args or {}), 10, handler or refuse)
    finally:
        await sandbox.reclaim()


def read(path: str) -> str:
    return Path(path).read_text()


def alive(pid: int) -> bool:
    try:
        state = read(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in {"Z", "X"}


async def test_a_call_sees_only_itself_and_holds_nothing(zygotes: Zygotes,
                                                         slots: list[Slot]) -> None:
    """Pid 1 is the call's own init, no capability is left, no user namespace can be made."""
    result = await call(zygotes, slots[0], "what_it_sees")

    seen = result.value
    assert result.outcome is Outcome.OK, result
    assert seen["names"] == {"1": "ul-init", "2": "ul-call"}
    assert seen["fds"] == [0, 1, 2, 3, 4, 5]  # stdio, the two channel pipes, the listing itself
    assert seen["caps"] == ["0000000000000000"] * 5
    assert seen["no_new_privs"] == "1"
    assert seen["max_user_namespaces"] == "0"
    assert seen["new_user_namespace"] == -1
    assert seen["ptrace_init"] == -1
    assert seen["uid"] == 1000


async def test_a_call_cannot_signal_its_zygote(zygotes: Zygotes, slots: list[Slot]) -> None:
    """Signalling every pid it can name and kill(-1) reach nothing outside the call."""
    await call(zygotes, slots[0], "count")
    zygote = zygotes.pid_of(slots[0])
    assert zygote is not None

    result = await call(zygotes, slots[0], "signal_everything")

    assert result.outcome is Outcome.OK, result
    assert set(result.value["sent"]) <= {1}  # its own init, which ignores it
    assert alive(zygote) and zygotes.pid_of(slots[0]) == zygote
    assert (await call(zygotes, slots[0], "count")).value == 1


async def test_the_zygote_is_not_dumpable(zygotes: Zygotes, slots: list[Slot]) -> None:
    """It runs as the slot's uid, yet its /proc files belong to root: it is not dumpable."""
    await call(zygotes, slots[0], "count")
    zygote = zygotes.pid_of(slots[0])
    assert zygote is not None

    uids = read(f"/proc/{zygote}/status").split("Uid:", 1)[1].split()[:4]
    assert uids == [str(slots[0].uid)] * 4
    assert os.stat(f"/proc/{zygote}/environ").st_uid == 0


async def test_calls_in_one_slot_share_nothing(zygotes: Zygotes, slots: list[Slot]) -> None:
    """Files, SysV and POSIX IPC, keys and processes of one call are gone for the next."""
    left = await call(zygotes, slots[0], "leave_traces", {"secret": "s3cr3t"})
    assert left.outcome is Outcome.OK, left
    assert min(left.value.values()) >= 0, left.value  # every trace was really made

    found = (await call(zygotes, slots[0], "look_for_traces")).value

    assert found["calls"] == 1  # module state is the zygote's, not the last call's
    assert found["tmp"] == [] and found["dev_shm"] == []
    assert found["pids"] == [1, 2]
    assert found["shm"] == found["msg"] == found["mq"] == -1
    assert found["session_key"] == found["user_key"] == -1
    assert slots[0].cgroup is not None and slots[0].cgroup.pids() == []


async def test_each_call_has_its_own_loopback_network(zygotes: Zygotes,
                                                      slots: list[Slot]) -> None:
    """Loopback works inside a call; the next call in the slot gets a new network namespace."""
    first = await call(zygotes, slots[0], "network")
    second = await call(zygotes, slots[0], "network")

    assert first.outcome is Outcome.OK and second.outcome is Outcome.OK, (first, second)
    assert first.value["ns"] != second.value["ns"]
    assert second.value["lo_packets"] < 20  # only its own connection, none of the first's


async def test_the_call_tree_is_in_the_slot_cgroup_before_the_app_runs(
        zygotes: Zygotes, slots: list[Slot]) -> None:
    """The init, the runtime and what the app forks are all counted in the slot's cgroup."""
    group = slots[0].cgroup
    assert group is not None
    seen: list[str] = []

    async def look(op: str, payload: dict[str, Any]) -> Any:
        seen.extend(read(f"/proc/{pid}/comm").strip() for pid in group.pids())
        return None

    result = await call(zygotes, slots[0], "family_in_view", handler=look)

    assert result.value == "seen"
    assert sorted(seen) == ["ul-call", "ul-call", "ul-init"]
    assert group.pids() == []


async def test_memory_spread_over_children_hits_the_slot_limit(jail: Jail) -> None:
    """No single process is over its own limit; together they are over the slot's."""
    small = zygote_slots(1, memory_mb=128)
    zygotes = Zygotes(jail)
    try:
        result = await call(zygotes, small[0], "spread_memory", {"children": 4, "mb": 64},
                            limits=Limits(cpu_s=5, memory_mb=128))
    finally:
        await zygotes.close()
        release_slots(small)

    assert result.outcome is Outcome.MEMORY_LIMIT, result


async def test_a_killed_zygote_is_replaced(zygotes: Zygotes, slots: list[Slot]) -> None:
    """The next call in the slot starts a new zygote and runs."""
    await call(zygotes, slots[0], "count")
    first = zygotes.pid_of(slots[0])
    assert first is not None

    os.kill(first, signal.SIGKILL)
    result = await call(zygotes, slots[0], "count")

    assert result.value == 1
    assert zygotes.pid_of(slots[0]) not in {None, first}


async def test_a_stopped_zygote_is_replaced(zygotes: Zygotes, slots: list[Slot]) -> None:
    """A zygote that stops answering is killed after the answer timeout, and replaced."""
    await call(zygotes, slots[0], "count")
    first = zygotes.pid_of(slots[0])
    assert first is not None

    os.kill(first, signal.SIGSTOP)
    result = await call(zygotes, slots[0], "count")

    assert result.value == 1
    assert zygotes.pid_of(slots[0]) not in {None, first}
    assert not alive(first)


async def test_forked_calls_are_used_once(jail: Jail, slots: list[Slot]) -> None:
    """Each call gets its own fork; a used one cannot run a second call."""
    pool = SandboxPool(Limits(), size=1, jail=jail, slots=slots, zygotes=Zygotes(jail))
    pool.fill()
    try:
        first = await pool.acquire()
        one = await first.run(CallInput(APP, "count", {}), 10, None)  # type: ignore[arg-type]
        await pool.retire(first)
        second = await pool.acquire()
        two = await second.run(CallInput(APP, "count", {}), 10, None)  # type: ignore[arg-type]
        again = await first.run(CallInput(APP, "count", {}), 10, None)  # type: ignore[arg-type]
        await pool.retire(second)
    finally:
        await pool.close()

    assert first is not second
    assert (one.value, two.value) == (1, 1)
    assert again.outcome is Outcome.CRASH


async def test_the_worker_runs_zygotes_where_they_work(jail: Jail, slots: list[Slot]) -> None:
    """The probe passes here; "fresh" is taken as asked; a bad mode name is refused."""
    chosen = await asyncio.to_thread(select_mode, "zygote", jail, slots[0], 3.0)
    process = Jail(Isolation.PROCESS, jail.python, jail.runtime_dir)

    assert chosen is SandboxMode.ZYGOTE
    assert select_mode("fresh", jail, slots[0], 3.0) is SandboxMode.FRESH
    assert select_mode("zygote", process, slots[0], 3.0) is SandboxMode.FRESH
    with pytest.raises(JailError, match="unknown sandbox mode"):
        select_mode("forked", jail, slots[0], 3.0)
