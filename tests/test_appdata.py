"""Tests for workers.appdata: the app-data stores behind the SDK's data calls.

Every test that takes a store runs on SQLite and on a real PostgreSQL; both must give the same
answers.
"""

from __future__ import annotations

import asyncio
import math
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests import backends
from tests.backends import PostgresServer, UrlFor, run_sql
from tests.conftest import free_port
from workers import WorkerError
from workers import appdata as appdata_module
from workers.appdata import (
    OPERATORS,
    AppData,
    DataError,
    PostgresAppData,
    PostgresSql,
    Query,
    Scope,
    SqliteAppData,
    SqliteSql,
    StoreError,
    open_app_data,
    parse_order,
    parse_where,
)

# Fixtures from tests.backends.
backend = backends.backend
postgres_server = backends.postgres_server
postgres_if_needed = backends.postgres_if_needed
database_url = backends.database_url

MakeStore = Callable[..., Awaitable[AppData]]
sqlite_only = pytest.mark.parametrize("backend", ["sqlite"])
postgres_only = pytest.mark.parametrize("backend", ["postgres"])

ALICE = Scope("notes", "alice")
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


@pytest.fixture
async def make_store(database_url: UrlFor) -> AsyncIterator[MakeStore]:
    """Open stores through open_app_data; the same name twice means one shared database."""
    opened: list[AppData] = []

    async def make(
        name: str = "appdata.db", max_value_bytes: int = 1_048_576, max_query_limit: int = 1000
    ) -> AppData:
        url = await database_url(name)
        store = open_app_data(url, max_value_bytes=max_value_bytes, max_query_limit=max_query_limit)
        await store.open()
        opened.append(store)
        return store

    yield make

    for store in opened:
        await store.close()


@pytest.fixture
async def store(make_store: MakeStore) -> AppData:
    """One open store with default limits."""
    return await make_store()


async def keys_of(store: AppData, **query: Any) -> list[str]:
    """The keys a query returns, in order."""
    return [row["key"] for row in await store.query(ALICE, **query)]


# --- Single values ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "text",
        "",
        'héllo ✓ 😀 "quoted" \\ back\nslash',
        0,
        -42,
        2**63 - 1,
        1.5,
        -0.25,
        True,
        False,
        [],
        {},
        [1, "a", None, True, 2.5, [3], {"k": "v"}],
        {"text": "hi", "tags": ["a", "b"], "nested": {"deep": {"n": 1, "none": None}}},
    ],
)
async def test_round_trip_of_every_json_type(store: AppData, value: Any) -> None:
    """What is stored loads back equal and of the same type."""
    await store.store(ALICE, "k", value)

    loaded = await store.load(ALICE, "k")

    assert loaded == value
    assert type(loaded) is type(value)


async def test_null_value_is_stored_and_loads_as_none(store: AppData) -> None:
    """A stored null is a key that exists, though load cannot tell it from a missing one."""
    await store.store(ALICE, "k", None)

    assert await store.load(ALICE, "k") is None
    assert await store.keys(ALICE) == ["k"]


async def test_tuple_loads_as_list(store: AppData) -> None:
    """Tuples are JSON arrays, so they come back as lists."""
    await store.store(ALICE, "k", (1, 2))

    assert await store.load(ALICE, "k") == [1, 2]


async def test_load_missing_returns_none(store: AppData) -> None:
    """Loading a key that was never stored gives None."""
    assert await store.load(ALICE, "nothing/here") is None


async def test_store_replaces_value(store: AppData) -> None:
    """Storing a key again replaces its value."""
    await store.store(ALICE, "k", {"v": 1})
    await store.store(ALICE, "k", {"v": 2})

    assert await store.load(ALICE, "k") == {"v": 2}
    assert await store.keys(ALICE) == ["k"]


async def test_remove_twice(store: AppData) -> None:
    """remove is True when the key existed, then False, and the key is gone."""
    await store.store(ALICE, "k", 1)

    assert await store.remove(ALICE, "k") is True
    assert await store.remove(ALICE, "k") is False
    assert await store.load(ALICE, "k") is None


async def test_longest_key_is_accepted(store: AppData) -> None:
    """A key of exactly 512 characters, with punctuation and non-ASCII, is fine."""
    key = ("é'\"%_ /" * 100)[:512]

    await store.store(ALICE, key, 1)

    assert await store.load(ALICE, key) == 1


@pytest.mark.parametrize(
    "value",
    [
        1e16,
        1e300,
        5e-324,
        1.0,
        -0.0,
        0.1,
        2**63 - 1,
        -(2**63),
        {"b": 1, "a": [2.50, {"z": 0, "y": 1}]},
    ],
)
async def test_round_trip_is_exact(store: AppData, value: Any) -> None:
    """Floats stay floats at full precision and objects keep their key order on every backend."""
    await store.store(ALICE, "k", {"v": value})

    loaded = await store.load(ALICE, "k")
    (row,) = await store.query(ALICE)

    assert repr(loaded) == repr({"v": value})
    assert repr(row["value"]) == repr({"v": value})


