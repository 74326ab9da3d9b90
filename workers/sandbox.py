"""Run one call in an isolated, rlimit-capped interpreter and serve its SDK requests over a pipe.

Two kinds of sandbox speak the same protocol with the in-sandbox runtime: ``SandboxProcess``
starts a fresh interpreter per call (under bubblewrap in production), and
``workers.zygote.ZygoteSandbox`` is forked from its slot's warm, already isolated fork server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog

from workers import WorkerError
from workers.jail import Isolation, Jail, Slot, descendants, install_runtime, reap_orphaned_inits

log = structlog.get_logger(__name__)

# Output beyond the kept logs is drained; this many times the cap ends the call as runaway output.
RUNAWAY_OUTPUT_FACTOR = 16
START_TIMEOUT_S = 10.0
# How long a killed call's output pipes may take to close.
COLLECT_TIMEOUT_S = 5.0
MAX_RESULT_DEPTH = 64
# SDK requests of one call served at once; more wait until one is answered.
MAX_PENDING_REQUESTS = 64
MAX_UNREAD_BYTES = 64 * 1024 * 1024

Handler = Callable[[str, dict[str, Any]], Awaitable[Any]]


class SandboxError(WorkerError):
    """The sandbox could not be started."""


class RunawayOutput(SandboxError):
    """Raised into a call's channel reader once the call's output runs away."""


class Outcome(enum.StrEnum):
    OK = "ok"
    APP_ERROR = "app_error"
    TIMEOUT = "timeout"
    CPU_LIMIT = "cpu_limit"
    MEMORY_LIMIT = "memory_limit"
    OUTPUT_LIMIT = "output_limit"
    CRASH = "crash"
    INVALID_RESULT = "invalid_result"
    PROCESS_LIMIT = "process_limit"


@dataclasses.dataclass(frozen=True)
class Limits:
    cpu_s: int = 10
    memory_mb: int = 512
    max_files: int = 64
    max_file_mb: int = 16
    max_processes: int = 32
    max_output_bytes: int = 65_536
    max_result_bytes: int = 5 * 1024 * 1024

    def runtime_limits(self) -> dict[str, int]:
        """The rlimits as the in-sandbox runtime's ``set_limits`` takes them."""
        return {
            "cpu_s": self.cpu_s,
            "memory_bytes": self.memory_mb * 1024 * 1024,
            "max_files": self.max_files,
            "max_file_bytes": self.max_file_mb * 1024 * 1024,
            "max_processes": self.max_processes,
        }

    def runtime_argument(self) -> str:
        return orjson.dumps(self.runtime_limits()).decode()


@dataclasses.dataclass(frozen=True)
class CallInput:
    source: str
    function: str
    args: dict[str, Any]
    user: dict[str, Any] | None = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    filename: str = "app.py"


@dataclasses.dataclass
class CallResult:
    outcome: Outcome
    value: Any = None
    error: str | None = None
    logs: str = ""
    elapsed_ms: float = 0.0

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK


