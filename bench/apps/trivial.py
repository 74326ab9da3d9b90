"""The trivial tool the benchmarks call: as little work as a tool can do."""


def add(a: int, b: int = 1) -> int:
    """Add two whole numbers."""
    return a + b
