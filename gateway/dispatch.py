"""Send a call to the farm with arq and wait for its reply key with a blocking pop."""

from __future__ import annotations

import datetime
import time

import structlog
from arq.connections import ArqRedis
from redis.exceptions import RedisError

from gateway import GatewayError
from workers.jobs import (
    RUN_CALL,
    wake_channel,
    CallJob,
    CallReply,
    claim_key,
    reply_key,
    worker_key,
)

log = structlog.get_logger(__name__)

# How often a waiting gateway checks that the worker holding its call is still alive.
LIVENESS_CHECK_S = 1.0
# The worker answers a little before the deadline; the gateway waits a little after it.
DEADLINE_GRACE_S = 1.0
DEPTH_CHECK_S = 0.05


class DispatchError(GatewayError):
    """The farm could not run the call; ``outcome`` names the case."""

    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome


class Dispatcher:
    def __init__(self, redis: ArqRedis, queue_name: str, max_queue_depth: int = 0) -> None:
        self.redis = redis
        self.queue_name = queue_name
        self.max_queue_depth = max_queue_depth
        self._depth = (0.0, 0)

    async def _overloaded(self) -> bool:
        """Whether too many calls already wait (checked at most every 50 ms per gateway)."""
        if not self.max_queue_depth:
            return False
        checked, depth = self._depth
        now = time.monotonic()
        if now - checked > DEPTH_CHECK_S:
            depth = await self.redis.zcard(self.queue_name)
            self._depth = (now, depth)
        return depth > self.max_queue_depth

    async def call(self, job: CallJob) -> CallReply:
        try:
            if await self._overloaded():
                raise DispatchError("overloaded", f"more than {self.max_queue_depth} calls are "
                                    "waiting for a worker; try again shortly")
            await self.redis.enqueue_job(
                RUN_CALL, job.to_wire(), _job_id=job.call_id, _queue_name=self.queue_name,
                _expires=datetime.timedelta(seconds=max(1.0, job.deadline - time.time())),
            )
            await self.redis.publish(wake_channel(self.queue_name), b"1")
        except (RedisError, OSError) as exc:
            raise DispatchError("unavailable", "the call queue is unavailable; try again "
                                "shortly") from exc
        return await self.wait(job)

    async def wait(self, job: CallJob) -> CallReply:
        key = reply_key(job.call_id)
        timeout_s = job.deadline - time.time()
        try:
            while True:
                remaining = job.deadline + DEADLINE_GRACE_S - time.time()
                if remaining <= 0:
                    await self._abandon(job)
                    raise DispatchError("timeout", f"no worker finished the call within its "
                                        f"{timeout_s:.0f} s deadline; it was abandoned")
                popped = await self.redis.blpop([key], timeout=min(LIVENESS_CHECK_S, remaining))
                if popped is not None:
                    return CallReply.decode(popped[1])
                if await self._worker_lost(job.call_id):
                    raise DispatchError("lost", "the worker running this call stopped before "
                                        "it finished; the call was not run again")
        except (RedisError, OSError) as exc:
            raise DispatchError("unavailable", "lost contact with the call queue while "
                                "waiting for the result") from exc

    async def _worker_lost(self, call_id: str) -> bool:
        worker_id = await self.redis.get(claim_key(call_id))
        if worker_id is None:
            return False
        alive = await self.redis.exists(worker_key(worker_id.decode()))
        if alive:
            return False
        # The worker may have answered just before its heartbeat lapsed.
        return await self.redis.llen(reply_key(call_id)) == 0

    async def _abandon(self, job: CallJob) -> None:
        """Take a call that never started off the queue so no worker runs it late."""
        await self.redis.zrem(self.queue_name, job.call_id)
        log.warning("call_abandoned", request_id=job.call_id, app_id=job.app_id,
                    function=job.function)
