"""Sandboxes started ahead of their calls, each used once and replaced in the background."""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from workers.jail import Jail, Slot
from workers.sandbox import Limits, Sandbox, SandboxError, SandboxProcess
from workers.zygote import Zygotes

log = structlog.get_logger(__name__)


class SandboxPool:
    """Keeps ``size`` sandboxes started and waiting for a call.

    Every sandbox runs in a slot of its own (a uid and a cgroup); a slot returns to the pool only
    once its sandbox is dead and nothing of it is left running. Give it at least as many slots
    as calls run at once, plus ``size``, plus one: a call that finds no warm sandbox starts its
    own in a free slot. With ``zygotes`` a sandbox is a
    fork of the slot's zygote; without, a fresh interpreter.
    """

    def __init__(self, limits: Limits, size: int, jail: Jail | None = None,
                 slots: list[Slot] | None = None, zygotes: Zygotes | None = None) -> None:
        self.limits = limits
        self.size = size
        self.jail = jail
        self.zygotes = zygotes
        self._free: asyncio.Queue[Slot | None] = asyncio.Queue()
        for slot in slots or [None] * (size + 64):  # type: ignore[list-item]
            self._free.put_nowait(slot)
        self._ready: asyncio.Queue[Sandbox] = asyncio.Queue()
        self._starting: set[asyncio.Task[None]] = set()
        self._reclaiming: set[asyncio.Task[None]] = set()
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

    async def _new(self) -> Sandbox:
        slot = await self._free.get()
        starting = asyncio.ensure_future(self._start_in(slot))
        try:
            return await asyncio.shield(starting)
        except asyncio.CancelledError:
            # Cut short, a start could leave half a sandbox running: let it end, then retire it.
            with contextlib.suppress(SandboxError):
                await self.retire(await starting)
            raise

    async def _start_in(self, slot: Slot | None) -> Sandbox:
        try:
            if self.zygotes is not None and slot is not None:
                return await self.zygotes.spawn(self.limits, slot)
            sandbox = SandboxProcess(self.limits, self.jail, slot)
            await sandbox.start()
        except BaseException:
            await self._give_back(slot)
            raise
        return sandbox

    async def _give_back(self, slot: Slot | None) -> None:
        """Return a slot whose sandbox failed to start, once nothing of it runs any more."""
        try:
            if slot is not None and slot.cgroup is not None and not await slot.cgroup.drain():
                log.warning("sandbox_processes_linger", slot=slot.index)
        finally:
            self._free.put_nowait(slot)

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

    async def acquire(self) -> Sandbox:
        """A ready sandbox if one is warm, otherwise a fresh one started now."""
        try:
            sandbox = self._ready.get_nowait()
        except asyncio.QueueEmpty:
            sandbox = await self._new()
        self.fill()
        return sandbox

    async def retire(self, sandbox: Sandbox) -> None:
        """Kill a used sandbox now; its slot comes back once nothing of it is left."""
        try:
            await sandbox.kill()
        except BaseException:
            self._free.put_nowait(sandbox.slot)
            raise
        task = asyncio.create_task(self._reclaim(sandbox))
        self._reclaiming.add(task)
        task.add_done_callback(self._reclaiming.discard)

    async def _reclaim(self, sandbox: Sandbox) -> None:
        try:
            await sandbox.reclaim()
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
        await asyncio.gather(*self._reclaiming, return_exceptions=True)
        if self.zygotes is not None:
            await self.zygotes.close()