@pytest.mark.parametrize("value", ["a\x00b", {"k": ["\x00"]}, {"nul\x00key": 1}])
async def test_nul_character_is_refused(store: AppData, value: Any) -> None:
    """NUL in a string or an object key is refused on every backend: Postgres cannot keep it."""
    with pytest.raises(DataError, match="NUL"):
        await store.store(ALICE, "k", value)

    await store.store(ALICE, "k", "a literal \\u0000 is fine")
    assert await store.load(ALICE, "k") == "a literal \\u0000 is fine"


# --- Keys and prefixes -----------------------------------------------------------------------


async def test_keys_are_sorted_and_prefix_is_exact(store: AppData) -> None:
    """`notes/` matches keys that start with it exactly, never `notes_x` or `notesy`."""
    for key in ["notes/b", "notes_x", "notes/a", "notesy", "note", "notes/a/1"]:
        await store.store(ALICE, key, 1)

    assert await store.keys(ALICE, "notes/") == ["notes/a", "notes/a/1", "notes/b"]
    everything = ["note", "notes/a", "notes/a/1", "notes/b", "notes_x", "notesy"]
    assert await store.keys(ALICE) == everything


async def test_percent_and_underscore_in_prefix_are_literal(store: AppData) -> None:
    """`%` and `_` in a prefix match only themselves, as they would not in a LIKE pattern."""
    for key in ["a%b/1", "axb/1", "a_c", "abc", "a%"]:
        await store.store(ALICE, key, 1)

    assert await store.keys(ALICE, "a%") == ["a%", "a%b/1"]
    assert await store.keys(ALICE, "a_") == ["a_c"]
    assert await keys_of(store, prefix="a%b") == ["a%b/1"]


async def test_query_prefix_is_exact(store: AppData) -> None:
    """query's prefix follows the same exact rule as keys."""
    for key in ["notes/1", "notes_1", "notes/2"]:
        await store.store(ALICE, key, {"n": 1})

    assert await keys_of(store, prefix="notes/") == ["notes/1", "notes/2"]


async def test_prefix_with_non_ascii_characters(store: AppData) -> None:
    """Prefix ranges hold for keys with characters beyond ASCII and the BMP."""
    for key in ["ü/1", "ü/😀", "ü0", "üx", "u/1"]:
        await store.store(ALICE, key, 1)

    assert await store.keys(ALICE, "ü/") == ["ü/1", "ü/😀"]


# --- Filters ---------------------------------------------------------------------------------

ROWS: dict[str, Any] = {
    "n/1": {
        "score": 10,
        "tags": ["red", "blue"],
        "nums": [1, 2],
        "pinned": True,
        "title": "Hello world",
        "author": {"name": "ann"},
    },
    "n/2": {
        "score": 2.5,
        "tags": ["green"],
        "nums": [True],
        "pinned": False,
        "title": "goodbye",
        "author": {"name": "bob"},
    },
    "n/3": {"score": "7", "tags": "red-ish", "pinned": 1, "author": {"name": None}},
    "n/4": {"score": None, "tags": [], "title": "Hello again"},
    "n/5": {"other": True},
}


@pytest.fixture
async def rows(store: AppData) -> AppData:
    """The store holding ROWS, plus a row outside the `n/` prefix."""
    await store.store_many(ALICE, ROWS)
    await store.store(ALICE, "other/1", {"score": 10, "pinned": True})
    return store


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ({"score": 10}, ["n/1"]),
        ({"score": {"eq": 10}}, ["n/1"]),
        ({"score": {"eq": 10.0}}, ["n/1"]),
        ({"score": {"eq": "7"}}, ["n/3"]),
        ({"score": {"eq": 7}}, []),
        ({"score": {"eq": None}}, ["n/4"]),
        ({"score": {"ne": 10}}, ["n/2", "n/3", "n/4"]),
        ({"score": {"ne": None}}, ["n/1", "n/2", "n/3"]),
        ({"score": {"lt": 5}}, ["n/2"]),
        ({"score": {"lte": 10}}, ["n/1", "n/2"]),
        ({"score": {"gt": 2.5}}, ["n/1"]),
        ({"score": {"gte": 2.5}}, ["n/1", "n/2"]),
        ({"score": {"gt": 0, "lt": 5}}, ["n/2"]),
        ({"score": {"gt": "5"}}, ["n/3"]),
        ({"title": {"gte": "Hello", "lt": "Hello x"}}, ["n/1", "n/4"]),
        ({"score": {"in": [10, "7"]}}, ["n/1", "n/3"]),
        ({"score": {"in": [None, 2.5]}}, ["n/2", "n/4"]),
        ({"score": {"in": []}}, []),
        ({"tags": {"contains": "red"}}, ["n/1", "n/3"]),
        ({"tags": {"contains": "gree"}}, []),
        ({"tags": {"contains": "green"}}, ["n/2"]),
        ({"title": {"contains": "ello"}}, ["n/1", "n/4"]),
        ({"nums": {"contains": 1}}, ["n/1"]),
        ({"nums": {"contains": True}}, ["n/2"]),
        ({"pinned": True}, ["n/1"]),
        ({"pinned": {"eq": False}}, ["n/2"]),
        ({"pinned": {"eq": 1}}, ["n/3"]),
        ({"pinned": {"ne": True}}, ["n/2", "n/3"]),
        ({"pinned": {"in": [True, False]}}, ["n/1", "n/2"]),
        ({"score": {"exists": True}}, ["n/1", "n/2", "n/3", "n/4"]),
        ({"score": {"exists": False}}, ["n/5"]),
        ({"author.name": "ann"}, ["n/1"]),
        ({"author.name": {"eq": None}}, ["n/3"]),
        ({"author.name": {"exists": True}}, ["n/1", "n/2", "n/3"]),
        ({"author.missing.deeper": {"exists": False}}, ["n/1", "n/2", "n/3", "n/4", "n/5"]),
        ({"tags.0": "red"}, ["n/1"]),
        ({"tags.1": {"exists": True}}, ["n/1"]),
        ({"score": {"gt": 1}, "pinned": True}, ["n/1"]),
        ({"score": {"gt": 1}, "tags": {"contains": "green"}}, ["n/2"]),
    ],
)
async def test_where_operators(rows: AppData, where: dict, expected: list[str]) -> None:
    """Each operator, alone and combined, selects exactly the matching rows under the prefix."""
    assert await keys_of(rows, prefix="n/", where=where) == expected