class _Output:
    """Collects a capped copy of stdout and stderr while draining all of it."""

    def __init__(self, cap: int, on_runaway: Callable[[], None]) -> None:
        self.cap = cap
        self.kept = bytearray()
        self.total = 0
        self.on_runaway = on_runaway

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.cap - len(self.kept)
        if room > 0:
            self.kept += chunk[:room]
        if self.total > self.cap * RUNAWAY_OUTPUT_FACTOR:
            self.on_runaway()

    async def drain(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(65_536):
            self.feed(chunk)

    def text(self) -> str:
        text = self.kept.decode("utf-8", errors="replace")
        if self.total > len(self.kept):
            text += f"\n[logs truncated: {self.total} bytes written, {self.cap} kept]"
        return text


class Sandbox:
    """One call's sandbox: started ahead of its call, used once, then killed and reclaimed.

    Subclasses say how the runtime gets started and stopped; the conversation with it (JSON lines
    on two pipes, see sdk/runtime/_ul_runtime.py) and how each kind of end is reported are here.
    """

    def __init__(self, limits: Limits, slot: Slot | None) -> None:
        self.limits = limits
        self.slot = slot
        # The slot cgroup's memory and pids limit counters when the call was handed over.
        self._counters = (0, 0)
        self._writer: asyncio.WriteTransport | None = None
        self._reader: asyncio.StreamReader | None = None
        self._read_transport: asyncio.BaseTransport | None = None
        self._output = _Output(limits.max_output_bytes, self._stop_reading)

    async def start(self) -> None:
        """Start the runtime and wait until it says it is ready for its call."""
        raise NotImplementedError

    async def kill(self) -> None:
        """Kill every process of the call now, without waiting for the slot to empty."""
        raise NotImplementedError

    async def reclaim(self) -> None:
        """Wait until nothing of the call is left in its slot, killing what lingers."""
        group = self.slot.cgroup if self.slot else None
        if group is not None and not await group.drain():
            log.warning("sandbox_processes_linger", slot=self.slot.index if self.slot else None)

    async def _exit_code(self) -> int | None:
        """How the call's process ended: its status, minus the signal that killed it, or None."""
        raise NotImplementedError

    async def _collect_output(self) -> None:
        """Wait until what the call wrote to stdout and stderr has been read."""
        raise NotImplementedError

    def _enter_cgroup(self, pids: list[int]) -> None:
        """Put the call's processes in the slot's cgroup before any app code can fork."""
        if self.slot is None or self.slot.cgroup is None:
            return
        for pid in pids:
            self.slot.cgroup.add(pid)
        self._counters = self.slot.cgroup.counters()

    async def _pipe_reader(self, fd: int) -> asyncio.StreamReader:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=self.limits.max_result_bytes + 1024)
        protocol = asyncio.StreamReaderProtocol(reader)
        self._read_transport, _ = await loop.connect_read_pipe(
            lambda: protocol, os.fdopen(fd, "rb", buffering=0)
        )
        return reader

    async def _pipe_writer(self, fd: int) -> asyncio.WriteTransport:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_write_pipe(
            asyncio.BaseProtocol, os.fdopen(fd, "wb", buffering=0)
        )
        return transport  # type: ignore[return-value]

    def _stop_reading(self) -> None:
        """Runaway output: the next (or pending) read of the call's channel ends the call."""
        if self._reader is not None and self._reader.exception() is None:
            self._reader.set_exception(RunawayOutput())

    def _close_channel(self) -> None:
        if self._writer is not None:
            if not self._writer.is_closing():
                self._writer.abort()
            self._writer = None

    def _send(self, message: dict[str, Any]) -> None:
        """Queue one line for the sandbox; never blocks, even if the sandbox stops reading."""
        if self._writer is None or self._writer.is_closing():
            raise BrokenPipeError("the sandbox closed its channel")
        self._writer.write(orjson.dumps(message) + b"\n")
        if self._writer.get_write_buffer_size() > MAX_UNREAD_BYTES:
            raise BrokenPipeError("the sandbox stopped reading its replies")

    async def run(self, call: CallInput, timeout_s: float, handler: Handler) -> CallResult:
        """Send the call, serve SDK requests until the result, and always kill the call."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s):
                result = await self._converse(call, handler)
        except TimeoutError:
            result = CallResult(Outcome.TIMEOUT, error=f"the call ran longer than {timeout_s:g} s "
                                "and was stopped")
        finally:
            await self.kill()
        result = self._tree_limits(result)
        await self._collect_output()
        result.logs = self._output.text()
        result.elapsed_ms = (time.perf_counter() - started) * 1000
        return result

    def _tree_limits(self, result: CallResult) -> CallResult:
        """Limits on the whole process tree show up in the slot's cgroup, not in the exit code."""
        group = self.slot.cgroup if self.slot else None
        if group is None or result.outcome in (Outcome.OK, Outcome.TIMEOUT):
            return result
        if group.hit_memory_limit(self._counters[0]):
            return CallResult(Outcome.MEMORY_LIMIT, error=(
                f"the call's processes used more than {self.limits.memory_mb} MB together "
                "and were stopped"))
        if group.hit_pids_limit(self._counters[1]):
            return CallResult(Outcome.PROCESS_LIMIT, error=(
                f"the call tried to run more than {self.limits.max_processes} processes or "
                f"threads at once ({result.error})"))
        return result

    async def _converse(self, call: CallInput, handler: Handler) -> CallResult:
        assert self._reader is not None
        try:
            self._send({"source": call.source, "filename": call.filename, "function": call.function,
                        "args": call.args, "user": call.user, "env": call.env})
        except OSError:
            return await self._ended()
        serving: set[asyncio.Task[None]] = set()
        try:
            while True:
                message = await self._next_message()
                if isinstance(message, CallResult):
                    return message
                if message.get("op") in {"result", "error"}:
                    return _final(message)
                while len(serving) >= MAX_PENDING_REQUESTS:
                    await asyncio.wait(serving, return_when=asyncio.FIRST_COMPLETED)
                task = asyncio.create_task(self._answer(handler, message))
                serving.add(task)
                task.add_done_callback(serving.discard)
        except BrokenPipeError as exc:
            return CallResult(Outcome.CRASH, error=f"the call broke its channel: {exc}")
        finally:
            for task in serving:
                task.cancel()

    async def _next_message(self) -> dict[str, Any] | CallResult:
        """The sandbox's next line as a message, or the result its absence means."""
        assert self._reader is not None
        try:
            line = await self._reader.readline()
        except RunawayOutput:
            return CallResult(Outcome.OUTPUT_LIMIT, error=(
                f"the call wrote more than {self._output.cap * RUNAWAY_OUTPUT_FACTOR} "
                "bytes of output and was stopped"))
        except ValueError:
            return CallResult(Outcome.OUTPUT_LIMIT, error=(
                f"the result is larger than {self.limits.max_result_bytes} bytes"))
        if not line:
            return await self._ended()
        try:
            message = orjson.loads(line)
        except orjson.JSONDecodeError:
            return CallResult(Outcome.INVALID_RESULT, error="the call sent something that is not "
                              "JSON (NaN, infinities and lone surrogates are not JSON either)")
        if not isinstance(message, dict):
            return CallResult(Outcome.INVALID_RESULT, error="the call sent a malformed message")
        return message

    async def _answer(self, handler: Handler, message: dict[str, Any]) -> None:
        reply = await _serve(handler, message)
        if "rid" in message:
            reply["rid"] = message["rid"]
        try:
            self._send(reply)
        except BrokenPipeError:
            pass  # the call is over or misbehaving; its result says so

    async def _ended(self) -> CallResult:
        """The sandbox closed its pipe without a result: say how it ended."""
        code = await self._exit_code()
        if code is None:
            return CallResult(Outcome.CRASH, error="the call closed its channel without a result")
        if code == -signal.SIGXCPU:
            return CallResult(Outcome.CPU_LIMIT, error=(
                f"the call used more than {self.limits.cpu_s} s of CPU time and was stopped"))
        if code < 0:
            name = signal.Signals(-code).name
            return CallResult(Outcome.CRASH, error=f"the call crashed with signal {name}")
        return CallResult(Outcome.CRASH, error=f"the call exited with status {code} before "
                          "returning a result")


