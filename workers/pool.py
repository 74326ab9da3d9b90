"""Sandboxes started ahead of their calls, each used once and replaced in the background."""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from workers.jail import Jail, Slot
from workers.sandbox import Limits, SandboxError, SandboxProcess

log = structlog.get_logger(__name__)


class SandboxPool:
    """Keeps ``size`` interpreters up with the SDK imported, waiting for a call.

    Every sandbox runs in a slot of its own (a uid and a cgroup); a slot returns to the pool only
    once its sandbox is dead and nothing of it is left running.
    """

    def __init__(self, limits: Limits, size: int, jail: Jail | None = None,
                 slots: list[Slot] | None = None) -> None:
        self.limits = limits
        self.size = size
        self.jail = jail
        self._free: asyncio.Queue[Slot | None] = asyncio.Queue()
        for slot in slots or [None] * (size + 64):  # type: ignore[list-item]
            self._free.put_nowait(slot)
        self._ready: asyncio.Queue[SandboxProcess] = asyncio.Queue()
        self._starting: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def warm(self) -> int:
        return self._ready.qsize()

    def fill(self) -> None:
        """Start sandboxes until ready plus starting reaches the pool size."""
        while not self._closed and self._ready.qsize() + len(self._starting) < self.size:
            task = asyncio.create_task(self._start_one())
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    async def _new(self) -> SandboxProcess:
        slot = await self._free.get()
        sandbox = SandboxProcess(self.limits, self.jail, slot)
        try:
            await sandbox.start()
        except BaseException:
            self._free.put_nowait(slot)
            raise
        return sandbox

    async def _start_one(self) -> None:
        try:
            sandbox = await self._new()
        except SandboxError as exc:
            log.warning("sandbox_start_failed", error=str(exc))
            await asyncio.sleep(1.0)
            return
        if self._closed:
            await self.retire(sandbox)
        else:
            self._ready.put_nowait(sandbox)

    async def acquire(self) -> SandboxProcess:
        """A ready sandbox if one is warm, otherwise a fresh one started now."""
        try:
            sandbox = self._ready.get_nowait()
        except asyncio.QueueEmpty:
            sandbox = await self._new()
        self.fill()
        return sandbox

    async def retire(self, sandbox: SandboxProcess) -> None:
        """Kill a used sandbox and hand its slot back."""
        try:
            await sandbox.kill()
        finally:
            self._free.put_nowait(sandbox.slot)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._starting):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._starting, return_exceptions=True)
        while not self._ready.empty():
            await self.retire(self._ready.get_nowait())
