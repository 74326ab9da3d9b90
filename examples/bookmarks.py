"""Bookmarks kept per user: save links with tags, list them, mark them read."""

from typing import Literal, TypedDict

import ultralight as ul


class Bookmark(TypedDict):
    key: str
    url: str
    title: str
    tags: list[str]
    read: bool


def add_bookmark(url: str, title: str = "", tags: list[str] | None = None) -> Bookmark:
    """Save a link; returns the stored bookmark with its key."""
    if not url.startswith(("http://", "https://")):
        raise ValueError("a bookmark needs an http:// or https:// URL")
    key = f"bm/{ul.new_id()}"
    value = {"url": url, "title": title or url, "tags": sorted(set(tags or [])), "read": False}
    ul.store(key, value)
    return {"key": key, **value}


def list_bookmarks(
    tag: str | None = None,
    unread_only: bool = False,
    sort: Literal["newest", "oldest", "title"] = "newest",
    limit: int = 20,
) -> list[dict]:
    """Bookmarks, optionally filtered by tag or unread, sorted newest, oldest or by title."""
    where: dict = {}
    if tag:
        where["tags"] = {"contains": tag}
    if unread_only:
        where["read"] = {"eq": False}
    order_by = {"newest": "-updated_at", "oldest": "updated_at", "title": "title"}[sort]
    return ul.query("bm/", where=where or None, order_by=order_by, limit=limit)


def mark_read(key: str, read: bool = True) -> bool:
    """Mark a bookmark read (or unread again); false when there is no such bookmark."""
    value = ul.load(key)
    if value is None:
        return False
    ul.store(key, {**value, "read": read})
    return True


def remove_bookmark(key: str) -> bool:
    """Delete a bookmark; true when it existed."""
    return ul.remove(key)


def tag_counts() -> dict[str, int]:
    """How many bookmarks carry each tag."""
    counts: dict[str, int] = {}
    for item in ul.query("bm/", limit=1000):
        for tag in item["value"]["tags"]:
            counts[tag] = counts.get(tag, 0) + 1
    return counts
