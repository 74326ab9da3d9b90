"""App data: one JSON value per key, scoped to (app, user), with filters and sorting done in SQL.

Input from apps is parsed into backend-neutral filters and orderings first; `SqliteSql` and
`PostgresSql` then render every statement their backend runs, and `open_app_data` picks the backend
a database URL names.
"""

from __future__ import annotations

import asyncio
import math
import re
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self, TypeGuard, TypeVar
from urllib.parse import unquote, urlsplit

import orjson
import structlog

from workers import WorkerError

if TYPE_CHECKING:
    from psycopg import AsyncConnection
    from psycopg_pool import AsyncConnectionPool

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
    # Postgres cannot keep NUL in text or JSONB; refusing it on every backend keeps an app that
    # works on SQLite working on Postgres. Only JSON holding "\u0000" can hold one.
    if b"\\u0000" in data and _has_nul(value):
        raise DataError("the value holds the NUL character (\\u0000), which the store cannot keep")
    if len(data) > max_bytes:
        raise DataError(f"the value is {len(data)} bytes as JSON; the limit is {max_bytes} bytes")
    return data.decode()


def _has_non_finite(value: Any) -> bool:
    return any(isinstance(item, float) and not math.isfinite(item) for item in _walk(value))


def _has_nul(value: Any) -> bool:
    return any(isinstance(item, str) and "\x00" in item for item in _walk(value))


def _walk(value: Any) -> Iterator[Any]:
    """Every item of a JSON-like value, containers and the keys of mappings included."""
    stack = [value]
    while stack:
        item = stack.pop()
        yield item
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)


def check_page(limit: object, offset: object, max_limit: int) -> tuple[int, int]:
    """Return (limit, offset), with `limit` defaulting to `max_limit`."""
    if limit is None:
        limit = max_limit
    if not _is_int(limit) or not 0 <= limit <= max_limit:
        raise DataError(f"limit must be an integer from 0 to {max_limit}, not {limit!r}")
    if not _is_int(offset) or offset < 0:
        raise DataError(f"offset must be an integer of 0 or more, not {offset!r}")
    return limit, offset


def _is_int(value: object) -> TypeGuard[int]:
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
        row: list[Scalar] = [scope.app_id, scope.user_id, key, value, updated_at]
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

    def clone(self, source: Scope, target: Scope) -> Statement:
        params = _Params()
        sql = (
            "INSERT OR IGNORE INTO app_data (app_id, user_id, key, value, updated_at)"
            f" SELECT {params.add(target.app_id)}, {params.add(target.user_id)}, d.key, d.value,"
            f" d.updated_at FROM app_data AS d WHERE d.app_id = {params.add(source.app_id)}"
            f" AND d.user_id = {params.add(source.user_id)}"
        )
        return sql, params.values

    def drop_app(self, app_id: str) -> Statement:
        params = _Params()
        return f"DELETE FROM app_data WHERE app_id = {params.add(app_id)}", params.values

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


# --- SQL for Postgres --------------------------------------------------------------------------

PgStatement = tuple[str, dict[str, Any]]


class _TypedParams:
    """Named parameters for psycopg; `add` returns a typed placeholder such as ``%(p3)s::text``.

    Each placeholder states its type, so the server never guesses one, and a value is shared only
    between uses of one type, since Postgres refuses a parameter deduced as two types.
    """

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self._names: dict[tuple[str, type, Any], str] = {}

    def add(self, value: Any, cast: str) -> str:
        identity = (cast, type(value), tuple(value) if isinstance(value, list) else value)
        name = self._names.setdefault(identity, f"p{len(self._names) + 1}")
        self.values[name] = value
        return f"%({name})s::{cast}"