async def test_eq_true_is_not_false_nor_one(rows: AppData) -> None:
    """`{"pinned": {"eq": True}}` matches pinned=true only: not false, not 1, not missing."""
    pinned = await keys_of(rows, prefix="n/", where={"pinned": {"eq": True}})
    unpinned = await keys_of(rows, prefix="n/", where={"pinned": {"eq": False}})

    assert pinned == ["n/1"]
    assert unpinned == ["n/2"]


async def test_numeric_comparison_skips_rows_without_a_number(store: AppData) -> None:
    """Rows whose field is missing, null, a string, a boolean or an array never match gt/lt."""
    values: list[Any] = [5, 1, "9", None, True, [9], {"x": 9}, 7.5]
    for index, score in enumerate(values):
        await store.store(ALICE, f"r/{index}", {"score": score})
    await store.store(ALICE, "r/missing", {"other": 9})

    assert await keys_of(store, where={"score": {"gt": 2}}) == ["r/0", "r/7"]
    assert await keys_of(store, where={"score": {"lte": 2}}) == ["r/1"]


async def test_where_applies_to_scalar_and_array_values(store: AppData) -> None:
    """Values that are not objects simply lack every named path."""
    await store.store(ALICE, "s", "a string")
    await store.store(ALICE, "l", [1, 2])
    await store.store(ALICE, "o", {"a": 1})

    assert await keys_of(store, where={"a": {"exists": True}}) == ["o"]
    assert await keys_of(store, where={"0": 1}) == ["l"]


async def test_digit_segments_index_arrays_only(store: AppData) -> None:
    """'0' indexes an array, never an object's "0" key; '-1' is a name, never the last item."""
    await store.store_many(
        ALICE, {"arr": {"a": [7, 8]}, "obj": {"a": {"0": 7, "-1": 8}}, "str": {"a": "7"}}
    )

    assert await keys_of(store, where={"a.0": 7}) == ["arr"]
    assert await keys_of(store, where={"a.-1": 8}) == ["obj"]
    assert await keys_of(store, where={"a.1": {"exists": True}}) == ["arr"]
    assert await keys_of(store, where={"a.99999999999999999999": {"exists": True}}) == []


async def test_strings_compare_and_sort_by_code_point(store: AppData) -> None:
    """Keys and string values order by code point, whatever the database's default collation."""
    words = ["B", "a", "é", "😀", "a-b", "a_b", "ab", "Z", "a b", "ä"]
    await store.store_many(ALICE, {f"k/{word}": {"w": word} for word in words})

    by_value = [row["value"]["w"] for row in await store.query(ALICE, order_by="w")]
    by_key = await store.keys(ALICE)
    above = await keys_of(store, where={"w": {"gt": "a_b"}}, order_by="w")

    assert by_value == sorted(words)
    assert by_key == sorted(f"k/{word}" for word in words)
    assert above == [f"k/{word}" for word in sorted(words) if word > "a_b"]


async def test_large_integers_compare_exactly(store: AppData) -> None:
    """Integers at the edge of 64 bits match and order exactly, apart from their neighbours."""
    top = 2**63 - 1
    await store.store_many(ALICE, {"top": {"n": top}, "below": {"n": top - 1}, "neg": {"n": -top}})

    assert await keys_of(store, where={"n": top}) == ["top"]
    assert await keys_of(store, where={"n": {"gte": top - 1}}) == ["below", "top"]
    assert await keys_of(store, order_by="-n") == ["top", "below", "neg"]


# --- Ordering --------------------------------------------------------------------------------


@pytest.fixture
async def scored(store: AppData) -> AppData:
    """Rows with scores 3, 1, 2, a null score and no score, stored in a shuffled order."""
    await store.store(ALICE, "c", {"score": 2})
    await store.store(ALICE, "e", {"score": None})
    await store.store(ALICE, "a", {"score": 3})
    await store.store(ALICE, "d", {"other": 1})
    await store.store(ALICE, "b", {"score": 1})
    return store


