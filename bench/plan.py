"""How much of each measurement a run takes: the full run, ``--quick`` and ``--tiny``."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much of each measurement to take."""

    mode: str
    in_process_calls: int
    latency_calls: int
    arq_calls: int
    idle_s: float
    level_s: float
    arq_level_s: float
    gate_calls: int
    isolation_calls: int
    isolation_e2e_calls: int
    query_rows: int
    query_repeats: int
    replay_calls: int
    concurrency: tuple[int, ...] = (1, 8, 32, 128)
    worker_counts: tuple[int, ...] = (1, 2)
    # How many farm configurations the isolation section compares (None: all of them).
    isolation_variants: int | None = None


PLANS = {
    "full": Plan("full", in_process_calls=100_000, latency_calls=2000, arq_calls=40, idle_s=10,
                 level_s=5, arq_level_s=4, gate_calls=1000, isolation_calls=200,
                 isolation_e2e_calls=300, query_rows=10_000, query_repeats=30,
                 replay_calls=1000),
    "quick": Plan("quick", in_process_calls=20_000, latency_calls=300, arq_calls=8, idle_s=3,
                  level_s=1.5, arq_level_s=1.5, gate_calls=200, isolation_calls=30,
                  isolation_e2e_calls=60, query_rows=10_000, query_repeats=8,
                  replay_calls=200),
    # Only for checking that the benchmark still works: the figures mean little.
    "tiny": Plan("tiny", in_process_calls=1000, latency_calls=20, arq_calls=2, idle_s=1,
                 level_s=0.4, arq_level_s=0.6, gate_calls=20, isolation_calls=4,
                 isolation_e2e_calls=10, query_rows=2000, query_repeats=2, replay_calls=20,
                 concurrency=(1, 8), isolation_variants=2),
}
