"""Benchmarks that put the farm beside its alternatives in one run: ``python -m bench``."""

from __future__ import annotations


class BenchError(Exception):
    """A benchmark could not run (a process did not start, a call gave a wrong answer)."""


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; the exit status (0 when every measurement ran)."""
    from bench.runner import run

    return run(argv)
