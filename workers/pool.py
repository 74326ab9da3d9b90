"""Sandboxes started ahead of their calls, each used once and replaced in the background."""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from workers.sandbox import Limits, SandboxError, SandboxProcess

log = structlog.get_logger(__name__)


class SandboxPool:
    """Keeps ``size`` interpreters up with the SDK imported, waiting for a call."""

    def __init__(self, limits: Limits, size: int, python: str | None = None) -> None:
        self.limits = limits
        self.size = size
        self.python = python
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

    async def _start_one(self) -> None:
        sandbox = SandboxProcess(self.limits, self.python)
        try:
            await sandbox.start()
        except SandboxError as exc:
            log.warning("sandbox_start_failed", error=str(exc))
            await asyncio.sleep(1.0)
            return
        if self._closed:
            await sandbox.kill()
        else:
            self._ready.put_nowait(sandbox)

    async def acquire(self) -> SandboxProcess:
        """A ready sandbox if one is warm, otherwise a fresh one started now."""
        try:
            sandbox = self._ready.get_nowait()
        except asyncio.QueueEmpty:
            sandbox = SandboxProcess(self.limits, self.python)
            await sandbox.start()
        self.fill()
        return sandbox

    async def close(self) -> None:
        self._closed = True
        for task in list(self._starting):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._starting, return_exceptions=True)
        while not self._ready.empty():
            await self._ready.get_nowait().kill()
