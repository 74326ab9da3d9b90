"""A read-through cache of app data in each worker, never wrong for long.

Each (app, caller) space has a version number in Redis. A call reads it when it starts (in the
same round trip as its claim) and uses cached values only if they belong to that version; a call
that wrote bumps the version before its caller hears the result. So a caller always reads its own
writes, on any worker, and another call sees a write no later than its next start: the bound is
one call's duration. Queries always go to the database; only ``load`` and ``load_many`` are cached.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from workers.appdata import Scope

MISSING = object()


def version_key(scope: Scope) -> str:
    return f"ultralight:datav:{scope.app_id}:{scope.user_id}"


@dataclasses.dataclass
class _Space:
    version: int
    values: collections.OrderedDict[str, Any]


class DataCache:
    """Per worker process: cached values per space, tagged with the space's version."""

    def __init__(self, max_keys_per_space: int = 1024, max_spaces: int = 4096) -> None:
        self.max_keys = max_keys_per_space
        self.max_spaces = max_spaces
        self._spaces: collections.OrderedDict[Scope, _Space] = collections.OrderedDict()
        self.hits = 0
        self.misses = 0

    def view(self, scope: Scope, version: int) -> CacheView:
        space = self._spaces.get(scope)
        if space is None or space.version != version:
            space = _Space(version, collections.OrderedDict())
            self._spaces[scope] = space
            if len(self._spaces) > self.max_spaces:
                self._spaces.popitem(last=False)
        self._spaces.move_to_end(scope)
        return CacheView(self, scope, space)

    def settle(self, scope: Scope, seen: int, bumped_to: int) -> None:
        """After a writing call bumped the version: keep the space only if no one else wrote."""
        space = self._spaces.get(scope)
        if space is None:
            return
        if bumped_to == seen + 1 and space.version == seen:
            space.version = bumped_to
        else:
            del self._spaces[scope]


class CacheView:
    """One call's window on the cache."""

    def __init__(self, cache: DataCache, scope: Scope, space: _Space) -> None:
        self.cache = cache
        self.scope = scope
        self.space = space
        self.wrote = False

    def get(self, key: str) -> Any:
        value = self.space.values.get(key, MISSING)
        if value is MISSING:
            self.cache.misses += 1
        else:
            self.cache.hits += 1
            self.space.values.move_to_end(key)
        return value

    def put(self, key: str, value: Any) -> None:
        self.space.values[key] = value
        self.space.values.move_to_end(key)
        while len(self.space.values) > self.cache.max_keys:
            self.space.values.popitem(last=False)

    def written(self, items: dict[str, Any]) -> None:
        self.wrote = True
        for key, value in items.items():
            self.put(key, value)

    def removed(self, keys: list[str]) -> None:
        self.wrote = True
        for key in keys:
            self.put(key, None)