class PostgresSql:
    """Every statement the Postgres backend runs, selecting and ordering rows as SqliteSql does.

    Paths are strict jsonpaths, so an index never reads an object's key nor a name an array's item,
    as with SQLite's paths. Strings compare in the "C" collation, UTF-8 byte order like SQLite's.
    `value_json` keeps the exact text that was stored: JSONB rewrites numbers (1e16 reads back as
    10000000000000000) and object key order, and `load` returns what `store` was given.
    """

    MIGRATIONS: tuple[tuple[str, ...], ...] = (
        (
            "CREATE TABLE app_data ("
            ' app_id text NOT NULL, user_id text NOT NULL, key text COLLATE "C" NOT NULL,'
            " value jsonb NOT NULL, value_json text NOT NULL, updated_at bigint NOT NULL,"
            " PRIMARY KEY (app_id, user_id, key))",
            "CREATE INDEX app_data_updated ON app_data (app_id, user_id, updated_at)",
        ),
    )

    @staticmethod
    def json_path(path: tuple[PathSegment, ...]) -> str:
        """Render segments as a strict jsonpath, e.g. ('a', 'b-c', 0) -> 'strict $."a"."b-c"[0]'."""
        return "strict $" + "".join(f"[{s}]" if isinstance(s, int) else f'."{s}"' for s in path)

    def upsert(self, scope: Scope, encoded: dict[str, str], stamps: list[int]) -> PgStatement:
        params = _TypedParams()
        rows = ", ".join(
            params.add(column, "text[]" if index < 2 else "bigint[]")
            for index, column in enumerate((list(encoded), list(encoded.values()), stamps))
        )
        sql = (
            "INSERT INTO app_data (app_id, user_id, key, value, value_json, updated_at)"
            f" SELECT {params.add(scope.app_id, 'text')}, {params.add(scope.user_id, 'text')},"
            " item.key, item.value_json::jsonb, item.value_json, item.updated_at"
            f" FROM unnest({rows}) AS item (key, value_json, updated_at)"
            " ON CONFLICT (app_id, user_id, key) DO UPDATE SET value = excluded.value,"
            " value_json = excluded.value_json, updated_at = excluded.updated_at"
        )
        return sql, params.values

    def load(self, scope: Scope, keys: list[str]) -> PgStatement:
        params = _TypedParams()
        where = f"{self._scope(scope, params)} AND d.key = ANY({params.add(keys, 'text[]')})"
        return f"SELECT d.key, d.value_json FROM app_data AS d WHERE {where}", params.values

    def delete(self, scope: Scope, keys: list[str]) -> PgStatement:
        params = _TypedParams()
        where = f"{self._scope(scope, params)} AND d.key = ANY({params.add(keys, 'text[]')})"
        return f"DELETE FROM app_data AS d WHERE {where}", params.values

    def clone(self, source: Scope, target: Scope) -> PgStatement:
        params = _TypedParams()
        sql = (
            "INSERT INTO app_data (app_id, user_id, key, value, value_json, updated_at)"
            f" SELECT {params.add(target.app_id, 'text')}, {params.add(target.user_id, 'text')},"
            " d.key, d.value, d.value_json, d.updated_at FROM app_data AS d"
            f" WHERE d.app_id = {params.add(source.app_id, 'text')}"
            f" AND d.user_id = {params.add(source.user_id, 'text')}"
            " ON CONFLICT (app_id, user_id, key) DO NOTHING"
        )
        return sql, params.values

    def drop_app(self, app_id: str) -> PgStatement:
        params = _TypedParams()
        return f"DELETE FROM app_data WHERE app_id = {params.add(app_id, 'text')}", params.values

    def keys(self, scope: Scope, prefix: str) -> PgStatement:
        params = _TypedParams()
        where = self._scope_and_prefix(scope, prefix, params)
        return f"SELECT d.key FROM app_data AS d WHERE {where} ORDER BY d.key", params.values

    def query(self, scope: Scope, query: Query) -> PgStatement:
        params = _TypedParams()
        conditions = [self._scope_and_prefix(scope, query.prefix, params)]
        conditions += [self._condition(f, params) for f in query.filters]
        order = self._order(query.ordering, params)
        sql = (
            "SELECT d.key, d.value_json, d.updated_at FROM app_data AS d"
            f" WHERE {' AND '.join(conditions)} ORDER BY {order}"
            f" LIMIT {params.add(query.limit, 'bigint')}"
            f" OFFSET {params.add(query.offset, 'bigint')}"
        )
        return sql, params.values

    def _scope(self, scope: Scope, params: _TypedParams) -> str:
        app, user = params.add(scope.app_id, "text"), params.add(scope.user_id, "text")
        return f"d.app_id = {app} AND d.user_id = {user}"

    def _scope_and_prefix(self, scope: Scope, prefix: str, params: _TypedParams) -> str:
        sql = self._scope(scope, params)
        if prefix:
            # The key column sorts in "C", so this range is exact and walks the primary key.
            low, high = params.add(prefix, "text"), params.add(prefix + _TOP, "text")
            sql += f" AND d.key >= {low} AND d.key < {high}"
        return sql

    def _item(self, path: tuple[PathSegment, ...], params: _TypedParams) -> str:
        """The JSONB item at `path`, SQL NULL when the path is missing (JSON null is 'null')."""
        json_path = params.add(self.json_path(path), "jsonpath")
        return f"jsonb_path_query_first(d.value, {json_path}, '{{}}', true)"

    def _condition(self, f: Filter, params: _TypedParams) -> str:
        item = self._item(f.path, params)
        if f.op == "exists":
            return f"{item} IS {'NOT ' if f.operand else ''}NULL"
        if f.op == "eq":
            return _pg_match(item, f.operand, params)
        if f.op == "ne":
            return f"({item} IS NOT NULL AND NOT {_pg_match(item, f.operand, params)})"
        if f.op == "in":
            options = [_pg_match(item, option, params) for option in f.operand]
            return f"({' OR '.join(options)})" if options else "false"
        if f.op == "contains":
            return self._contains(item, f.operand, params)
        sign = {"lt": "<", "lte": "<=", "gt": ">", "gte": ">="}[f.op]
        return f"({_pg_typed(item, f.operand)} {sign} {_pg_operand(f.operand, params)}) IS TRUE"

    def _contains(self, item: str, operand: Scalar, params: _TypedParams) -> str:
        # The CASE hands jsonb_array_elements only arrays, whatever order the planner picks.
        elements = f"jsonb_array_elements(CASE WHEN jsonb_typeof({item}) = 'array' THEN {item} END)"
        element = _pg_match("e.item", operand, params)
        array = f"EXISTS (SELECT 1 FROM {elements} AS e (item) WHERE {element})"
        if not isinstance(operand, str):
            return array
        text = f"(strpos({_pg_text(item)}, {params.add(operand, 'text')}) > 0) IS TRUE"
        return f"({array} OR {text})"

    def _order(self, ordering: Ordering, params: _TypedParams) -> str:
        direction = "DESC" if ordering.descending else "ASC"
        if ordering.column != "value":
            tie = "" if ordering.column == "key" else ", d.key ASC"
            return f"d.{ordering.column} {direction}{tie}"
        item = self._item(ordering.path, params)
        missing = f"COALESCE(jsonb_typeof({item}), 'null') = 'null'"
        rank = _PG_TYPE_RANK.format(item=item)
        # One sort key per type, each NULL outside its type; within a rank only one applies.
        typed = [_pg_text(item), _pg_number(item), _pg_boolean(item), _pg_container(item)]
        keys = ", ".join(f"{key} {direction}" for key in [rank, *typed])
        return f"{missing} ASC, {keys}, d.key ASC"