async def test_order_by_value_ascending_puts_nulls_last(scored: AppData) -> None:
    """Ascending by a value path: smallest first, null and missing last (tied by key)."""
    assert await keys_of(scored, order_by="score") == ["b", "c", "a", "d", "e"]


async def test_order_by_value_descending_puts_nulls_last(scored: AppData) -> None:
    """Descending by a value path: largest first, null and missing still last (tied by key)."""
    assert await keys_of(scored, order_by="-score") == ["a", "c", "b", "d", "e"]


async def test_order_by_value_ties_break_by_key(store: AppData) -> None:
    """Equal values sort by key ascending in both directions."""
    for key in ["z", "m", "a"]:
        await store.store(ALICE, key, {"score": 1})
    await store.store(ALICE, "b", {"score": 2})

    assert await keys_of(store, order_by="score") == ["a", "m", "z", "b"]
    assert await keys_of(store, order_by="-score") == ["b", "a", "m", "z"]


async def test_order_by_nested_path(store: AppData) -> None:
    """A dotted path sorts by a nested field."""
    await store.store(ALICE, "1", {"author": {"name": "cy"}})
    await store.store(ALICE, "2", {"author": {"name": "al"}})
    await store.store(ALICE, "3", {"author": {}})
    await store.store(ALICE, "4", {"author": {"name": "bo"}})

    assert await keys_of(store, order_by="author.name") == ["2", "4", "1", "3"]
    assert await keys_of(store, order_by="-author.name") == ["1", "4", "2", "3"]


async def test_order_by_mixed_types_groups_by_type(store: AppData) -> None:
    """A field of mixed types sorts strings, numbers, booleans, arrays, objects, then nulls."""
    values: dict[str, Any] = {
        "obj": {"v": {"a": 1}},
        "arr": {"v": [1]},
        "yes": {"v": True},
        "no": {"v": False},
        "num": {"v": 5},
        "str": {"v": "b"},
        "nul": {"v": None},
    }
    await store.store_many(ALICE, values)

    ascending = ["str", "num", "no", "yes", "arr", "obj", "nul"]
    assert await keys_of(store, order_by="v") == ascending
    assert await keys_of(store, order_by="-v") == [*ascending[-2::-1], "nul"]


async def test_order_by_key_both_ways(store: AppData) -> None:
    """Order defaults to key ascending; `-key` reverses it."""
    for key in ["b", "a", "c"]:
        await store.store(ALICE, key, 1)

    assert await keys_of(store) == ["a", "b", "c"]
    assert await keys_of(store, order_by="key") == ["a", "b", "c"]
    assert await keys_of(store, order_by="-key") == ["c", "b", "a"]


async def test_updated_at_orders_rapid_writes(store: AppData) -> None:
    """Writes in quick succession get strictly increasing stamps, so newest-first is stable."""
    keys = [f"k/{index:03}" for index in range(200)]
    for key in reversed(keys):
        await store.store(ALICE, key, 1)

    newest = await store.query(ALICE, order_by="-updated_at")
    oldest = await store.query(ALICE, order_by="updated_at")

    assert [row["key"] for row in newest] == keys
    assert [row["key"] for row in oldest] == keys[::-1]
    stamps = [row["updated_at"] for row in oldest]
    assert all(ISO_UTC.match(stamp) for stamp in stamps)
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)


async def test_updated_at_is_recent_utc(store: AppData) -> None:
    """updated_at is an ISO-8601 UTC time close to now."""
    await store.store(ALICE, "k", 1)

    (row,) = await store.query(ALICE)
    stamp = datetime.fromisoformat(row["updated_at"].replace("Z", "+00:00"))

    assert abs((datetime.now(stamp.tzinfo) - stamp).total_seconds()) < 60


async def test_rewrite_makes_key_newest(store: AppData) -> None:
    """Storing an existing key again moves it to the front of newest-first."""
    for key in ["a", "b", "c"]:
        await store.store(ALICE, key, 1)
    await store.store(ALICE, "a", 2)

    assert await keys_of(store, order_by="-updated_at") == ["a", "c", "b"]


async def test_store_many_stamps_items_in_order(store: AppData) -> None:
    """Items of one batch get distinct stamps in the order given."""
    await store.store_many(ALICE, {"z": 1, "y": 2, "x": 3})

    assert await keys_of(store, order_by="updated_at") == ["z", "y", "x"]


# --- Pages -----------------------------------------------------------------------------------


async def test_limit_and_offset_pages(store: AppData) -> None:
    """Pages of 10 walk 25 rows without gaps or repeats."""
    keys = [f"k/{index:02}" for index in range(25)]
    await store.store_many(ALICE, dict.fromkeys(keys, 0))

    pages = [await keys_of(store, limit=10, offset=offset) for offset in (0, 10, 20, 30)]

    assert [len(page) for page in pages] == [10, 10, 5, 0]
    assert [key for page in pages for key in page] == keys


async def test_limit_defaults_to_max(make_store: MakeStore) -> None:
    """Without a limit a query returns at most max_query_limit rows."""
    store = await make_store(max_query_limit=5)
    await store.store_many(ALICE, {f"k{index}": index for index in range(5)})
    await store.store_many(ALICE, {f"m{index}": index for index in range(3)})

    assert len(await store.query(ALICE)) == 5
    assert await store.query(ALICE, limit=0) == []


