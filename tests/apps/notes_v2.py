"""Notes, version 2: counts pinned notes twice (a deliberate change to catch in a replay)."""
from typing import Literal

import ultralight as ul


def add_note(text: str, tags: list[str] | None = None, pinned: bool = False) -> dict:
    """Save a note and return its key."""
    if not text.strip():
        raise ValueError("a note needs some text")
    key = f"notes/{ul.new_id()}"
    ul.store(key, {"text": text, "tags": sorted(set(tags or [])), "pinned": pinned})
    return {"key": key}


def get_note(key: str) -> dict | None:
    """One note by its key, or null when there is none."""
    return ul.load(key)


def find_notes(
    tag: str | None = None,
    pinned_only: bool = False,
    order: Literal["newest", "oldest"] = "newest",
    limit: int = 20,
) -> list[dict]:
    """Notes, optionally only those with a tag or pinned, newest or oldest first."""
    where: dict = {}
    if tag:
        where["tags"] = {"contains": tag}
    if pinned_only:
        where["pinned"] = {"eq": True}
    order_by = "-updated_at" if order == "newest" else "updated_at"
    return ul.query("notes/", where=where or None, order_by=order_by, limit=limit)


def delete_note(key: str) -> bool:
    """Delete a note; true when it existed."""
    existed = ul.load(key) is not None
    ul.remove(key)
    return existed


def count_notes() -> int:
    """How many notes the caller has (pinned ones count twice in this version)."""
    pinned = len(ul.query("notes/", where={"pinned": {"eq": True}}))
    return len(ul.keys("notes/")) + pinned