_PG_TYPE_RANK = (
    "CASE jsonb_typeof({item}) WHEN 'string' THEN 1 WHEN 'number' THEN 2 WHEN 'boolean' THEN 3"
    " WHEN 'array' THEN 4 WHEN 'object' THEN 5 END"
)


def _pg_text(item: str) -> str:
    """The item as text in the "C" collation when it is a JSON string, else NULL."""
    return f"(CASE WHEN jsonb_typeof({item}) = 'string' THEN {item} #>> '{{}}' END) COLLATE \"C\""


def _pg_number(item: str) -> str:
    """The item as numeric when it is a JSON number, else NULL (never a failed cast)."""
    return f"(CASE WHEN jsonb_typeof({item}) = 'number' THEN ({item})::numeric END)"


def _pg_boolean(item: str) -> str:
    return f"(CASE WHEN jsonb_typeof({item}) = 'boolean' THEN ({item})::boolean END)"


def _pg_container(item: str) -> str:
    """The item when it is an array or an object (JSONB orders those), else NULL."""
    return f"(CASE WHEN jsonb_typeof({item}) IN ('array', 'object') THEN {item} END)"


def _pg_typed(item: str, operand: str | float) -> str:
    """The item as the kind of `operand` (text or number), NULL when it is of another kind."""
    return _pg_text(item) if isinstance(operand, str) else _pg_number(item)


