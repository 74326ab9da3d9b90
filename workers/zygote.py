"""Zygote sandboxes: each call forked from its slot's warm, already isolated fork server.

A fresh bubblewrap sandbox costs a bwrap and an interpreter start per call. Here each slot (its
own uid and cgroup, see workers.jail) runs one long-lived *zygote* under bubblewrap instead, with
the SDK already imported; a call is a fork of it that enters new user, mount, IPC and PID
namespaces of its own before any app code runs (the in-sandbox half is
sdk/runtime/_ul_zygote.py). Starting a call then costs a few forks, done ahead of the call.

For one call the worker:

1. hands the call's four pipe ends to the zygote over a SOCK_SEQPACKET socket (SCM_RIGHTS) and
   gets back the pid of the forked child, which waits on its request pipe;
2. moves that child into the slot's cgroup and writes one byte to release it: everything the call
   starts from then on is born in the cgroup;
3. waits for the runtime's ``ready`` line, then runs the call exactly like a fresh sandbox;
4. kills everything in the slot's cgroup when the call ends, whatever the reason. The call's
   PID namespace dies with its init, and nothing it wrote (its /tmp, /dev/shm, IPC objects,
   keyrings) outlives it.

A zygote serves one call at a time, since it belongs to one slot. One that dies or stops
answering is killed and replaced, and the slot goes on serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import signal
import socket
import time
from pathlib import Path

import orjson
import structlog

from workers.jail import Isolation, Jail, JailError, Slot, children, reap_orphaned_inits
from workers.sandbox import (
    START_TIMEOUT_S,
    CallInput,
    CallResult,
    Limits,
    RunawayOutput,
    Sandbox,
    SandboxError,
)

log = structlog.get_logger(__name__)

STDERR_TAIL_BYTES = 4096
STATUS_TIMEOUT_S = 2.0


class SandboxMode(enum.StrEnum):
    # One warm fork server per slot; each call is forked into namespaces of its own.
    ZYGOTE = "zygote"
    # One bubblewrap and interpreter start per call.
    FRESH = "fresh"


class ZygoteError(SandboxError):
    """A slot's zygote died, stopped answering or answered nonsense; it is replaced."""


