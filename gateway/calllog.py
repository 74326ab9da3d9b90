"""The call log: every call recorded without slowing it, queryable and replayable.

A gateway appends one entry per call to a Redis stream as the call finishes; a drainer in every
gateway moves entries into SQL in batches through a consumer group, so each entry is stored once
whichever gateway drains it. Arguments and results are capped; the result's digest is exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import orjson
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from gateway import GatewayError
from gateway.registry import Database, Failures, Migrations, SqliteDatabase, Tx, open_database

log = structlog.get_logger(__name__)
T = TypeVar("T")

STREAM = "ultralight:calllog"
GROUP = "drainers"
STREAM_MAX = 200_000
LATENCY_KEY = "ultralight:latency"
LATENCY_SAMPLES = 1000
ARGS_CAP = 10 * 1024
RESULT_CAP = 64 * 1024

SCHEMA = [
    """
    CREATE TABLE call_log (
        request_id TEXT PRIMARY KEY,
        at REAL NOT NULL,
        app_id TEXT NOT NULL,
        app_name TEXT NOT NULL,
        version TEXT NOT NULL,
        code_hash TEXT NOT NULL,
        function TEXT NOT NULL,
        user_id TEXT,
        source TEXT,
        session_id TEXT,
        seq INTEGER,
        args TEXT NOT NULL,
        args_size INTEGER NOT NULL,
        args_truncated INTEGER NOT NULL,
        result TEXT,
        result_size INTEGER NOT NULL,
        result_truncated INTEGER NOT NULL,
        result_digest TEXT,
        outcome TEXT NOT NULL,
        error TEXT,
        duration_ms REAL NOT NULL,
        worker_id TEXT,
        replay_of TEXT
    );
    CREATE INDEX call_log_app_at ON call_log(app_id, at);
    CREATE INDEX call_log_at ON call_log(at)
    """,
    "ALTER TABLE call_log ADD COLUMN ai_usage TEXT",
]
# Any fixed bigint, other than the other stores' ("ul_clog").
MIGRATION_LOCK = 0x756C_5F63_6C6F_67
MIGRATIONS = Migrations("call_log", "call_log_schema", SCHEMA, MIGRATION_LOCK)


class CallLogError(GatewayError):
    """The call log store failed."""


FAILURES = Failures(CallLogError, CallLogError, "call log database", "the call log is not open")


def digest(value: Any) -> str:
    """A stable digest of a JSON value: equal values, equal digests."""
    return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()


MIN_MASKED = 4
MASK = "[secret]"


def mask(text: Any, secrets: list[str]) -> Any:
    """The text with each secret value (and its JSON-escaped form) replaced."""
    if not isinstance(text, str):
        return text
    for secret in secrets:
        text = text.replace(secret, MASK)
        escaped = orjson.dumps(secret).decode()[1:-1]
        if escaped != secret:
            text = text.replace(escaped, MASK)
    return text


def capped(value: Any, cap: int) -> tuple[str, int, bool]:
    """JSON text of value, cut to ``cap`` bytes with a marker, and its original size."""
    text = orjson.dumps(value).decode()
    size = len(text.encode())
    if size <= cap:
        return text, size, False
    kept = text.encode()[:cap].decode("utf-8", errors="ignore")
    return orjson.dumps({"ultralight/truncated": True, "original_bytes": size,
                         "prefix": kept}).decode(), size, True


@dataclasses.dataclass(frozen=True)
class CallRecord:
    request_id: str
    at: float
    app_id: str
    app_name: str
    version: str
    code_hash: str
    function: str
    user_id: str | None
    source: str | None
    session_id: str | None
    seq: int | None
    args: str
    args_size: int
    args_truncated: bool
    result: str | None
    result_size: int
    result_truncated: bool
    result_digest: str | None
    outcome: str
    error: str | None
    duration_ms: float
    worker_id: str | None
    replay_of: str | None = None
    # JSON list of the ul.ai completions the call made: provider, model, tokens, cost.
    ai_usage: str | None = None

    @classmethod
    def build(cls, *, args: dict[str, Any], value: Any, ok: bool,
              secrets: Iterable[str] = (), **fields: Any) -> CallRecord:
        """A record with args and result capped, and the call's secret values masked."""
        args_text, args_size, args_cut = capped(args, ARGS_CAP)
        if ok:
            result_text, result_size, result_cut = capped(value, RESULT_CAP)
            result_digest: str | None = digest(value)
        else:
            result_text, result_size, result_cut, result_digest = None, 0, False, None
        hidden = sorted({s for s in secrets if len(s) >= MIN_MASKED}, key=len, reverse=True)
        if hidden:
            args_text, result_text = mask(args_text, hidden), mask(result_text, hidden)
            fields["error"] = mask(fields.get("error"), hidden)
        return cls(args=args_text, args_size=args_size, args_truncated=args_cut,
                   result=result_text, result_size=result_size, result_truncated=result_cut,
                   result_digest=result_digest, **fields)

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> CallRecord:
        record = cls(*row)
        return dataclasses.replace(record, args_truncated=bool(record.args_truncated),
                                   result_truncated=bool(record.result_truncated))

    def public(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["args"] = orjson.loads(self.args)
        data["result"] = orjson.loads(self.result) if self.result is not None else None
        data["ai_usage"] = orjson.loads(self.ai_usage) if self.ai_usage else []
        return data


FIELDS = [f.name for f in dataclasses.fields(CallRecord)]


class CallLogStore:
    """The call log's SQL table, in SQLite or PostgreSQL (see `gateway.registry.Database`)."""

    def __init__(self, database: Database | str | Path) -> None:
        """``database``: an unopened `Database`, or the path of a SQLite file."""
        if not isinstance(database, Database):
            database = SqliteDatabase(database, FAILURES)
        self.database = database

    async def _run(self, fn: Callable[[Tx], T]) -> T:
        return await self.database.run(fn)

    async def open(self) -> None:
        await self.database.open(MIGRATIONS)

    async def close(self) -> None:
        await self.database.close()

    async def insert_many(self, records: list[CallRecord]) -> None:
        rows = [tuple(_column_value(getattr(r, f)) for f in FIELDS) for r in records]
        marks = ", ".join("?" * len(FIELDS))
        sql = (f"INSERT INTO call_log ({', '.join(FIELDS)}) VALUES ({marks})"
               " ON CONFLICT DO NOTHING")
        await self._run(lambda tx: tx.executemany(sql, rows))

    async def query(self, app_id: str, *, function: str | None = None,
                    since: float | None = None, until: float | None = None,
                    outcome: str | None = None, limit: int = 100,
                    include_replays: bool = False) -> list[CallRecord]:
        clauses = ["app_id = ?"]
        params: list[Any] = [app_id]
        for clause, value in (("function = ?", function), ("at >= ?", since),
                              ("at < ?", until), ("outcome = ?", outcome)):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        if not include_replays:
            clauses.append("replay_of IS NULL")
        sql = (f"SELECT {', '.join(FIELDS)} FROM call_log WHERE {' AND '.join(clauses)}"
               " ORDER BY at DESC LIMIT ?")

        def fetch(tx: Tx) -> list[CallRecord]:
            return [CallRecord.from_row(row) for row in tx.execute(sql, (*params, limit))]

        return await self._run(fetch)

    async def by_ids(self, app_id: str, request_ids: list[str]) -> list[CallRecord]:
        marks = ", ".join("?" * len(request_ids))
        sql = (f"SELECT {', '.join(FIELDS)} FROM call_log WHERE app_id = ? AND request_id IN "
               f"({marks})")

        def fetch(tx: Tx) -> list[CallRecord]:
            return [CallRecord.from_row(row) for row in tx.execute(sql, (app_id, *request_ids))]

        return await self._run(fetch)

    async def prune(self, before: float) -> int:
        return await self._run(
            lambda tx: tx.execute("DELETE FROM call_log WHERE at < ?", (before,)).rowcount)


def _column_value(value: Any) -> Any:
    # Flags are stored as 0 and 1, which both backends keep in an integer column.
    return int(value) if isinstance(value, bool) else value


def open_call_log(url: str) -> CallLogStore:
    """The call log in the database a URL names (``ULTRALIGHT_DATABASE_URL``), not yet opened."""
    return CallLogStore(open_database(url, FAILURES, max_connections=2))


class CallLog:
    """Append entries to the stream; drain them into SQL; keep recent latencies for status."""

    def __init__(self, redis: Redis, store: CallLogStore, retention_s: float) -> None:
        self.redis = redis
        self.store = store
        self.retention_s = retention_s
        self.consumer = f"{socket.gethostname()}-{id(self):x}"
        self._tasks: set[asyncio.Task[None]] = set()

    async def next_seq(self, session_id: str | None) -> int | None:
        if session_id is None:
            return None
        key = f"ultralight:session:{session_id}:seq"
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.incr(key)
            pipe.expire(key, 86_400)
            seq, _ = await pipe.execute()
        return int(seq)

    def record(self, record: CallRecord) -> None:
        """Queue the entry without making the caller wait for it."""
        task = asyncio.create_task(self._append(record))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _append(self, record: CallRecord) -> None:
        try:
            if record.session_id is not None and record.seq is None:
                record = dataclasses.replace(record, seq=await self.next_seq(record.session_id))
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xadd(STREAM, {"r": orjson.dumps(dataclasses.asdict(record))},
                          maxlen=STREAM_MAX, approximate=True)
                if record.replay_of is None:
                    pipe.lpush(LATENCY_KEY, round(record.duration_ms, 3))
                    pipe.ltrim(LATENCY_KEY, 0, LATENCY_SAMPLES - 1)
                await pipe.execute()
        except RedisError as exc:
            log.warning("call_log_append_failed", request_id=record.request_id, error=str(exc))

    async def flush(self) -> None:
        """Wait for queued appends (used at shut-down and by tests)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def drain_forever(self, batch: int = 500, block_ms: int = 1000) -> None:
        await self._ensure_group()
        last_prune = 0.0
        while True:
            try:
                moved = await self.drain_once(batch, block_ms)
                if time.time() - last_prune > 60:
                    last_prune = time.time()
                    await self.store.prune(time.time() - self.retention_s)
            except (RedisError, CallLogError) as exc:
                log.warning("call_log_drain_failed", error=str(exc))
                await asyncio.sleep(1.0)
                with contextlib.suppress(RedisError):
                    await self._ensure_group()
                continue
            if moved == 0:
                await asyncio.sleep(0)

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def drain_once(self, batch: int = 500, block_ms: int = 0) -> int:
        """Move one batch (this consumer's pending entries first) from the stream to SQL."""
        entries = await self._read(batch, "0", None)
        if not entries:
            entries = await self._read(batch, ">", block_ms or None)
        if not entries:
            return 0
        records = [CallRecord(**orjson.loads(fields[b"r"])) for _, fields in entries]
        await self.store.insert_many(records)
        ids = [entry_id for entry_id, _ in entries]
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xack(STREAM, GROUP, *ids)
            pipe.xdel(STREAM, *ids)
            await pipe.execute()
        return len(records)

    async def _read(self, batch: int, start: str, block_ms: int | None
                    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        answer = await self.redis.xreadgroup(GROUP, self.consumer, {STREAM: start},
                                             count=batch, block=block_ms)
        return answer[0][1] if answer else []

    async def recent_latency_ms(self) -> list[float]:
        return sorted(float(v) for v in await self.redis.lrange(LATENCY_KEY, 0, -1))