def _pg_operand(operand: str | float, params: _TypedParams) -> str:
    if isinstance(operand, str):
        return params.add(operand, "text")
    # Integers compare exactly; a float compares as float8, as SQLite compares reals.
    return params.add(operand, "numeric" if isinstance(operand, int) else "float8")


def _pg_match(item: str, operand: Scalar, params: _TypedParams) -> str:
    """SQL that is true or false, never NULL: the JSONB `item` equals `operand`, type and all."""
    if operand is None:
        return f"(jsonb_typeof({item}) = 'null') IS TRUE"
    if isinstance(operand, bool):
        return f"({item} = '{'true' if operand else 'false'}'::jsonb) IS TRUE"
    return f"({_pg_typed(item, operand)} = {_pg_operand(operand, params)}) IS TRUE"


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


# --- The stores --------------------------------------------------------------------------------


class AppData(ABC):
    """The API of every app-data backend: input is checked here, SQL and I/O live in subclasses.

    A query page and a batch each hold at most `max_query_limit` keys. Query semantics, alike on
    every backend:

    - `where` maps a dotted path into the value to a plain value (meaning eq) or to a mapping of
      operators: eq, ne, lt, lte, gt, gte, in, contains, exists. All conditions must hold.
      Operands are strings, numbers, booleans or null; true equals only true, never 1.
    - A path missing from a value matches no operator except ``exists: False``; ``ne`` needs the
      field present. lt/lte/gt/gte compare numbers with numbers and strings with strings only.
      Strings compare by code point.
    - ``contains`` holds when an array field has an element equal to the operand, or a string
      field has the operand as a substring.
    - `order_by` is 'key', 'updated_at' or a dotted value path, with '-' for descending. Values that
      are missing or null sort last in both directions; a field of mixed types sorts strings, then
      numbers, booleans, arrays, objects (reversed when descending). Ties go by key ascending.
      Arrays among arrays, and objects among objects, sort in an order each backend defines.
    """

    sql: SqliteSql | PostgresSql

    def __init__(self, *, max_value_bytes: int, max_query_limit: int) -> None:
        self.max_value_bytes = max_value_bytes
        self.max_query_limit = max_query_limit

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @abstractmethod
    async def open(self) -> None:
        """Connect and bring the schema up to date; a StoreError says why when it cannot."""

    @abstractmethod
    async def close(self) -> None:
        """Let go of connections; safe to call twice."""

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
        rows = await self._fetch(self.sql.keys(scope, check_prefix(prefix)))
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

        rows = await self._fetch(self.sql.query(scope, query))

        return [
            {"key": key, "value": orjson.loads(value), "updated_at": iso_time(micros)}
            for key, value, micros in rows
        ]

    async def store_many(self, scope: Scope, items: dict[str, Any]) -> None:
        """Set several keys in one transaction; nothing is written if any item is invalid."""
        if not isinstance(items, Mapping):
            raise DataError(f"items must be a mapping of key to value, not {type(items).__name__}")
        check_keys(list(items), self.max_query_limit)
        encoded = {key: encode_value(value, self.max_value_bytes) for key, value in items.items()}
        if encoded:
            await self._write(scope, encoded)

    async def load_many(self, scope: Scope, keys: list[str]) -> dict[str, Any]:
        """The values of those `keys` that exist, in one statement."""
        keys = check_keys(keys, self.max_query_limit)
        if not keys:
            return {}
        rows = await self._fetch(self.sql.load(scope, keys))
        return {key: orjson.loads(value) for key, value in rows}

    async def remove_many(self, scope: Scope, keys: list[str]) -> int:
        """Delete `keys` in one statement; returns how many existed."""
        keys = check_keys(keys, self.max_query_limit)
        if not keys:
            return 0
        return await self._execute(self.sql.delete(scope, keys))

    async def clone_scope(self, source: Scope, target: Scope) -> int:
        """Copy every row of ``source`` into ``target``, keeping ``updated_at``; rows already
        in ``target`` win. One statement. Used to give a replay its own view of live data."""
        return await self._execute(self.sql.clone(source, target))

    async def drop_app(self, app_id: str) -> int:
        """Delete every row of one app id (a replay's shadow space); how many there were."""
        return await self._execute(self.sql.drop_app(app_id))

    @abstractmethod
    async def _fetch(self, statement: tuple[str, Any]) -> list[tuple[Any, ...]]:
        """Every row a statement selects."""

    @abstractmethod
    async def _execute(self, statement: tuple[str, Any]) -> int:
        """Run a statement that changes rows; how many it changed."""

    @abstractmethod
    async def _write(self, scope: Scope, encoded: dict[str, str]) -> None:
        """Upsert keys with their JSON text in one transaction, stamped in the order given."""


