"""``query`` with a filter and a sort over 10,000 rows, against loading every row and filtering in
Python: the app-data store itself (workers.appdata.SqliteAppData), no sandbox in between."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import BenchError
from bench.plan import Plan
from bench.stats import Figure, Progress, Target, summary
from workers.appdata import Scope, SqliteAppData

PREFIX = "items/"
GROUPS = 20
PAGE = 20
GROUP, MIN_SCORE = "g7", 0.25
WHERE = {"group": {"eq": GROUP}, "score": {"gte": MIN_SCORE}}
ORDER_BY = "-score"


def row(number: int) -> dict[str, Any]:
    return {"n": number, "group": f"g{number % GROUPS}", "score": (number * 7919 % 10007) / 10007,
            "tags": ["even" if number % 2 == 0 else "odd"], "text": f"item {number} " + "x" * 80}


async def load_all_and_filter(store: SqliteAppData, scope: Scope, batch: int
                              ) -> list[tuple[str, Any]]:
    """What an app does without `query`: every key, every value, then filter and sort here."""
    keys = await store.keys(scope, PREFIX)
    values: dict[str, Any] = {}
    for start in range(0, len(keys), batch):
        values.update(await store.load_many(scope, keys[start:start + batch]))
    kept = [(key, value) for key, value in values.items()
            if value["group"] == GROUP and value["score"] >= MIN_SCORE]
    kept.sort(key=lambda item: item[1]["score"], reverse=True)
    return kept[:PAGE]


async def measure(plan: Plan, progress: Progress) -> tuple[dict[str, Any], list[Figure]]:
    folder = Path(tempfile.mkdtemp(prefix="ultralight-bench-query-"))
    store = SqliteAppData(folder / "data.db")
    scope = Scope("app_bench", "user_bench")
    try:
        await store.open()
        batch = store.max_query_limit
        for start in range(0, plan.query_rows, batch):
            await store.store_many(scope, {f"{PREFIX}{n:06d}": row(n) for n in
                                           range(start, min(plan.query_rows, start + batch))})
            progress.update(0.3 * start / plan.query_rows, "storing rows")
        query_ms, load_ms = [], []
        for repeat in range(plan.query_repeats + 1):
            started = time.perf_counter()
            page = await store.query(scope, PREFIX, WHERE, ORDER_BY, PAGE)
            elapsed_query = (time.perf_counter() - started) * 1000
            started = time.perf_counter()
            expected = await load_all_and_filter(store, scope, batch)
            elapsed_load = (time.perf_counter() - started) * 1000
            if [r["key"] for r in page] != [key for key, _ in expected]:
                raise BenchError("query and load-all-then-filter disagree")
            if repeat:  # the first round warms SQLite's page cache for both
                query_ms.append(elapsed_query)
                load_ms.append(elapsed_load)
            progress.update(0.3 + 0.7 * repeat / plan.query_repeats, "query vs load-all")
    finally:
        await store.close()
        shutil.rmtree(folder, ignore_errors=True)

    raw: dict[str, Any] = {
        "rows": plan.query_rows, "where": WHERE, "order_by": ORDER_BY, "limit": PAGE,
        "matching_rows": sum(1 for n in range(plan.query_rows) if row(n)["group"] == GROUP
                             and row(n)["score"] >= MIN_SCORE),
        "query_ms": summary(query_ms),
        "load_all_ms": summary(load_ms),
        "load_all_method": f"keys() + load_many() in batches of {batch} + filter/sort in Python",
    }
    return raw, [Figure(
        "query", f"query p50 (where + order_by over {plan.query_rows:,} rows)",
        raw["query_ms"]["p50"], "ms", "load every row, filter in Python p50",
        raw["load_all_ms"]["p50"], (Target(1 / 50, "max", "ratio", "≥ 50× faster"),),
        "workers.appdata.SqliteAppData (SQLite)")]
