"""Apps the benchmarks deploy; each is also importable so the same function can run in-process."""
