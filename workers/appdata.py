"""App data: one JSON value per key, scoped to (app, user), with filters and sorting done in SQL.

Input from apps is parsed into backend-neutral filters and orderings first; `SqliteSql` then renders
every statement the SQLite backend runs, so a Postgres backend only needs its own renderer.
"""

from __future__ import annotations

import asyncio
import math
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar

import orjson
import structlog

from workers import WorkerError

log = structlog.get_logger(__name__)

T = TypeVar("T")

KEY_MAX_CHARS = 512
PATH_MAX_SEGMENTS = 16
IN_MAX_VALUES = 1000
BUSY_TIMEOUT_MS = 5000
OPERATORS = ("eq", "ne", "lt", "lte", "gt", "gte", "in", "contains", "exists")

_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")
_INT64 = range(-(2**63), 2**63)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Above every code point a valid key may hold, so `prefix <= key < prefix + _TOP` is exact.
_TOP = "\U0010ffff"
# Datetimes and dataclasses are refused, not converted: `load` returns what `store` was given.
_DUMPS_OPTIONS = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME

Scalar = str | int | float | bool | None
PathSegment = str | int
Operator = Literal["eq", "ne", "lt", "lte", "gt", "gte", "in", "contains", "exists"]


class DataError(WorkerError):
    """Bad input from an app (invalid key, bad filter, value too large).

    str() is shown to the app author.
    """


class StoreError(WorkerError):
    """The store itself failed (not open, locked too long, disk, schema): not the app's fault."""


@dataclass(frozen=True)
class Scope:
    """Whose data a call touches: an app and its calling user."""

    app_id: str
    user_id: str  # "" for anonymous callers (they share the app's own space)

    def __post_init__(self) -> None:
        if not isinstance(self.app_id, str) or not self.app_id:
            raise ValueError("Scope.app_id must be a non-empty str")
        if not isinstance(self.user_id, str):
            raise ValueError("Scope.user_id must be a str")


# --- Validation of app input -------------------------------------------------------------------


def check_key(key: object) -> str:
    """Return `key` when it is a usable key, else raise DataError saying why."""
    if not isinstance(key, str):
        raise DataError(f"a key must be a string, not {type(key).__name__}")
    if not key:
        raise DataError("a key must not be empty")
    return _check_text(key, "key")


def check_prefix(prefix: object) -> str:
    """Return `prefix` when it is a usable key prefix (possibly empty), else raise DataError."""
    if not isinstance(prefix, str):
        raise DataError(f"a prefix must be a string, not {type(prefix).__name__}")
    return _check_text(prefix, "prefix")


def _check_text(text: str, what: str) -> str:
    if len(text) > KEY_MAX_CHARS:
        raise DataError(f"a {what} may hold at most {KEY_MAX_CHARS} characters, not {len(text)}")
    if not text.isprintable():
        bad = next(char for char in text if not char.isprintable())
        raise DataError(
            f"{what} {text[:40]!r} holds {bad!r}: keys take printable characters only "
            "(no control characters, line breaks or NUL)"
        )
    return text


def check_keys(keys: object, max_items: int) -> list[str]:
    """Return `keys` as a list of valid keys, at most `max_items` of them."""
    if isinstance(keys, str) or not isinstance(keys, list | tuple):
        raise DataError(f"keys must be a list of strings, not {type(keys).__name__}")
    if len(keys) > max_items:
        raise DataError(f"a batch may hold at most {max_items} keys, not {len(keys)}")
    return [check_key(key) for key in keys]


def encode_value(value: Any, max_bytes: int) -> str:
    """Serialise `value` to JSON text, refusing what cannot round-trip and what is too large."""
    try:
        data = orjson.dumps(value, option=_DUMPS_OPTIONS)
    except orjson.JSONEncodeError as exc:
        raise DataError(f"the value is not JSON-serialisable: {exc}") from exc
    # orjson writes NaN and infinities as null, so only JSON holding "null" can hide one.
    if b"null" in data and _has_non_finite(value):
        raise DataError("the value holds NaN or an infinity, which JSON cannot represent")
    if len(data) > max_bytes:
        raise DataError(f"the value is {len(data)} bytes as JSON; the limit is {max_bytes} bytes")
    return data.decode()