@pytest.mark.parametrize(
    ("limit", "offset"), [(6, 0), (-1, 0), (1.5, 0), ("3", 0), (True, 0), (5, -1), (5, None)]
)
async def test_bad_limit_or_offset_is_error(make_store: MakeStore, limit: Any, offset: Any) -> None:
    """A limit outside 0..max or a negative offset is refused, naming the maximum."""
    store = await make_store(max_query_limit=5)

    with pytest.raises(DataError, match=r"limit must be an integer from 0 to 5|offset"):
        await store.query(ALICE, limit=limit, offset=offset)


# --- Bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("", "empty"),
        ("a\nb", "printable"),
        ("a\x00b", "printable"),
        ("tab\there", "printable"),
        ("bell\x07", "printable"),
        ("a\u2028b", "printable"),
        ("x" * 513, "at most 512"),
        (5, "string"),
        (None, "string"),
        (b"bytes", "string"),
    ],
)
async def test_bad_key_is_error(store: AppData, key: Any, message: str) -> None:
    """Empty, overlong, non-string keys and keys with control characters are refused clearly."""
    with pytest.raises(DataError, match=message):
        await store.store(ALICE, key, 1)
    with pytest.raises(DataError, match=message):
        await store.load(ALICE, key)
    with pytest.raises(DataError, match=message):
        await store.remove(ALICE, key)


@pytest.mark.parametrize("prefix", ["a\nb", "\x00", "x" * 513, None, 3])
async def test_bad_prefix_is_error(store: AppData, prefix: Any) -> None:
    """Prefixes follow the key rules (except that they may be empty)."""
    with pytest.raises(DataError):
        await store.keys(ALICE, prefix)
    with pytest.raises(DataError):
        await store.query(ALICE, prefix)


async def test_unknown_operator_lists_valid_ones(store: AppData) -> None:
    """An unknown operator names itself and every valid operator."""
    with pytest.raises(DataError) as caught:
        await store.query(ALICE, where={"tags": {"has": "x"}})

    message = str(caught.value)
    assert "'has'" in message
    assert all(op in message for op in OPERATORS)


@pytest.mark.parametrize(
    "path", ["", "a..b", "a b", "$.a", "a[0]", "a.", ".a", "a.b'c", "é", ".".join("a" * 17)]
)
async def test_bad_path_is_error(store: AppData, path: str) -> None:
    """Paths are dot-separated names of letters, digits, '_' and '-', and nothing else."""
    with pytest.raises(DataError, match="bad path") as caught:
        await store.query(ALICE, where={path: 1})

    assert "contains" in str(caught.value)


@pytest.mark.parametrize(
    "where",
    [
        [("a", 1)],
        "a = 1",
        {1: 1},
        {"a": {}},
        {"a": [1, 2]},
        {"a": {"eq": {"b": 1}}},
        {"a": {"eq": [1]}},
        {"a": {"lt": True}},
        {"a": {"gt": None}},
        {"a": {"gte": [1]}},
        {"a": {"in": "abc"}},
        {"a": {"in": [[1]]}},
        {"a": {"in": list(range(1001))}},
        {"a": {"contains": ["x"]}},
        {"a": {"exists": 1}},
        {"a": {"eq": math.nan}},
        {"a": {"lt": math.inf}},
        {"a": {"gt": 2**70}},
    ],
)
async def test_bad_filter_is_error(store: AppData, where: Any) -> None:
    """Malformed filters and operands that are not plain scalars are refused."""
    with pytest.raises(DataError):
        await store.query(ALICE, where=where)


@pytest.mark.parametrize("order_by", ["a..b", "-", "-a..b", "a b", 5, "$.a", "-$"])
async def test_bad_order_by_is_error(store: AppData, order_by: Any) -> None:
    """order_by takes 'key', 'updated_at' or a dotted path, with an optional '-'."""
    with pytest.raises(DataError, match="order_by"):
        await store.query(ALICE, order_by=order_by)


@pytest.mark.parametrize(
    "value",
    [math.nan, math.inf, -math.inf, {"a": [1, {"b": math.nan}]}, [math.inf], (1, -math.inf)],
)
async def test_nan_and_infinity_are_rejected(store: AppData, value: Any) -> None:
    """NaN and infinities anywhere in a value are refused, and nothing is stored."""
    with pytest.raises(DataError, match="NaN"):
        await store.store(ALICE, "k", value)

    assert await store.keys(ALICE) == []


async def test_null_values_without_nan_are_accepted(store: AppData) -> None:
    """A value holding nulls and the text "null" is not mistaken for one with NaN."""
    value = {"a": None, "b": "null", "c": [None, 1.5]}

    await store.store(ALICE, "k", value)

    assert await store.load(ALICE, "k") == value


@pytest.mark.parametrize(
    "value", [{1, 2}, object(), {1: "int key"}, datetime(2026, 1, 1), 2**64, b"bytes"]
)
async def test_unserialisable_value_is_error(store: AppData, value: Any) -> None:
    """Values that are not plain JSON are refused with a DataError."""
    with pytest.raises(DataError, match="not JSON-serialisable"):
        await store.store(ALICE, "k", value)


