"""What every measurement reports: percentiles, figures beside comparison and target, progress."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, TextIO


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between the closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(values_ms: list[float]) -> dict[str, Any]:
    """p50, p90, p99, mean, min and max of a list of milliseconds, rounded for the report."""
    if not values_ms:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "mean": None, "min": None,
                "max": None}
    return {
        "n": len(values_ms),
        **{name: _round(percentile(values_ms, q)) for name, q in
           (("p50", .5), ("p90", .9), ("p99", .99))},
        "mean": _round(sum(values_ms) / len(values_ms)),
        "min": _round(min(values_ms)),
        "max": _round(max(values_ms)),
    }


def _round(value: float | None) -> float | None:
    if value is None:
        return None
    return round(value, 4) if abs(value) < 1 else round(value, 3)


@dataclasses.dataclass(frozen=True)
class Target:
    """A bound on a figure's value or on its ratio to the comparison."""

    bound: float
    kind: Literal["max", "min"]
    of: Literal["value", "ratio"] = "value"
    text: str = ""

    def met(self, value: float | None, ratio: float | None) -> bool | None:
        subject = value if self.of == "value" else ratio
        if subject is None:
            return None
        return subject <= self.bound if self.kind == "max" else subject >= self.bound


@dataclasses.dataclass
class Figure:
    """One row of the results: a figure, what it is compared with, and whether it met its target.

    ``ratio`` is always value / comparison, both measured in the same run.
    """

    section: str
    name: str
    value: float | None
    unit: str
    comparison: str | None = None
    comparison_value: float | None = None
    targets: tuple[Target, ...] = ()
    client: str | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.comparison_value:
            return None
        return self.value / self.comparison_value

    @property
    def met(self) -> bool | None:
        if not self.targets:
            return None
        results = [t.met(self.value, self.ratio) for t in self.targets]
        if any(r is None for r in results):
            return None
        return all(results)

    def as_json(self) -> dict[str, Any]:
        return {
            "section": self.section, "name": self.name, "value": _round(self.value),
            "unit": self.unit, "client": self.client, "comparison": self.comparison,
            "comparison_value": _round(self.comparison_value),
            "ratio": None if self.ratio is None else round(self.ratio, 6),
            "target": self.target_text, "met": self.met, "note": self.note,
        }

    @property
    def target_text(self) -> str:
        return "; ".join(t.text for t in self.targets)


class Progress:
    """A one-line progress bar on stderr over steps of estimated weight.

    On a terminal the line is redrawn in place; elsewhere (a log, a test) one line is printed as
    each step starts, so the output stays readable.
    """

    def __init__(self, steps: dict[str, float], stream: TextIO | None = None,
                 width: int = 30) -> None:
        self.weights = steps
        self.total = sum(steps.values()) or 1.0
        self.done = 0.0
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self._step = ""
        self._fraction = 0.0
        self._drawn = 0.0

    @contextmanager
    def step(self, name: str) -> Iterator[Progress]:
        self._step, self._fraction = name, 0.0
        self._draw(name, force=True)
        try:
            yield self
        finally:
            self.done += self.weights.get(name, 0.0)
            self._fraction = 0.0

    def update(self, fraction: float, detail: str = "") -> None:
        """Progress within the current step (0 to 1), with a few words on what runs."""
        self._fraction = min(1.0, max(0.0, fraction))
        label = f"{self._step}: {detail}" if detail else self._step
        self._draw(label, force=False)

    def finish(self) -> None:
        self.done, self._fraction = self.total, 0.0
        self._draw("done", force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, label: str, force: bool) -> None:
        now = time.monotonic()
        if not self.tty and not force:
            return
        if not force and now - self._drawn < 0.1:
            return
        self._drawn = now
        current = self.weights.get(self._step, 0.0) * self._fraction
        share = min(1.0, (self.done + current) / self.total)
        filled = int(self.width * share)
        bar = f"[{'#' * filled}{'.' * (self.width - filled)}] {share * 100:3.0f}% " \
              f"{now - self.started:5.1f} s  {label}"
        if self.tty:
            self.stream.write("\r\x1b[K" + bar[:150])
        else:
            self.stream.write(bar + "\n")
        self.stream.flush()
