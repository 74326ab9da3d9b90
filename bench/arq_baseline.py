"""The alternative a user would pick: the same function as a plain arq job, used the default way.

Run as ``python -m bench.arq_baseline REDIS_URL QUEUE`` it is an arq worker with every default
(poll every 0.5 s, 10 jobs at once, pickled jobs) and no sandbox. ``ArqCaller`` enqueues a job and
waits with ``job.result()``, which polls for the result every 0.5 s by default.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

from arq import Worker
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.worker import func

from bench.apps.trivial import add
from bench.farm import REPO, Redis

FUNCTION = "add"
CLIENT_NAME = "arq (enqueue_job + job.result())"


async def add_job(ctx: dict[str, Any], a: int, b: int = 1) -> int:
    return add(a, b)


def start_worker(redis: Redis, queue: str, log_path: str) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "bench.arq_baseline", redis.url, queue],
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


class ArqCaller:
    def __init__(self, redis_url: str, queue: str) -> None:
        self.redis_url = redis_url
        self.queue = queue
        self.pool: ArqRedis | None = None

    async def __aenter__(self) -> ArqCaller:
        self.pool = await create_pool(RedisSettings.from_dsn(self.redis_url),
                                      default_queue_name=self.queue)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.pool is not None:
            await self.pool.aclose()

    async def call(self, a: int) -> tuple[bool, float]:
        """One round trip: (result correct, milliseconds)."""
        assert self.pool is not None
        started = time.perf_counter()
        job = await self.pool.enqueue_job(FUNCTION, a, 1)
        if job is None:
            return False, (time.perf_counter() - started) * 1000
        value = await job.result(timeout=60)
        return value == a + 1, (time.perf_counter() - started) * 1000


def main(argv: list[str]) -> None:
    redis_url, queue = argv
    worker = Worker(functions=[func(add_job, name=FUNCTION)],
                    redis_settings=RedisSettings.from_dsn(redis_url), queue_name=queue)
    worker.run()


if __name__ == "__main__":
    main(sys.argv[1:])