async def test_value_too_large_names_size_and_limit(make_store: MakeStore) -> None:
    """A value over max_value_bytes as JSON is refused, naming both sizes; the limit itself fits."""
    store = await make_store(max_value_bytes=100)
    fits = "x" * 98  # 100 bytes with its quotes

    await store.store(ALICE, "ok", fits)
    with pytest.raises(DataError, match=r"101 bytes.*limit is 100 bytes"):
        await store.store(ALICE, "big", fits + "x")

    assert await store.keys(ALICE) == ["ok"]


def test_data_errors_are_worker_errors() -> None:
    """Both error kinds share the worker package's root exception."""
    assert issubclass(DataError, WorkerError)
    assert issubclass(StoreError, WorkerError)


# --- Isolation -------------------------------------------------------------------------------


async def test_isolation_between_apps_and_users(store: AppData) -> None:
    """Identical keys in other apps, other users and the anonymous space never mix."""
    scopes = [Scope("a", "u1"), Scope("a", "u2"), Scope("b", "u1"), Scope("a", "")]
    for scope in scopes:
        await store.store(scope, "k", {"owner": f"{scope.app_id}:{scope.user_id}"})
        await store.store(scope, f"only-{scope.app_id}-{scope.user_id}", 1)

    for scope in scopes:
        mine = {"owner": f"{scope.app_id}:{scope.user_id}"}
        own_key = f"only-{scope.app_id}-{scope.user_id}"
        rows = await store.query(scope, where={"owner": {"exists": True}})
        assert await store.load(scope, "k") == mine
        assert await store.keys(scope) == ["k", own_key]
        assert await store.load_many(scope, ["k", "only-b-u1", own_key]) == {"k": mine, own_key: 1}
        assert [row["value"] for row in rows] == [mine]

    assert await store.remove(Scope("a", "u1"), "k") is True
    assert await store.remove_many(Scope("a", "u1"), ["only-a-u2", "only-b-u1"]) == 0
    assert await store.load(Scope("a", "u2"), "k") == {"owner": "a:u2"}
    assert await store.load(Scope("b", "u1"), "k") == {"owner": "b:u1"}


async def test_hostile_strings_stay_in_scope(store: AppData) -> None:
    """SQL-looking keys, prefixes and operands are plain data bound as parameters."""
    hostile = "x' OR '1'='1"
    await store.store(Scope("victim", ""), hostile, {"a": hostile})
    await store.store(ALICE, "mine", {"a": 1})

    assert await store.keys(ALICE, "x'") == []
    assert await keys_of(store, where={"a": hostile}) == []
    assert await keys_of(store, where={"a": {"ne": hostile}}) == ["mine"]
    assert await store.load(ALICE, hostile) is None


def test_query_sql_binds_every_app_value() -> None:
    """No app-supplied string ever appears in the SQL text, only as a bound parameter."""
    marker = "zz'marker"
    where = parse_where({"path-x": {"eq": marker, "contains": marker, "in": [marker]}})
    query = Query(marker, where, parse_order("-path-x"), 10, 0)

    sql, params = SqliteSql().query(Scope(marker, marker), query)

    assert "zz" not in sql and "path-x" not in sql
    assert marker in params and '$."path-x"' in params
    placeholders = re.findall(r"\?(\d*)", sql)
    assert {int(number) for number in placeholders} == set(range(1, len(params) + 1))


# --- Batches ---------------------------------------------------------------------------------


async def test_batch_forms(store: AppData) -> None:
    """store_many, load_many (missing keys absent) and remove_many (count of existing)."""
    await store.store_many(ALICE, {"a": 1, "b": [2], "c": {"three": 3}})

    loaded = await store.load_many(ALICE, ["a", "c", "missing"])
    removed = await store.remove_many(ALICE, ["a", "b", "missing", "a"])

    assert loaded == {"a": 1, "c": {"three": 3}}
    assert removed == 2
    assert await store.keys(ALICE) == ["c"]


async def test_empty_batches(store: AppData) -> None:
    """Empty batches do nothing and return empty results."""
    await store.store_many(ALICE, {})

    assert await store.load_many(ALICE, []) == {}
    assert await store.remove_many(ALICE, []) == 0


async def test_store_many_is_all_or_nothing(store: AppData) -> None:
    """One invalid item in a batch means nothing in it is written."""
    for items in ({"a": 1, "b": math.nan}, {"a": 1, "": 2}, {"a": 1, "b": {3}}):
        with pytest.raises(DataError):
            await store.store_many(ALICE, items)

    assert await store.keys(ALICE) == []


async def test_batches_are_capped(make_store: MakeStore) -> None:
    """A batch may not hold more keys than max_query_limit."""
    store = await make_store(max_query_limit=3)
    four = ["a", "b", "c", "d"]

    with pytest.raises(DataError, match="at most 3"):
        await store.store_many(ALICE, dict.fromkeys(four, 1))
    with pytest.raises(DataError, match="at most 3"):
        await store.load_many(ALICE, four)
    with pytest.raises(DataError, match="at most 3"):
        await store.remove_many(ALICE, four)


