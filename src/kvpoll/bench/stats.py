"""Medians, ranges and ratios of repeated measurements."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Figure", "figure", "ratio"]


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