class Zygote:
    """One slot's fork server, started under bubblewrap as the slot's uid."""

    def __init__(self, jail: Jail, slot: Slot, answer_timeout_s: float) -> None:
        self.jail = jail
        self.slot = slot
        self.answer_timeout_s = answer_timeout_s
        self.pid = 0  # the zygote's interpreter, as this worker sees it
        self._level = 0  # how deep the zygote's PID namespace is below this worker's
        self._proc: asyncio.subprocess.Process | None = None
        self._sock: socket.socket | None = None
        self._pidfds: list[int] = []
        self._stderr = bytearray()
        self._stderr_task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    @property
    def alive(self) -> bool:
        return self._sock is not None and self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.jail.zygote_command(theirs.fileno()),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                **self.slot.popen_user(),  # type: ignore[arg-type]
            )
        except OSError as exc:
            ours.close()
            raise ZygoteError(f"cannot start the zygote of slot {self.slot.index}: {exc}") from exc
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        assert self._proc.stderr is not None
        self._stderr_task = asyncio.create_task(self._keep_stderr(self._proc.stderr))
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                hello = await self._receive()
        except (TimeoutError, OSError):
            hello = b""
        try:
            if not hello:
                raise ZygoteError(f"the zygote of slot {self.slot.index} did not start: "
                                  f"{self.stderr_tail() or 'no message'}")
            self._find_processes()
        except BaseException:
            await self.stop()
            raise
        log.debug("zygote_started", slot=self.slot.index, pid=self.pid)

    def _find_processes(self) -> None:
        """bwrap, its pid 1, the interpreter it started and the server that one forked (see
        sdk/runtime/_ul_zygote.py): pin each with a pidfd, to kill them safely later."""
        assert self._proc is not None
        chain = [self._proc.pid]
        while len(chain) < 4:
            below = children(chain[-1])
            if len(below) != 1:
                raise ZygoteError(f"the zygote of slot {self.slot.index} is not where expected")
            chain.append(below[0])
        self.pid = chain[-1]
        self._level = len(_nspid(self.pid)) - 1
        for pid in chain[1:]:
            with contextlib.suppress(OSError):
                self._pidfds.append(os.pidfd_open(pid))

    async def _keep_stderr(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(4096):
            self._stderr += chunk
            del self._stderr[:-STDERR_TAIL_BYTES]

    def stderr_tail(self) -> str:
        return self._stderr.decode(errors="replace").strip()[-500:]

    async def _receive(self) -> bytes:
        assert self._sock is not None
        return await asyncio.get_running_loop().sock_recv(self._sock, 4096)

    async def fork(self, request: dict[str, object], fds: list[int]) -> int:
        """Fork one call child holding ``fds``; its pid as this worker sees it."""
        async with self._lock:
            if not self.alive:
                raise ZygoteError(f"the zygote of slot {self.slot.index} is not running")
            assert self._sock is not None
            try:
                socket.send_fds(self._sock, [orjson.dumps(request)], fds)
                async with asyncio.timeout(self.answer_timeout_s):
                    answer = await self._receive()
            except TimeoutError:
                self._forget_channel()
                raise ZygoteError(f"the zygote of slot {self.slot.index} did not answer within "
                                  f"{self.answer_timeout_s:g} s") from None
            except OSError as exc:
                self._forget_channel()
                raise ZygoteError(f"the zygote of slot {self.slot.index} is gone: {exc}") from exc
            except BaseException:
                self._forget_channel()  # an answer may still come: it would be read as the next
                raise
        if not answer:
            raise ZygoteError(f"the zygote of slot {self.slot.index} closed its channel: "
                              f"{self.stderr_tail() or 'no message'}")
        try:
            pid = int(orjson.loads(answer)["pid"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ZygoteError(f"the zygote of slot {self.slot.index} could not fork: "
                              f"{answer[:300]!r}") from None
        return self._host_pid(pid)

    def _forget_channel(self) -> None:
        """After a request went wrong the channel is out of step: the zygote is replaced."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _host_pid(self, pid: int) -> int:
        """The zygote's child ``pid`` (numbered in the zygote's namespace) as seen from here."""
        candidates = children(self.pid)
        if len(candidates) == 1:
            return candidates[0]  # the zygote has one child at a time, but for ones exiting
        for candidate in candidates:
            numbers = _nspid(candidate)
            if len(numbers) > self._level and numbers[self._level] == pid:
                return candidate
        raise ZygoteError(f"the child {pid} of the zygote of slot {self.slot.index} vanished")

    async def stop(self) -> None:
        """Kill the zygote and, with its PID namespace, anything it forked that still runs.

        bubblewrap's outer process goes last, once it has reaped the rest: killed first, it would
        leave its children for the worker to reap.
        """
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for fd in self._pidfds:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            os.close(fd)
        self._pidfds = []
        if self._proc is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._proc.wait()), 1.0)
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            await self._proc.wait()
            await asyncio.sleep(0)
            reap_orphaned_inits()
        if self._stderr_task is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stderr_task, 1.0)


def _nspid(pid: int) -> list[int]:
    """A process's pid in each PID namespace from this worker's down to its own."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return []
    return [int(n) for n in status.split("NSpid:", 1)[1].split("\n", 1)[0].split()]


class ZygoteSandbox(Sandbox):
    """One call forked from its slot's zygote, waiting for its call."""

    def __init__(self, limits: Limits, zygote: Zygote, tmp_bytes: int) -> None:
        super().__init__(limits, zygote.slot)
        self.zygote = zygote
        self.tmp_bytes = tmp_bytes
        self._child_pidfd: int | None = None
        self._out_fd: int | None = None
        self._status_fd: int | None = None
        self._killed = False

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self._abandon()  # also when cancelled: nothing of a half-started call may stay
            raise

    async def _start(self) -> None:
        group = self.zygote.slot.cgroup
        if group is None:
            raise SandboxError("zygote sandboxes need the slot's cgroup")
        request_r, request_w = os.pipe()
        reply_r, reply_w = os.pipe()
        self._out_fd, out_w = os.pipe()
        os.set_blocking(self._out_fd, False)
        self._status_fd, status_w = os.pipe()
        try:
            pid = await self.zygote.fork(
                {"op": "fork", "limits": self.limits.runtime_limits(), "tmp_bytes": self.tmp_bytes},
                [request_r, reply_w, out_w, status_w])
        except BaseException:
            os.close(request_w)
            os.close(reply_r)
            raise
        finally:
            for fd in (request_r, reply_w, out_w, status_w):
                os.close(fd)
        self._reader = await self._pipe_reader(reply_r)
        self._writer = await self._pipe_writer(request_w)
        asyncio.get_running_loop().add_reader(self._out_fd, self._read_output)
        try:
            self._child_pidfd = os.pidfd_open(pid)
            group.enter(pid)
        except OSError as exc:
            raise SandboxError(f"cannot confine the call in its slot: {exc}") from exc
        self._counters = group.counters()
        self._writer.write(b"\n")  # the child waits for this before it starts anything
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                ready = await self._reader.readline()
        except (TimeoutError, ValueError, RunawayOutput):
            ready = b""
        if not ready:
            await self._abandon()
            raise SandboxError(f"the sandbox failed to start: {self._output.text().strip()}")

    async def reclaim(self) -> None:
        await self._collect_output()  # a sandbox retired unused still holds its output pipe
        await super().reclaim()

    async def _abandon(self) -> None:
        await self.kill()
        await self._collect_output()

    def _read_output(self) -> bool:
        """Read what the call's stdout and stderr hold now; False once they are closed."""
        assert self._out_fd is not None
        while True:
            try:
                chunk = os.read(self._out_fd, 65_536)
            except BlockingIOError:
                return True
            except OSError:
                chunk = b""
            if not chunk:
                asyncio.get_running_loop().remove_reader(self._out_fd)
                return False
            self._output.feed(chunk)

    async def _collect_output(self) -> None:
        # The runtime flushes its output before it sends a result: what matters is in the pipe.
        if self._out_fd is not None:
            if self._read_output():
                asyncio.get_running_loop().remove_reader(self._out_fd)
            os.close(self._out_fd)
            self._out_fd = None

    async def _exit_code(self) -> int | None:
        """The wait status the call's init reports for the runtime's process."""
        if self._status_fd is None:
            return None
        loop = asyncio.get_running_loop()
        fd = self._status_fd
        os.set_blocking(fd, False)
        data = bytearray()
        done: asyncio.Future[None] = loop.create_future()

        def read() -> None:
            try:
                chunk = os.read(fd, 64)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            data.extend(chunk)
            if (not chunk or b"\n" in data) and not done.done():
                done.set_result(None)

        loop.add_reader(fd, read)
        try:
            await asyncio.wait_for(done, STATUS_TIMEOUT_S)
        except TimeoutError:
            return None
        finally:
            loop.remove_reader(fd)
        try:
            return os.waitstatus_to_exitcode(int(data.split(b"\n", 1)[0]))
        except ValueError:
            return None

    async def kill(self) -> None:
        """Kill the call's processes: its init and everything in the slot's cgroup."""
        if self._killed:
            return
        self._killed = True
        self._close_channel()
        if self._child_pidfd is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self._child_pidfd, signal.SIGKILL)
            os.close(self._child_pidfd)
            self._child_pidfd = None
        if self.slot is not None and self.slot.cgroup is not None:
            self.slot.cgroup.signal_all(signal.SIGKILL)
        if self._read_transport is not None:
            self._read_transport.close()
        if self._status_fd is not None:
            os.close(self._status_fd)
            self._status_fd = None


class Zygotes:
    """The zygotes of a pool's slots: each started on its slot's first use, replaced on failure."""

    def __init__(self, jail: Jail, answer_timeout_s: float = 3.0) -> None:
        self.jail = jail
        self.answer_timeout_s = answer_timeout_s
        self.tmp_bytes = jail.tmp_mb * 1024 * 1024
        self._running: dict[int, Zygote] = {}

    async def spawn(self, limits: Limits, slot: Slot) -> ZygoteSandbox:
        """A call forked in ``slot``, ready for its call; one failed zygote is replaced at once."""
        for attempt in (1, 2):
            zygote = await self._zygote(slot)
            sandbox = ZygoteSandbox(limits, zygote, self.tmp_bytes)
            try:
                await sandbox.start()
            except ZygoteError as exc:
                log.warning("zygote_replaced", slot=slot.index, error=str(exc))
                await self._retire(slot)
                if attempt == 2:
                    raise
                continue
            return sandbox
        raise AssertionError("unreachable")

    def pid_of(self, slot: Slot) -> int | None:
        """The pid (as this worker sees it) of the zygote serving ``slot``, if one runs."""
        zygote = self._running.get(slot.index)
        return zygote.pid if zygote is not None and zygote.alive else None

    async def _zygote(self, slot: Slot) -> Zygote:
        zygote = self._running.get(slot.index)
        if zygote is not None and zygote.alive:
            return zygote
        if zygote is not None:
            log.warning("zygote_replaced", slot=slot.index, error="the zygote had exited",
                        stderr=zygote.stderr_tail())
            await self._retire(slot)
        zygote = Zygote(self.jail, slot, self.answer_timeout_s)
        await zygote.start()
        self._running[slot.index] = zygote
        return zygote

    async def _retire(self, slot: Slot) -> None:
        zygote = self._running.pop(slot.index, None)
        if zygote is not None:
            await zygote.stop()
        if slot.cgroup is not None and not await slot.cgroup.drain():
            log.warning("sandbox_processes_linger", slot=slot.index)

    async def close(self) -> None:
        for index in list(self._running):
            await self._running.pop(index).stop()


# Choosing the mode at worker start.

PROBE_APP = '''
import ctypes, os

def check():
    libc = ctypes.CDLL(None, use_errno=True)
    status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines()
                  if ":\\t" in line)
    new_userns = libc.unshare(0x10000000)
    return {"pid": os.getpid(), "pids": sorted(p for p in os.listdir("/proc") if p.isdigit()),
            "cap_eff": status["CapEff"].strip(), "no_new_privs": status["NoNewPrivs"].strip(),
            "new_userns": new_userns}
'''


def probe(jail: Jail, slot: Slot, answer_timeout_s: float = 3.0) -> None:
    """Fork one call from a zygote and check its isolation; a JailError says what is missing."""
    if jail.level is not Isolation.BWRAP:
        raise JailError("zygote sandboxes need bubblewrap isolation")
    if slot.uid is None:
        raise JailError("zygote sandboxes need a uid per slot, so the worker must run as root")
    if slot.cgroup is None:
        raise JailError("zygote sandboxes need a writable memory and pids cgroup per slot")
    started = time.perf_counter()
    try:
        result = asyncio.run(_probe_call(jail, slot, answer_timeout_s))
    except SandboxError as exc:
        raise JailError(f"a zygote could not fork a call here: {exc}") from exc
    if not result.ok:
        raise JailError(f"a call forked from a zygote failed: {result.error} {result.logs}")
    report = result.value
    problems = []
    if report.get("pid") != 2 or report.get("pids") != ["1", "2"]:
        problems.append(f"no PID namespace of its own (sees {report.get('pids')})")
    if report.get("cap_eff") != "0000000000000000":
        problems.append("capabilities left")
    if report.get("no_new_privs") != "1":
        problems.append("no_new_privs unset")
    if report.get("new_userns") == 0:
        problems.append("could create a user namespace")
    if problems:
        raise JailError("a call forked from a zygote is not isolated: " + "; ".join(problems))
    log.debug("zygote_probe", elapsed_ms=round((time.perf_counter() - started) * 1000, 1))


async def _probe_call(jail: Jail, slot: Slot, answer_timeout_s: float) -> CallResult:
    async def refuse(op: str, payload: dict[str, object]) -> object:
        raise SandboxError(f"the probe makes no SDK request ({op})")

    zygotes = Zygotes(jail, answer_timeout_s)
    try:
        sandbox = await zygotes.spawn(Limits(), slot)
        try:
            return await sandbox.run(CallInput(PROBE_APP, "check", {}), 10, refuse)
        finally:
            await sandbox.kill()
            await sandbox.reclaim()
    finally:
        await zygotes.close()


def select_mode(requested: str, jail: Jail, slot: Slot, answer_timeout_s: float) -> SandboxMode:
    """The mode to run in: zygotes where they work here, otherwise one fresh sandbox per call."""
    try:
        mode = SandboxMode(requested)
    except ValueError:
        raise JailError(f"unknown sandbox mode {requested!r}; use 'zygote' or 'fresh'") from None
    if mode is SandboxMode.FRESH or jail.level is not Isolation.BWRAP:
        return SandboxMode.FRESH
    try:
        probe(jail, slot, answer_timeout_s)
    except JailError as exc:
        log.warning("zygote_unavailable", reason=str(exc),
                    detail="each call starts a fresh bubblewrap sandbox instead")
        return SandboxMode.FRESH
    return SandboxMode.ZYGOTE
