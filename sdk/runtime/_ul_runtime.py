"""Entry point of a sandbox: set limits, wait for one call on a pipe, run it, answer on another.

Runs under ``python -I -S`` with only this folder on ``sys.path``; it imports nothing of the worker
or the gateway. Every message is one line of JSON.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import types
from typing import Any

EXIT_BAD_START = 97
THREAD_STACK_BYTES = 1024 * 1024


def set_limits(limits: dict[str, int]) -> None:
    """Lower this process's rlimits; the app cannot raise them again."""
    pairs = {
        resource.RLIMIT_CPU: (limits["cpu_s"], limits["cpu_s"] + 1),
        resource.RLIMIT_AS: (limits["memory_bytes"],) * 2,
        resource.RLIMIT_NOFILE: (limits["max_files"],) * 2,
        resource.RLIMIT_FSIZE: (limits["max_file_bytes"],) * 2,
        resource.RLIMIT_NPROC: (limits["max_processes"],) * 2,
        resource.RLIMIT_CORE: (0, 0),
    }
    for which, (soft, *hard) in pairs.items():
        resource.setrlimit(which, (soft, hard[0] if hard else soft))


def die_with_parent() -> None:
    """Ask the kernel to kill this sandbox if the worker that started it goes away."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, 9, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class Channel:
    """The line-delimited JSON pipes to the worker.

    SDK requests carry an id so several threads of an app may have requests in flight at once;
    a reader thread, started on the first request, hands each reply to the thread waiting for it.
    """

    def __init__(self, request_fd: int, reply_fd: int) -> None:
        self._reader = open(request_fd, "rb")  # noqa: SIM115 - lives as long as the process
        self._writer = open(reply_fd, "wb", buffering=0)  # noqa: SIM115
        self._write_lock = None
        self._waiting: dict[int, list[Any]] = {}
        self._next_id = 0
        self._started = False

    def receive(self) -> dict[str, Any]:
        line = self._reader.readline()
        if not line:
            os._exit(0)
        return json.loads(line)

    def send(self, message: dict[str, Any]) -> None:
        text = json.dumps(message, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        self.send_raw(text.encode("utf-8") + b"\n")

    def send_raw(self, data: bytes) -> None:
        if self._write_lock is None:
            self._writer.write(data)
            return
        with self._write_lock:
            self._writer.write(data)

    def _start_reader(self) -> None:
        import threading

        # Threads count against the address-space limit by their stacks: keep them modest.
        threading.stack_size(THREAD_STACK_BYTES)
        self._write_lock = threading.Lock()
        self._table_lock = threading.Lock()
        threading.Thread(target=self._read_replies, daemon=True).start()
        self._started = True

    def _read_replies(self) -> None:
        while True:
            reply = self.receive()
            with self._table_lock:
                slot = self._waiting.pop(reply.get("rid"), None)
            if slot is not None:
                slot[1] = reply
                slot[0].set()

    def request(self, op: str, payload: dict[str, Any]) -> Any:
        import threading

        import ultralight

        if not self._started:
            self._start_reader()
        slot: list[Any] = [threading.Event(), None]
        with self._table_lock:
            self._next_id += 1
            rid = self._next_id
            self._waiting[rid] = slot
        try:
            self.send({"op": op, "rid": rid, **payload})
        except (TypeError, ValueError) as exc:
            with self._table_lock:
                self._waiting.pop(rid, None)
            raise ValueError(f"{op}: the value is not JSON data ({exc})") from None
        slot[0].wait()
        reply = slot[1]
        if "error" in reply:
            if reply.get("type") == "DataError":
                raise ultralight.SdkError(reply["error"])
            if reply.get("type") in ("OutboundError", "OutboundRefused"):
                raise ultralight.HttpError(reply["error"])
            if reply.get("type") == "AiError":
                raise ultralight.AiError(reply["error"])
            if reply.get("type") == "NestedCallError":
                raise ultralight.CallError(reply["error"])
            raise ultralight.PlatformError(reply["error"])
        return reply.get("ok")


def load_app(source: str, filename: str) -> types.ModuleType:
    import linecache

    # Tracebacks then show the app's lines without reading any file.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    module = types.ModuleType("app")
    module.__file__ = filename
    sys.modules["app"] = module
    exec(compile(source, filename, "exec"), module.__dict__)
    return module


def invoke(module: types.ModuleType, function: str, args: dict[str, Any]) -> Any:
    target = getattr(module, function, None)
    if function.startswith("_") or not isinstance(target, types.FunctionType):
        raise LookupError(f"the app has no tool named {function!r}")
    result = target(**args)
    if hasattr(result, "__await__"):
        import asyncio  # only async tools pay for it

        result = asyncio.run(_await(result))
    return result


async def _await(awaitable: Any) -> Any:
    return await awaitable


def encode_result(value: Any) -> str:
    """The result as JSON text, or a ValueError saying why it cannot be."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the result contains a lone surrogate, which is not valid "
                         "Unicode") from None
    except RecursionError:
        raise ValueError("the result is nested too deeply") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the result is not JSON data: {exc}") from None
    return text


def app_frames(exc: BaseException, filename: str) -> str:
    import traceback  # only failing calls pay for it

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == filename]
    lines = traceback.format_list(frames) + traceback.format_exception_only(type(exc), exc)
    return "".join(lines)


def flush_output() -> None:
    """Push what the app printed into the output pipe, so it is there before the result is."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # a starved or closed stream loses its tail, not the result
            pass


def run(channel: Channel) -> None:
    import ultralight

    call = channel.receive()
    filename = call.get("filename", "app.py")
    ultralight.user = call.get("user")
    ultralight.env = types.MappingProxyType(dict(call.get("env") or {}))
    ultralight._request = channel.request
    try:
        module = load_app(call["source"], filename)
        value = invoke(module, call["function"], call.get("args") or {})
    except MemoryError:
        flush_output()
        channel.send({"op": "error", "kind": "memory_limit", "message": "out of memory"})
        return
    except BaseException as exc:  # the app's failure is the call's result, whatever it is
        try:
            sys.stderr.write(app_frames(exc, filename))
        except BaseException:  # a starved process (no files, no memory) still reports the error
            pass
        flush_output()
        message = str(exc) or type(exc).__name__
        channel.send({"op": "error", "kind": "app_error", "type": type(exc).__name__,
                      "message": message})
        return
    flush_output()
    try:
        text = encode_result(value)
    except ValueError as exc:
        channel.send({"op": "error", "kind": "invalid_result", "message": str(exc)})
        return
    channel.send_raw(b'{"op":"result","value":' + text.encode("utf-8") + b"}\n")


def main() -> None:
    sys.path[:] = [os.path.dirname(os.path.abspath(__file__)), *sys.path]
    try:
        set_limits(json.loads(sys.argv[1]))
        request_fd, reply_fd = int(sys.argv[2]), int(sys.argv[3])
    except (IndexError, ValueError, KeyError, OSError) as exc:
        sys.stderr.write(f"sandbox: cannot set limits: {exc}\n")
        os._exit(EXIT_BAD_START)
    die_with_parent()
    # Read by the C library at start-up; the app's environment does not need to carry it.
    os.environ.pop("MALLOC_ARENA_MAX", None)
    import ultralight  # noqa: F401 - imported ahead so a warm sandbox has it ready

    channel = Channel(request_fd, reply_fd)
    channel.send({"op": "ready"})
    run(channel)
    flush_output()
    os._exit(0)


if __name__ == "__main__":
    main()