class SqliteAppData(AppData):
    """App data in one SQLite file, safe to share between worker processes on one machine.

    All SQLite work runs on one dedicated thread holding one connection, so the event loop never
    blocks. The file is in WAL mode with a busy timeout, and every transaction is one statement or
    one short batch.
    """

    sql: SqliteSql

    def __init__(
        self, path: str | Path, *, max_value_bytes: int = 1_048_576, max_query_limit: int = 1000
    ) -> None:
        super().__init__(max_value_bytes=max_value_bytes, max_query_limit=max_query_limit)
        self.path = Path(path)
        self.sql = SqliteSql()
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

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

    async def _fetch(self, statement: tuple[str, Any]) -> list[tuple[Any, ...]]:
        sql, params = statement
        return await self._run(lambda conn: conn.execute(sql, params).fetchall())

    async def _execute(self, statement: tuple[str, Any]) -> int:
        sql, params = statement
        return await self._run(lambda conn: conn.execute(sql, params).rowcount)

    async def _write(self, scope: Scope, encoded: dict[str, str]) -> None:
        await self._run(lambda conn: self._write_all(conn, scope, encoded))

    def _write_all(self, conn: sqlite3.Connection, scope: Scope, encoded: dict[str, str]) -> None:
        with _write_transaction(conn):
            for key, value in encoded.items():
                conn.execute(*self.sql.upsert(scope, key, value, _CLOCK.tick()))

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        executor, conn = self._executor, self._conn
        if executor is None or conn is None:
            raise StoreError("the app data store is not open")
        # A cancelled caller does not stop the job: a write already queued still commits whole.
        # (Without the shield, cancelling would also drop a job still waiting for the thread.)
        try:
            job = asyncio.get_running_loop().run_in_executor(executor, work, conn)
            return await asyncio.shield(job)
        except sqlite3.Error as exc:
            raise StoreError(f"app data store failed: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            enable_wal(conn)
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


PG_CONNECT_TIMEOUT_S = 10
PG_POOL_WAIT_S = 10
# One statement's worth of a batch: a bound array must stay far below Postgres's 1 GB limit.
PG_WRITE_CHUNK_BYTES = 32 * 1024 * 1024
# Any fixed bigint; openers of one database queue on it while they migrate.
_PG_MIGRATION_LOCK = 0x756C_6170_7064_6174


class PostgresAppData(AppData):
    """App data in one Postgres table, shared by worker processes on any number of machines.

    Statements run in autocommit on pooled connections, with server-side prepared statements off
    and only transaction-scoped locks, so a transaction-mode pooler (pgbouncer, Supabase's pooler)
    may sit in between. A batch is one statement; one too large for that becomes a transaction.
    psycopg is imported on first use, so processes on SQLite do not pay for it.
    """

    sql: PostgresSql

    def __init__(
        self,
        url: str,
        *,
        max_value_bytes: int = 1_048_576,
        max_query_limit: int = 1000,
        max_connections: int = 4,
    ) -> None:
        super().__init__(max_value_bytes=max_value_bytes, max_query_limit=max_query_limit)
        self.url = url
        self.where = postgres_location(url)
        self.max_connections = max_connections
        self.sql = PostgresSql()
        self._pool: AsyncConnectionPool | None = None

    async def open(self) -> None:
        """Connect, migrate under an advisory lock, then start the connection pool."""
        if self._pool is not None:
            return
        import psycopg
        from psycopg_pool import AsyncConnectionPool

        # No server-side prepared statements: a transaction-mode pooler cannot keep them.
        options: dict[str, Any] = {"autocommit": True, "prepare_threshold": None}
        try:
            conninfo = _pg_conninfo(self.url)
            # One plain connection first: an unreachable server fails here at once, where the
            # pool would retry until its timeout.
            async with await psycopg.AsyncConnection.connect(conninfo, **options) as conn:
                await _pg_migrate(conn, self.sql.MIGRATIONS)
            pool = AsyncConnectionPool(
                conninfo,
                min_size=1,
                max_size=self.max_connections,
                kwargs=options,
                timeout=PG_POOL_WAIT_S,
                name="appdata",
                open=False,
            )
            await pool.open()
        except psycopg.Error as exc:
            reason = _scrub(_one_line(exc), self.url)
            raise StoreError(f"cannot open app data at {self.where}: {reason}") from exc
        self._pool = pool
        log.info("appdata_opened", database=self.where)

    async def close(self) -> None:
        """Close the pool; safe to call twice."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        await pool.close()
        log.info("appdata_closed", database=self.where)

    async def _fetch(self, statement: tuple[str, Any]) -> list[tuple[Any, ...]]:
        async def fetch(conn: AsyncConnection[Any]) -> list[tuple[Any, ...]]:
            cursor = await conn.execute(*statement)
            return await cursor.fetchall()

        return await self._run(fetch)

    async def _execute(self, statement: tuple[str, Any]) -> int:
        async def execute(conn: AsyncConnection[Any]) -> int:
            return (await conn.execute(*statement)).rowcount

        return await self._run(execute)

    async def _write(self, scope: Scope, encoded: dict[str, str]) -> None:
        chunks = _chunks(encoded, PG_WRITE_CHUNK_BYTES)

        async def write(conn: AsyncConnection[Any]) -> None:
            if len(chunks) == 1:
                await conn.execute(*self._upsert(scope, chunks[0]))
                return
            async with conn.transaction():
                for chunk in chunks:
                    await conn.execute(*self._upsert(scope, chunk))

        await self._run(write)

    def _upsert(self, scope: Scope, encoded: dict[str, str]) -> PgStatement:
        return self.sql.upsert(scope, encoded, [_CLOCK.tick() for _ in encoded])

    async def _run(self, work: Callable[[AsyncConnection[Any]], Awaitable[T]]) -> T:
        pool = self._pool
        if pool is None:
            raise StoreError("the app data store is not open")
        # Shielded like the SQLite thread's jobs: a cancelled caller does not cut a statement
        # short, so a write sent still commits whole and the connection goes back in order.
        return await asyncio.shield(self._on_connection(pool, work))

    async def _on_connection(
        self, pool: AsyncConnectionPool, work: Callable[[AsyncConnection[Any]], Awaitable[T]]
    ) -> T:
        import psycopg

        try:
            async with pool.connection() as conn:
                return await work(conn)
        except psycopg.Error as exc:
            raise StoreError(f"app data store failed: {_scrub(_one_line(exc), self.url)}") from exc


async def _pg_migrate(conn: AsyncConnection[Any], migrations: tuple[tuple[str, ...], ...]) -> None:
    """Apply the migrations the database lacks; concurrent openers wait on an advisory lock."""
    async with conn.transaction():
        # Transaction-scoped, so a transaction-mode pooler cannot strand it on a connection.
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_MIGRATION_LOCK,))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version"
            " (component text PRIMARY KEY, version integer NOT NULL)"
        )
        cursor = await conn.execute(
            "SELECT version FROM schema_version WHERE component = 'app_data'"
        )
        current = ((await cursor.fetchone()) or (0,))[0]
        if current > len(migrations):
            raise StoreError(f"app data schema is at version {current}, newer than this code")
        for version in range(current + 1, len(migrations) + 1):
            for statement in migrations[version - 1]:
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO schema_version (component, version) VALUES ('app_data', %s)"
                " ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                (version,),
            )
            log.info("appdata_migrated", version=version)


def _chunks(encoded: dict[str, str], max_bytes: int) -> list[dict[str, str]]:
    """Split a batch, in order, into parts of at most `max_bytes` of JSON (one item at least)."""
    chunks: list[dict[str, str]] = [{}]
    size = 0
    for key, value in encoded.items():
        if chunks[-1] and size + len(value) > max_bytes:
            chunks.append({})
            size = 0
        chunks[-1][key] = value
        size += len(value)
    return chunks


def _pg_conninfo(url: str) -> str:
    """The URL with a connect timeout unless it sets its own."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    if "connect_timeout" in conninfo_to_dict(url):
        return url
    return make_conninfo(url, connect_timeout=PG_CONNECT_TIMEOUT_S)


def postgres_location(url: str) -> str:
    """Where a Postgres URL points, fit for messages and logs: no user name, no password."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return f"{url.split(':', 1)[0]}://(an unreadable URL)"
    host = parts.hostname or "localhost"
    return f"{parts.scheme}://{host}{f':{port}' if port else ''}{parts.path}"


def _scrub(text: str, url: str) -> str:
    """`text` with the URL's password blanked out, should a driver message quote it."""
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    for secret in {password, unquote(password)} if password else ():
        text = text.replace(secret, "***")
    return text


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# --- Choosing a backend ------------------------------------------------------------------------

DATABASE_SCHEMES = ("sqlite:///", "postgresql://", "postgres://")


def open_app_data(url: str, *, max_value_bytes: int, max_query_limit: int) -> AppData:
    """The store a URL names, not yet opened: ``sqlite:///PATH`` or ``postgresql://…``."""
    limits = {"max_value_bytes": max_value_bytes, "max_query_limit": max_query_limit}
    if url.startswith("sqlite:///") and url != "sqlite:///":
        return SqliteAppData(url.removeprefix("sqlite:///"), **limits)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresAppData(url, **limits)
    # Only the scheme is quoted: the rest of a URL may hold a password.
    scheme = url.split("://", 1)[0][:20] if "://" in url else ""
    problem = f"unsupported database URL scheme {scheme!r}" if scheme else "no database URL scheme"
    raise StoreError(f"{problem}: use sqlite:///PATH, postgresql://… or postgres://…")


def enable_wal(conn: sqlite3.Connection, attempts: int = 50) -> None:
    """Switch a file to WAL. Processes opening a fresh file at once can find it locked for the
    switch, which SQLite does not wait out by itself: retry briefly."""
    for attempt in range(attempts):
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.02)