@pytest.mark.parametrize("keys", ["abc", None, {"a": 1}])
async def test_batch_keys_must_be_a_list(store: AppData, keys: Any) -> None:
    """load_many and remove_many take a list of keys, not a string or mapping."""
    with pytest.raises(DataError, match="list of strings"):
        await store.load_many(ALICE, keys)
    with pytest.raises(DataError, match="list of strings"):
        await store.remove_many(ALICE, keys)


# --- Sharing, lifecycle ----------------------------------------------------------------------


async def test_two_stores_on_one_file_see_each_others_writes(make_store: MakeStore) -> None:
    """Two instances on one file (like two worker processes) read each other's writes."""
    first = await make_store("shared.db")
    second = await make_store("shared.db")

    await first.store(ALICE, "from-first", 1)
    await second.store_many(ALICE, {"from-second": 2, "other": 3})
    await first.remove(ALICE, "other")

    assert await second.load(ALICE, "from-first") == 1
    assert await first.load(ALICE, "from-second") == 2
    assert await second.keys(ALICE) == ["from-first", "from-second"]
    assert await keys_of(first, order_by="-updated_at") == ["from-second", "from-first"]


WRITER = """
import asyncio, sys
from workers.appdata import Scope, open_app_data

async def main(url, name):
    async with open_app_data(url, max_value_bytes=1000, max_query_limit=100) as store:
        for index in range(50):
            await store.store(Scope("notes", "alice"), f"{name}/{index:02}", index)
        await store.store_many(Scope("notes", "alice"), {f"{name}/batch{i}": i for i in range(20)})

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def run_writer(url: str, name: str) -> int:
    """Run WRITER as a separate process; its exit code."""
    command = [sys.executable, "-c", WRITER, url, name]
    return subprocess.run(command, cwd=Path(__file__).parents[1], timeout=60).returncode


async def test_processes_share_one_database(make_store: MakeStore, database_url: UrlFor) -> None:
    """Worker processes opening (and migrating) one fresh database at once all write in full."""
    url = await database_url("farm.db")

    writers = (asyncio.to_thread(run_writer, url, f"p{number}") for number in range(3))
    codes = await asyncio.gather(*writers)
    store = await make_store("farm.db")

    assert codes == [0, 0, 0]
    assert len(await store.keys(ALICE)) == 3 * 70


async def test_concurrent_calls_all_land(store: AppData) -> None:
    """Many calls in flight at once, more than the store has connections, land without loss."""
    await asyncio.gather(*(store.store(ALICE, f"k/{index:03}", index) for index in range(100)))

    assert len(await store.keys(ALICE, "k/")) == 100


async def test_cancelled_batch_still_lands_whole(store: AppData) -> None:
    """A caller cancelled mid-write does not cut the batch short: it lands, all of it."""
    items = {f"c/{index:03}": {"n": index} for index in range(200)}
    task = asyncio.create_task(store.store_many(ALICE, items))
    await asyncio.sleep(0)

    task.cancel()
    for _ in range(500):  # The write goes on out of sight; look for up to 5 s.
        if len(await store.keys(ALICE, "c/")) == len(items):
            break
        await asyncio.sleep(0.01)

    assert task.cancelled()
    assert await store.load_many(ALICE, list(items)) == items


async def test_concurrent_opens_migrate_once(database_url: UrlFor) -> None:
    """Stores opening one fresh database at the same moment all succeed on one schema."""
    url = await database_url("race.db")
    stores = [open_app_data(url, max_value_bytes=100, max_query_limit=10) for _ in range(4)]

    try:
        await asyncio.gather(*(store.open() for store in stores))
        await stores[0].store(ALICE, "k", 1)
        loaded = [await store.load(ALICE, "k") for store in stores]
    finally:
        for store in stores:
            await store.close()

    assert loaded == [1, 1, 1, 1]
    assert run_sql(url, "SELECT component, version FROM schema_version") == [("app_data", 1)]


async def test_reopening_keeps_schema_version(make_store: MakeStore, database_url: UrlFor) -> None:
    """The database records schema version 1, and reopening leaves it there."""
    first = await make_store("v.db")
    await first.close()
    await make_store("v.db")

    versions = run_sql(await database_url("v.db"), "SELECT component, version FROM schema_version")

    assert versions == [("app_data", 1)]


@sqlite_only
async def test_sqlite_file_uses_wal(make_store: MakeStore, tmp_path: Path) -> None:
    """The SQLite file is in WAL mode, so readers never wait on the writer."""
    await make_store("wal.db")

    with sqlite3.connect(tmp_path / "wal.db") as conn:
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    conn.close()

    assert mode == "wal"


async def test_newer_schema_is_refused(make_store: MakeStore, database_url: UrlFor) -> None:
    """A database migrated by newer code is not opened by older code."""
    store = await make_store("new.db")
    await store.close()
    sql = "UPDATE schema_version SET version = 99 WHERE component = 'app_data'"
    run_sql(await database_url("new.db"), sql)

    with pytest.raises(StoreError, match="version 99"):
        await make_store("new.db")


async def test_closed_store_raises(make_store: MakeStore) -> None:
    """Calls on a closed store fail with StoreError, and closing twice is harmless."""
    store = await make_store()
    await store.close()
    await store.close()

    with pytest.raises(StoreError, match="not open"):
        await store.load(ALICE, "k")


async def test_unopenable_path_is_store_error(tmp_path: Path) -> None:
    """A path that cannot hold a database gives a StoreError naming it."""
    (tmp_path / "file").write_text("not a folder")
    store = SqliteAppData(tmp_path / "file" / "appdata.db")

    with pytest.raises(StoreError, match="cannot open app data"):
        await store.open()


# --- Postgres specifics ----------------------------------------------------------------------


async def test_unreachable_postgres_is_a_clear_store_error() -> None:
    """Nothing listening gives one StoreError line naming host and port, not the password."""
    port = free_port()
    store = PostgresAppData(f"postgresql://app:hunter2secret@127.0.0.1:{port}/appdb")
    started = time.monotonic()

    with pytest.raises(StoreError) as caught:
        await store.open()

    message = str(caught.value)
    assert message.startswith(f"cannot open app data at postgresql://127.0.0.1:{port}/appdb: ")
    assert "Connection refused" in message
    assert "hunter2secret" not in message and "\n" not in message
    assert time.monotonic() - started < 5


@postgres_only
async def test_missing_postgres_database_is_a_clear_store_error(
    postgres_if_needed: PostgresServer,
) -> None:
    """A reachable server without the named database says so at open."""
    url = postgres_if_needed.url.replace("/postgres", "/no_such_db")

    with pytest.raises(StoreError, match=r'cannot open app data at .*"no_such_db" does not exist'):
        await open_app_data(url, max_value_bytes=10, max_query_limit=10).open()


@postgres_only
async def test_no_server_side_prepared_statements(make_store: MakeStore) -> None:
    """Statements run again and again stay unprepared, as a transaction-mode pooler needs."""
    store = await make_store()
    assert isinstance(store, PostgresAppData)
    for index in range(12):
        await store.store(ALICE, "k", index)
        await store.query(ALICE, where={"v": {"gt": 1}}, order_by="-v")

    # The pool holds one connection when used one call at a time, so this is the same session.
    rows = await store._fetch(("SELECT count(*) FROM pg_prepared_statements", {}))

    assert rows == [(0,)]


@postgres_only
async def test_batch_larger_than_one_statement_is_one_transaction(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch split into several statements still lands whole and in order."""
    monkeypatch.setattr(appdata_module, "PG_WRITE_CHUNK_BYTES", 20)
    store = await make_store()
    items = {f"k{index}": "x" * 8 for index in range(7)}

    await store.store_many(ALICE, items)

    assert await keys_of(store, order_by="updated_at") == list(items)
    assert await store.load_many(ALICE, list(items)) == items


