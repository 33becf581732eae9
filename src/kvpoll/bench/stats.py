"""Medians, ranges and ratios of repeated measurements."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["WARM_UP_ROUNDS", "WARM_UP_SECONDS", "Figure", "figure", "ratio", "warm_up"]

WARM_UP_ROUNDS = 10
"""Untimed rounds before a measurement's repeats (fewer once WARM_UP_SECONDS pass)."""
WARM_UP_SECONDS = 2.0


@dataclass(frozen=True)
class Figure:
    """A median with the range it came from."""

    median: float
    low: float
    high: float
    samples: tuple[float, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "median": self.median,
            "min": self.low,
            "max": self.high,
            "samples": list(self.samples),
        }

    def show(self, unit: str = "", digits: int = 0) -> str:
        f = f"{{:,.{digits}f}}"
        return f"{f.format(self.median)}{unit} [{f.format(self.low)}-{f.format(self.high)}]"


def figure(samples: Sequence[float]) -> Figure:
    """Summarise repeated measurements."""
    if not samples:
        raise ValueError("no samples")
    return Figure(statistics.median(samples), min(samples), max(samples), tuple(samples))


def ratio(numerators: Sequence[float], denominators: Sequence[float]) -> Figure:
    """Per-repeat ratios (each pair measured back to back), summarised."""
    return figure([n / d for n, d in zip(numerators, denominators, strict=True) if d > 0])


def warm_up(measure: Callable[[], object], rounds: int = WARM_UP_ROUNDS) -> int:
    """Run ``measure`` untimed until it is warm: ``rounds`` times, or fewer (at
    least two) once WARM_UP_SECONDS have passed. Returns the rounds run.

    One round is not enough for a room: CPython specialises a function's code
    only after it ran several times. Rooms 2 to 12 of a new endpoint pair here
    took 1.4 ms falling to 0.9 ms (4 KiB) and 3.0 ms falling to 1.7 ms (1 MiB),
    so after one warm-up round the repeats measured the interpreter warming up,
    not what a serving engine's long-lived endpoints see.
    """
    start = time.perf_counter()
    done = 0
    while done < rounds and (done < 2 or time.perf_counter() - start < WARM_UP_SECONDS):
        measure()
        done += 1
    return done