def _has_non_finite(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return False


def check_page(limit: object, offset: object, max_limit: int) -> tuple[int, int]:
    """Return (limit, offset), with `limit` defaulting to `max_limit`."""
    if limit is None:
        limit = max_limit
    if not _is_int(limit) or not 0 <= limit <= max_limit:
        raise DataError(f"limit must be an integer from 0 to {max_limit}, not {limit!r}")
    if not _is_int(offset) or offset < 0:
        raise DataError(f"offset must be an integer of 0 or more, not {offset!r}")
    return limit, offset


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- Filters and orderings, independent of the backend -----------------------------------------


@dataclass(frozen=True)
class Filter:
    """One operator applied to the JSON value at `path`."""

    path: tuple[PathSegment, ...]
    op: Operator
    operand: Any


@dataclass(frozen=True)
class Ordering:
    """Sort by the key, by updated_at, or by the JSON value at `path`."""

    column: Literal["key", "updated_at", "value"]
    descending: bool = False
    path: tuple[PathSegment, ...] = ()


def _where_hint() -> str:
    return (
        "where maps a dotted path (like 'author.name') to a value, or to {operator: operand} "
        f"with operators {', '.join(OPERATORS)}"
    )


def parse_path(path: object) -> tuple[PathSegment, ...]:
    """Split a dotted path into names, with all-digit segments read as array indexes."""
    if not isinstance(path, str):
        raise DataError(f"a path must be a string, not {type(path).__name__}; {_where_hint()}")
    segments = path.split(".")
    if len(segments) > PATH_MAX_SEGMENTS or not all(_SEGMENT.fullmatch(s) for s in segments):
        raise DataError(
            f"bad path {path[:80]!r}: use up to {PATH_MAX_SEGMENTS} dot-separated names of "
            f"letters, digits, '_' or '-'; {_where_hint()}"
        )
    return tuple(int(s) if s.isdigit() else s for s in segments)


def parse_where(where: object) -> list[Filter]:
    """Turn an app's `where` mapping into filters that all must hold."""
    if where is None:
        return []
    if not isinstance(where, Mapping):
        raise DataError(f"where must be a mapping, not {type(where).__name__}; {_where_hint()}")
    filters: list[Filter] = []
    for raw_path, condition in where.items():
        path = parse_path(raw_path)
        if not isinstance(condition, Mapping):
            filters.append(_filter(raw_path, path, "eq", condition))
            continue
        if not condition:
            raise DataError(f"no operator given for {raw_path!r}; {_where_hint()}")
        for op, operand in condition.items():
            filters.append(_filter(raw_path, path, op, operand))
    return filters


def _filter(raw_path: str, path: tuple[PathSegment, ...], op: object, operand: Any) -> Filter:
    if op not in OPERATORS:
        raise DataError(f"unknown operator {op!r} for {raw_path!r}; {_where_hint()}")
    operand = _check_operand(op, operand, f"{op} on {raw_path!r}")
    return Filter(path, op, operand)  # type: ignore[arg-type]


def _check_operand(op: object, operand: Any, label: str) -> Any:
    """Return `operand` in the form its operator takes, or raise DataError naming `label`."""
    if op in ("eq", "ne", "contains"):
        _check_scalar(operand, label)
    elif op in ("lt", "lte", "gt", "gte"):
        if not isinstance(operand, str | int | float) or isinstance(operand, bool):
            raise DataError(f"{label} compares with a number or a string, not {operand!r}")
        _check_scalar(operand, label)
    elif op == "in":
        if not isinstance(operand, list | tuple) or len(operand) > IN_MAX_VALUES:
            raise DataError(f"{label} takes a list of at most {IN_MAX_VALUES} values")
        for item in operand:
            _check_scalar(item, label)
        return tuple(operand)
    elif not isinstance(operand, bool):
        raise DataError(f"{label} takes true or false, not {operand!r}")
    return operand


def _check_scalar(value: object, label: str) -> None:
    if value is None or isinstance(value, str | bool):
        return
    if isinstance(value, int):
        if value not in _INT64:
            raise DataError(f"{label}: {value} is outside the 64-bit integer range")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DataError(f"{label}: NaN and infinities cannot be compared")
        return
    raise DataError(
        f"{label} compares with a string, number, boolean or null, not {type(value).__name__}"
    )


def parse_order(order_by: object) -> Ordering:
    """Read 'key', 'updated_at' or a dotted value path, with a leading '-' for descending."""
    if order_by is None:
        return Ordering("key")
    if not isinstance(order_by, str):
        raise DataError(f"order_by must be a string, not {type(order_by).__name__}")
    descending = order_by.startswith("-")
    name = order_by.removeprefix("-")
    if name in ("key", "updated_at"):
        return Ordering(name, descending)  # type: ignore[arg-type]
    try:
        path = parse_path(name)
    except DataError:
        raise DataError(
            f"bad order_by {order_by[:80]!r}: use 'key', 'updated_at' or a dotted path into the "
            "value like 'author.name', with a leading '-' for descending"
        ) from None
    return Ordering("value", descending, path)


@dataclass(frozen=True)
class Query:
    """A validated `query` call."""

    prefix: str
    filters: list[Filter]
    ordering: Ordering
    limit: int
    offset: int


# --- SQL for SQLite ----------------------------------------------------------------------------


class _Params:
    """Bound parameters of one statement; `add` returns the placeholder to write in its place.

    Placeholders are numbered, so fragments may be built in any order, and a value bound twice
    (a path used by several expressions) takes one parameter.
    """

    def __init__(self) -> None:
        self.values: list[Scalar] = []
        self._numbers: dict[tuple[type, Scalar], int] = {}

    def add(self, value: Scalar) -> str:
        # The type is part of the identity: True, 1 and 1.0 are equal in Python but not here.
        number = self._numbers.setdefault((type(value), value), len(self.values) + 1)
        if number > len(self.values):
            self.values.append(value)
        return f"?{number}"


Statement = tuple[str, list[Any]]

# Postgres orders jsonb as string < number < boolean < array < object; ranking types the same way
# here keeps sorts of mixed-type fields alike on both backends.
_TYPE_RANK = (
    "CASE {type} WHEN 'text' THEN 1 WHEN 'integer' THEN 2 WHEN 'real' THEN 2 "
    "WHEN 'false' THEN 3 WHEN 'true' THEN 3 WHEN 'array' THEN 4 WHEN 'object' THEN 5 END"
)


class SqliteSql:
    """Every statement the SQLite backend runs; values are always bound, never written into SQL."""

    MIGRATIONS: tuple[tuple[str, ...], ...] = (
        (
            "CREATE TABLE app_data ("
            " app_id TEXT NOT NULL, user_id TEXT NOT NULL, key TEXT NOT NULL,"
            " value TEXT NOT NULL, updated_at INTEGER NOT NULL,"
            " PRIMARY KEY (app_id, user_id, key))",
            "CREATE INDEX app_data_updated ON app_data (app_id, user_id, updated_at)",
        ),
    )

    @staticmethod
    def json_path(path: tuple[PathSegment, ...]) -> str:
        """Render segments as a SQLite JSON path, e.g. ('a', 'b-c', 0) -> '$."a"."b-c"[0]'."""
        return "$" + "".join(f"[{s}]" if isinstance(s, int) else f'."{s}"' for s in path)

    def upsert(self, scope: Scope, key: str, value: str, updated_at: int) -> Statement:
        params = _Params()
        row = [scope.app_id, scope.user_id, key, value, updated_at]
        sql = (
            "INSERT INTO app_data (app_id, user_id, key, value, updated_at)"
            f" VALUES ({', '.join(params.add(item) for item in row)})"
            " ON CONFLICT (app_id, user_id, key)"
            " DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at"
        )
        return sql, params.values

    def load(self, scope: Scope, keys: list[str]) -> Statement:
        params = _Params()
        where = self._scope_and_keys(scope, keys, params)
        return f"SELECT d.key, d.value FROM app_data AS d WHERE {where}", params.values

    def delete(self, scope: Scope, keys: list[str]) -> Statement:
        params = _Params()
        where = self._scope_and_keys(scope, keys, params)
        return f"DELETE FROM app_data AS d WHERE {where}", params.values

    def keys(self, scope: Scope, prefix: str) -> Statement:
        params = _Params()
        where = self._scope_and_prefix(scope, prefix, params)
        return f"SELECT d.key FROM app_data AS d WHERE {where} ORDER BY d.key", params.values

    def query(self, scope: Scope, query: Query) -> Statement:
        params = _Params()
        conditions = [self._scope_and_prefix(scope, query.prefix, params)]
        conditions += [self._condition(f, params) for f in query.filters]
        order = self._order(query.ordering, params)
        sql = (
            "SELECT d.key, d.value, d.updated_at FROM app_data AS d"
            f" WHERE {' AND '.join(conditions)} ORDER BY {order}"
            f" LIMIT {params.add(query.limit)} OFFSET {params.add(query.offset)}"
        )
        return sql, params.values

    def _scope_and_prefix(self, scope: Scope, prefix: str, params: _Params) -> str:
        sql = f"d.app_id = {params.add(scope.app_id)} AND d.user_id = {params.add(scope.user_id)}"
        if prefix:
            # A range rather than LIKE: exact for any characters, and it uses the primary key.
            sql += f" AND d.key >= {params.add(prefix)} AND d.key < {params.add(prefix + _TOP)}"
        return sql

    def _scope_and_keys(self, scope: Scope, keys: list[str], params: _Params) -> str:
        # One JSON array parameter instead of one per key keeps any batch under SQLite's
        # bound-parameter limit.
        keys_json = params.add(orjson.dumps(keys).decode())
        return (
            f"d.app_id = {params.add(scope.app_id)} AND d.user_id = {params.add(scope.user_id)}"
            f" AND d.key IN (SELECT value FROM json_each({keys_json}))"
        )

    def _type(self, path: tuple[PathSegment, ...], params: _Params) -> str:
        return f"json_type(d.value, {params.add(self.json_path(path))})"

    def _extract(self, path: tuple[PathSegment, ...], params: _Params) -> str:
        return f"json_extract(d.value, {params.add(self.json_path(path))})"

    def _condition(self, f: Filter, params: _Params) -> str:
        if f.op == "exists":
            return f"{self._type(f.path, params)} IS {'NOT ' if f.operand else ''}NULL"
        if f.op == "eq":
            return self._equals(f.path, f.operand, params)
        if f.op == "ne":
            present = f"{self._type(f.path, params)} IS NOT NULL"
            return f"({present} AND NOT {self._equals(f.path, f.operand, params)})"
        if f.op == "in":
            options = [self._equals(f.path, item, params) for item in f.operand]
            return f"({' OR '.join(options)})" if options else "0 = 1"
        if f.op == "contains":
            return self._contains(f.path, f.operand, params)
        return self._compare(f.path, f.op, f.operand, params)

    def _equals(self, path: tuple[PathSegment, ...], operand: Scalar, params: _Params) -> str:
        type_sql, value_sql = self._type(path, params), self._extract(path, params)
        return _scalar_match(type_sql, value_sql, operand, params)

    def _compare(
        self, path: tuple[PathSegment, ...], op: Operator, operand: str | float, params: _Params
    ) -> str:
        sign = {"lt": "<", "lte": "<=", "gt": ">", "gte": ">="}[op]
        type_sql, value_sql = self._type(path, params), self._extract(path, params)
        return f"({_type_is(type_sql, operand)} AND {value_sql} {sign} {params.add(operand)})"

    def _contains(self, path: tuple[PathSegment, ...], operand: Scalar, params: _Params) -> str:
        type_sql, json_path = self._type(path, params), params.add(self.json_path(path))
        element = _scalar_match("e.type", "e.value", operand, params)
        array = (
            f"({type_sql} = 'array' AND EXISTS"
            f" (SELECT 1 FROM json_each(d.value, {json_path}) AS e WHERE {element}))"
        )
        if not isinstance(operand, str):
            return array
        value_sql = self._extract(path, params)
        text = f"({type_sql} = 'text' AND instr({value_sql}, {params.add(operand)}) > 0)"
        return f"({array} OR {text})"

    def _order(self, ordering: Ordering, params: _Params) -> str:
        direction = "DESC" if ordering.descending else "ASC"
        if ordering.column != "value":
            tie = "" if ordering.column == "key" else ", d.key ASC"
            return f"d.{ordering.column} {direction}{tie}"
        type_sql = self._type(ordering.path, params)
        value_sql = self._extract(ordering.path, params)
        missing = f"COALESCE({type_sql}, 'null') = 'null'"
        rank = _TYPE_RANK.format(type=type_sql)
        return f"{missing} ASC, {rank} {direction}, {value_sql} {direction}, d.key ASC"


def _scalar_match(type_sql: str, value_sql: str, operand: Scalar, params: _Params) -> str:
    """SQL true when a JSON item (given by its json_type and SQL value) equals `operand`.

    Matching on the JSON type keeps true apart from 1 and "1", which SQLite's values blur.
    """
    if operand is None:
        return f"{type_sql} = 'null'"
    if isinstance(operand, bool):
        return f"{type_sql} = '{'true' if operand else 'false'}'"
    return f"({_type_is(type_sql, operand)} AND {value_sql} = {params.add(operand)})"


def _type_is(type_sql: str, operand: str | float) -> str:
    """SQL true when the JSON type is the kind of `operand`: text, or either kind of number."""
    if isinstance(operand, str):
        return f"{type_sql} = 'text'"
    return f"{type_sql} IN ('integer', 'real')"


# --- Time stamps -------------------------------------------------------------------------------


class _Clock:
    """Microsecond stamps that strictly increase within the process, even within one microsecond."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0

    def tick(self) -> int:
        with self._lock:
            self._last = max(time.time_ns() // 1000, self._last + 1)
            return self._last


_CLOCK = _Clock()


def iso_time(micros: int) -> str:
    """Render microseconds since the epoch as ISO-8601 UTC, e.g. '2026-12-04T16:20:01.123456Z'."""
    return (_EPOCH + timedelta(microseconds=micros)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- The store ---------------------------------------------------------------------------------


class SqliteAppData:
    """App data in one SQLite file, safe to share between worker processes.

    All SQLite work runs on one dedicated thread holding one connection, so the event loop never
    blocks. The file is in WAL mode with a busy timeout, and every transaction is one statement or
    one short batch. A query page and a batch each hold at most `max_query_limit` keys.

    Query semantics (the Postgres backend matches them):

    - `where` maps a dotted path into the value to a plain value (meaning eq) or to a mapping of
      operators: eq, ne, lt, lte, gt, gte, in, contains, exists. All conditions must hold.
      Operands are strings, numbers, booleans or null; true equals only true, never 1.
    - A path missing from a value matches no operator except ``exists: False``; ``ne`` needs the
      field present. lt/lte/gt/gte compare numbers with numbers and strings with strings only.
    - ``contains`` holds when an array field has an element equal to the operand, or a string
      field has the operand as a substring.
    - `order_by` is 'key', 'updated_at' or a dotted value path, with '-' for descending. Values that
      are missing or null sort last in both directions; a field of mixed types sorts strings, then
      numbers, booleans, arrays, objects (reversed when descending). Ties go by key ascending.
    """

    def __init__(
        self, path: str | Path, *, max_value_bytes: int = 1_048_576, max_query_limit: int = 1000
    ) -> None:
        self.path = Path(path)
        self.max_value_bytes = max_value_bytes
        self.max_query_limit = max_query_limit
        self.sql = SqliteSql()
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    async def __aenter__(self) -> SqliteAppData:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Create the file if needed, switch it to WAL and bring its schema up to date."""
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="appdata")
        loop = asyncio.get_running_loop()
        try:
            self._conn = await loop.run_in_executor(self._executor, self._connect)
        except BaseException as exc:
            self._executor.shutdown(wait=False)
            self._executor = None
            if isinstance(exc, sqlite3.Error | OSError):
                raise StoreError(f"cannot open app data at {self.path}: {exc}") from exc
            raise
        log.info("appdata_opened", path=str(self.path))

    async def close(self) -> None:
        """Close the connection and stop the thread; safe to call twice."""
        executor, conn = self._executor, self._conn
        self._executor, self._conn = None, None
        if executor is None:
            return
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        executor.shutdown(wait=False)
        log.info("appdata_closed", path=str(self.path))

    async def store(self, scope: Scope, key: str, value: Any) -> None:
        """Set the value of `key`, replacing any value it had."""
        await self.store_many(scope, {check_key(key): value})

    async def load(self, scope: Scope, key: str) -> Any | None:
        """The value of `key`, or None when there is none."""
        found = await self.load_many(scope, [key])
        return found.get(key)

    async def remove(self, scope: Scope, key: str) -> bool:
        """Delete `key`; True when it existed."""
        return await self.remove_many(scope, [key]) == 1

    async def keys(self, scope: Scope, prefix: str = "") -> list[str]:
        """Every key that starts with `prefix`, sorted."""
        sql, params = self.sql.keys(scope, check_prefix(prefix))
        rows = await self._run(lambda conn: conn.execute(sql, params).fetchall())
        return [row[0] for row in rows]

    async def query(
        self,
        scope: Scope,
        prefix: str = "",
        where: dict[str, Any] | None = None,
        order_by: str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """A page of ``{"key", "value", "updated_at"}`` rows; see the class docstring for rules."""
        limit, offset = check_page(limit, offset, self.max_query_limit)
        filters, ordering = parse_where(where), parse_order(order_by)
        query = Query(check_prefix(prefix), filters, ordering, limit, offset)
        sql, params = self.sql.query(scope, query)

        def fetch(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(sql, params).fetchall()
            return [
                {"key": key, "value": orjson.loads(value), "updated_at": iso_time(micros)}
                for key, value, micros in rows
            ]

        return await self._run(fetch)

    async def store_many(self, scope: Scope, items: dict[str, Any]) -> None:
        """Set several keys in one transaction; nothing is written if any item is invalid."""
        if not isinstance(items, Mapping):
            raise DataError(f"items must be a mapping of key to value, not {type(items).__name__}")
        check_keys(list(items), self.max_query_limit)
        encoded = {key: encode_value(value, self.max_value_bytes) for key, value in items.items()}
        await self._run(lambda conn: self._write_all(conn, scope, encoded))

    def _write_all(self, conn: sqlite3.Connection, scope: Scope, encoded: dict[str, str]) -> None:
        with _write_transaction(conn):
            for key, value in encoded.items():
                conn.execute(*self.sql.upsert(scope, key, value, _CLOCK.tick()))

    async def load_many(self, scope: Scope, keys: list[str]) -> dict[str, Any]:
        """The values of those `keys` that exist, in one statement."""
        sql, params = self.sql.load(scope, check_keys(keys, self.max_query_limit))

        def fetch(conn: sqlite3.Connection) -> dict[str, Any]:
            return {key: orjson.loads(value) for key, value in conn.execute(sql, params)}

        return await self._run(fetch)

    async def remove_many(self, scope: Scope, keys: list[str]) -> int:
        """Delete `keys` in one statement; returns how many existed."""
        sql, params = self.sql.delete(scope, check_keys(keys, self.max_query_limit))
        return await self._run(lambda conn: conn.execute(sql, params).rowcount)

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        executor, conn = self._executor, self._conn
        if executor is None or conn is None:
            raise StoreError("the app data store is not open")
        # A cancelled caller does not stop the job: a write already queued still commits whole.
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, work, conn)
        except sqlite3.Error as exc:
            raise StoreError(f"app data store failed: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            _migrate(conn, self.sql.MIGRATIONS)
        except BaseException:
            conn.close()
            raise
        return conn


@contextmanager
def _write_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """Run the block in one transaction, committed at its end and rolled back if it raises."""
    # IMMEDIATE takes the write lock up front, where the busy timeout applies, instead of
    # failing on a lock upgrade midway.
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _migrate(conn: sqlite3.Connection, migrations: tuple[tuple[str, ...], ...]) -> None:
    """Apply the migrations this file lacks, in one transaction that other openers wait on."""
    with _write_transaction(conn):
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version"
            " (component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
        )
        row = conn.execute("SELECT version FROM schema_version WHERE component = 'app_data'")
        current = (row.fetchone() or (0,))[0]
        if current > len(migrations):
            raise StoreError(f"app data schema is at version {current}, newer than this code")
        for version in range(current + 1, len(migrations) + 1):
            for statement in migrations[version - 1]:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_version (component, version) VALUES ('app_data', ?)"
                " ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                (version,),
            )
            log.info("appdata_migrated", version=version)