def test_postgres_sql_binds_every_app_value() -> None:
    """Postgres SQL holds no app-supplied string either, and every placeholder is typed."""
    marker = "zz'marker"
    where = parse_where({"path-x": {"eq": marker, "contains": marker, "in": [marker]}})
    query = Query(marker, where, parse_order("-path-x"), 10, 0)

    sql, params = PostgresSql().query(Scope(marker, marker), query)

    assert "zz" not in sql and "path-x" not in sql
    assert marker in params.values() and 'strict $."path-x"' in params.values()
    assert set(re.findall(r"%\((p\d+)\)s::", sql)) == set(params)
    assert re.sub(r"%\(p\d+\)s::", "", sql).count("%") == 0


# --- Choosing a backend ----------------------------------------------------------------------


def test_open_app_data_picks_the_backend(tmp_path: Path) -> None:
    """sqlite:///PATH gives SQLite, postgresql:// and postgres:// give Postgres, all unopened."""
    limits = {"max_value_bytes": 10, "max_query_limit": 5}

    sqlite = open_app_data(f"sqlite:///{tmp_path}/a.db", **limits)
    postgres = open_app_data("postgresql://u:p@db.example.test:5432/app", **limits)
    short = open_app_data("postgres://u@db.example.test/app", **limits)

    assert isinstance(sqlite, SqliteAppData) and sqlite.path == tmp_path / "a.db"
    assert isinstance(postgres, PostgresAppData) and isinstance(short, PostgresAppData)
    assert (sqlite.max_value_bytes, sqlite.max_query_limit) == (10, 5)
    assert (postgres.max_value_bytes, postgres.max_query_limit) == (10, 5)
    assert postgres.where == "postgresql://db.example.test:5432/app"


@pytest.mark.parametrize(
    "url", ["mysql://root:s3cret@db/app", "sqlite://relative.db", "s3cret", "", "sqlite:///"]
)
def test_unsupported_database_url_names_the_schemes(url: str) -> None:
    """Any other URL is a StoreError listing the schemes, quoting nothing past the scheme."""
    with pytest.raises(StoreError) as caught:
        open_app_data(url, max_value_bytes=10, max_query_limit=5)

    message = str(caught.value)
    assert "sqlite:///PATH" in message and "postgresql://" in message and "postgres://" in message
    assert "s3cret" not in message


def test_scope_requires_an_app() -> None:
    """A scope without an app id is a programming error, caught at once."""
    with pytest.raises(ValueError, match="app_id"):
        Scope("", "u")
