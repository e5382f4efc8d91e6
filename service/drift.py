"""Drift of served anomaly scores against the model's calibration: the population stability index.

The calibration's deciles (scores of held-out rows at export) cut the score axis into ten bins that
held 10 % of those rows each. Over a sliding window of the most recent served rows, PSI compares the
share of rows in each bin with that 10 %: sum((a - e) * ln(a / e)). By the usual rule of thumb, under
0.1 is stable, 0.1-0.25 a moderate shift, over 0.25 a large one (the data, or the model's fit to it,
has moved). No HTTP here; the anomaly operation feeds it and the metrics show it.
"""

from __future__ import annotations

import collections

import numpy as np

from service.manifest import Calibration

BINS = 10
SHARE_FLOOR = 1e-4  # an empty bin counts as this share, so ln() stays finite


class ScoreDrift:
    def __init__(self, calibration: Calibration, window_rows: int):
        levels = np.arange(1, BINS) / BINS
        self.edges = np.interp(levels, calibration.levels, calibration.values)  # 9 inner decile edges
        self.window_rows = window_rows
        self._parts: collections.deque[np.ndarray] = collections.deque()  # per request: counts per bin
        self._totals = np.zeros(BINS, dtype=np.int64)

    def observe(self, scores: np.ndarray) -> float:
        """Add one request's scores; returns the PSI of the window as it is now."""
        counts = np.bincount(np.searchsorted(self.edges, scores, side="right"), minlength=BINS)
        self._parts.append(counts)
        self._totals += counts
        while len(self._parts) > 1 and self._totals.sum() - self._parts[0].sum() >= self.window_rows:
            self._totals -= self._parts.popleft()
        return self.psi()

    @property
    def rows(self) -> int:
        return int(self._totals.sum())

    def psi(self) -> float:
        if not self.rows:
            return 0.0
        actual = np.maximum(self._totals / self.rows, SHARE_FLOOR)
        expected = 1.0 / BINS
        return float(np.sum((actual - expected) * np.log(actual / expected)))