class SandboxProcess(Sandbox):
    """A fresh interpreter per call: bubblewrap's own start-up is the isolation."""

    def __init__(self, limits: Limits, jail: Jail | None = None, slot: Slot | None = None
                 ) -> None:
        super().__init__(limits, slot)
        self.jail = jail or Jail(Isolation.PROCESS, sys.executable, install_runtime())
        self._proc: asyncio.subprocess.Process | None = None
        self._to_child: int | None = None
        self._drains: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Start the interpreter and wait until it has imported the SDK."""
        try:
            await self._start()
        except BaseException:
            await self.kill()  # also when cancelled: nothing of a half-started sandbox may stay
            raise

    async def _start(self) -> None:
        child_in, self._to_child = os.pipe()
        from_child, child_out = os.pipe()
        try:
            argv = self.jail.command(self.limits.runtime_argument(), child_in, child_out)
            bwrap = self.slot is not None and self.jail.level is Isolation.BWRAP
            user = self.slot.popen_user() if bwrap and self.slot else {}
            self._proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=(child_in, child_out),
                start_new_session=True,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "MALLOC_ARENA_MAX": "2"},
                limit=self.limits.max_result_bytes + 1024,
                **user,  # type: ignore[arg-type]
            )
        except OSError as exc:
            os.close(from_child)
            raise SandboxError(f"cannot start a sandbox: {exc}") from exc
        finally:
            os.close(child_in)
            os.close(child_out)
        self._reader = await self._pipe_reader(from_child)
        self._writer = await self._pipe_writer(self._to_child)
        self._to_child = None  # owned by the transport now
        assert self._proc.stdout is not None and self._proc.stderr is not None
        self._drains = [
            asyncio.create_task(self._output.drain(self._proc.stdout)),
            asyncio.create_task(self._output.drain(self._proc.stderr)),
        ]
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                ready = await self._reader.readline()
        except (TimeoutError, ValueError, RunawayOutput) as exc:
            raise SandboxError("the sandbox did not start in time") from exc
        if not ready:
            await self.kill()
            await self._collect_output()
            raise SandboxError(f"the sandbox failed to start: {self._output.text().strip()}")
        # Nothing in the sandbox forks until its call arrives, so the tree is complete here.
        self._enter_cgroup(descendants(self._proc.pid))

    async def reclaim(self) -> None:
        reap_orphaned_inits()
        await super().reclaim()

    async def _exit_code(self) -> int | None:
        assert self._proc is not None
        try:
            code = await asyncio.wait_for(self._proc.wait(), 2.0)
        except TimeoutError:
            return None
        if code > 128 and self.jail.level is Isolation.BWRAP:
            code = 128 - code  # bubblewrap's init reports a signal death as 128 + signal
        return code

    async def _collect_output(self) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self._drains, return_exceptions=True),
                                   COLLECT_TIMEOUT_S)

    async def kill(self) -> None:
        """Kill the sandbox's processes and reap it.

        Under bubblewrap its outer process is killed last: it reaps the sandbox's pid 1 on its
        way out, which would otherwise be left for the worker to reap.
        """
        if self._to_child is not None:
            with contextlib.suppress(OSError):
                os.close(self._to_child)
            self._to_child = None
        self._close_channel()
        if self._proc is None:
            return
        if self._proc.returncode is None and self.jail.level is Isolation.BWRAP:
            for pid in descendants(self._proc.pid)[1:]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._proc.wait()), 1.0)
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        await self._proc.wait()
        if self.slot is not None and self.slot.cgroup is not None:
            self.slot.cgroup.signal_all(signal.SIGKILL)
        if self._read_transport is not None:
            self._read_transport.close()


async def _serve(handler: Handler, message: dict[str, Any]) -> dict[str, Any]:
    message = dict(message)
    message.pop("rid", None)
    op = message.pop("op", None)
    if not isinstance(op, str):
        return {"error": "a request without an operation", "type": "PlatformError"}
    try:
        return {"ok": await handler(op, message)}
    except WorkerError as exc:
        return {"error": str(exc), "type": type(exc).__name__}
    except Exception:
        log.exception("sdk_request_failed", op=op)
        return {"error": f"the platform failed to serve {op}; it was logged",
                "type": "PlatformError"}


def _depth(value: Any) -> int:
    """How deeply lists and objects nest, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in item if isinstance(child, (list, dict)))
    return deepest


def _final(message: dict[str, Any]) -> CallResult:
    if message["op"] == "result":
        value = message.get("value")
        if _depth(value) > MAX_RESULT_DEPTH:
            return CallResult(Outcome.INVALID_RESULT, error=(
                f"the result is nested deeper than {MAX_RESULT_DEPTH} levels"))
        return CallResult(Outcome.OK, value=value)
    kind = message.get("kind")
    text = str(message.get("message", ""))
    if kind == "memory_limit":
        return CallResult(Outcome.MEMORY_LIMIT, error="the call ran out of memory and was stopped")
    if kind == "invalid_result":
        return CallResult(Outcome.INVALID_RESULT, error=text)
    error_type = str(message.get("type", "Error"))
    return CallResult(Outcome.APP_ERROR, error=f"{error_type}: {text}" if text else error_type)
