"""Small statistics: medians, nearest-rank percentiles, and a figure from several runs.

Why not ``statistics.quantiles``: it interpolates, and a p99 of 300 samples should be a
latency that actually happened.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0 < q <= 100) of ``values``."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


@dataclass(frozen=True)
class Figure:
    """One quoted number: the median over runs, with the spread (min and max) of the runs."""

    runs: tuple[float, ...]

    @classmethod
    def of(cls, runs: Sequence[float]) -> Figure:
        return cls(tuple(v for v in runs if not math.isnan(v)))

    @property
    def value(self) -> float:
        return median(self.runs)

    @property
    def low(self) -> float:
        return min(self.runs) if self.runs else math.nan

    @property
    def high(self) -> float:
        return max(self.runs) if self.runs else math.nan

    def show(self, unit: str = "ms", scale: float = 1e3, digits: int = 2) -> str:
        """``1.23 ms (1.10..1.40)``; the range is left out for a single run."""
        if not self.runs:
            return "—"

        def number(x: float) -> str:
            return f"{x * scale:,.{digits}f}"

        text = f"{number(self.value)}{' ' + unit if unit else ''}"
        if len(self.runs) > 1:
            text += f" ({number(self.low)}..{number(self.high)})"
        return text
