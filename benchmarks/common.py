"""Shared by the benchmark scripts (run as ``python benchmarks/NAME.py``, so importable as ``common``)."""

from __future__ import annotations

import statistics


def mean_std(xs: list[float]) -> str:
    """``"0.1234 ± 0.0056"`` over seeds (std 0 for one value)."""
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.4f}"
