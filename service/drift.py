"""Drift of served anomaly scores against the model's calibration: the population stability index.

The calibration's deciles (scores of held-out rows at export) cut the score axis into ten bins that
held 10 % of those rows each. Over a sliding window of the most recent served rows, PSI compares the
share of rows in each bin with that 10 %: sum((a - e) * ln(a / e)). By the usual rule of thumb, under
0.1 is stable, 0.1-0.25 a moderate shift, over 0.25 a large one (the data, or the model's fit to it,
has moved). No HTTP here; the anomaly operation feeds it and the metrics show it.
"""

from __future__ import annotations

import bisect
import collections
import math
import time

import numpy as np

from service.manifest import Calibration

BINS = 10
SHARE_FLOOR = 1e-4  # an empty bin counts as this share, so ln() stays finite
SMALL = 32  # rows per request below which bins are counted in Python


class ScoreDrift:
    """Bin counts of a sliding window of scored rows; PSI recomputed at most every `refresh_s` seconds,
    since the request path feeds it on every /anomaly-score call."""

    def __init__(self, calibration: Calibration, window_rows: int, refresh_s: float = 1.0):
        levels = np.arange(1, BINS) / BINS
        self.edges = np.interp(levels, calibration.levels, calibration.values)  # 9 inner decile edges
        self._edge_list = self.edges.tolist()
        self.window_rows = window_rows
        self.refresh_s = refresh_s
        self._parts: collections.deque[tuple[list[int], int]] = collections.deque()  # per request: counts, rows
        self._totals = [0] * BINS
        self._rows = 0
        self._psi = 0.0
        self._computed_at = -math.inf

    def _bin_counts(self, scores: np.ndarray) -> list[int]:
        if len(scores) > SMALL:
            return np.bincount(np.searchsorted(self.edges, scores, side="right"), minlength=BINS).tolist()
        counts = [0] * BINS  # a few rows: bisect in Python beats numpy's per-call overhead on the event loop
        for value in scores.tolist():
            counts[bisect.bisect_right(self._edge_list, value)] += 1
        return counts

    def observe(self, scores: np.ndarray) -> float:
        """Add one request's scores; returns the window's PSI (at most `refresh_s` old)."""
        counts = self._bin_counts(scores)
        self._parts.append((counts, len(scores)))
        self._totals = [t + c for t, c in zip(self._totals, counts, strict=True)]
        self._rows += len(scores)
        while len(self._parts) > 1 and self._rows - self._parts[0][1] >= self.window_rows:
            old, n = self._parts.popleft()
            self._totals = [t - c for t, c in zip(self._totals, old, strict=True)]
            self._rows -= n
        now = time.monotonic()
        if now - self._computed_at >= self.refresh_s:
            self._psi, self._computed_at = self.psi(), now
        return self._psi

    @property
    def rows(self) -> int:
        return self._rows

    def psi(self) -> float:
        if not self._rows:
            return 0.0
        actual = np.maximum(np.asarray(self._totals) / self._rows, SHARE_FLOOR)
        expected = 1.0 / BINS
        return float(np.sum((actual - expected) * np.log(actual / expected)))
