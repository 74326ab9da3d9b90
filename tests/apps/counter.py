"""Reads and writes one value per caller, to check caches across workers."""
import ultralight as ul


def put(value: int) -> int:
    """Stores value under 'n'."""
    ul.store("n", value)
    return value


def get() -> int | None:
    """Reads 'n' three times (the later reads can come from the worker's cache)."""
    first = ul.load("n")
    assert ul.load("n") == first and ul.load_many(["n"]).get("n") == first
    return first
