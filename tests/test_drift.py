"""The drift gauge: PSI of served scores against the calibration over a sliding window of rows."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.drift import ScoreDrift
from service.manifest import Calibration
from tests.service_helpers import DEFAULT_MODEL, digits_rows, metric, serving


def calibration_of(scores: np.ndarray) -> Calibration:
    levels = np.linspace(0, 1, 201)
    values = np.quantile(scores, levels)
    return Calibration(samples=1, seed=0, n_rows=len(scores), levels=levels.tolist(), values=values.tolist(),
                       threshold_level=0.99, threshold=float(np.quantile(scores, 0.99)))


def test_psi_is_small_for_the_calibration_distribution_and_large_for_a_shift():
    rng = np.random.default_rng(0)
    drift = ScoreDrift(calibration_of(rng.normal(20, 3, 50_000)), window_rows=5000, refresh_s=0)
    for _ in range(10):
        same = drift.observe(rng.normal(20, 3, 500))
    assert same < 0.02 and drift.rows == 5000
    # A hand-computed case: every row in the top decile.
    top = drift.observe(np.full(5000, 100.0))
    expected = 0.9 * np.log(10) + 9 * (1e-4 - 0.1) * np.log(1e-4 / 0.1)
    assert drift.rows == 5000 and top == pytest.approx(expected)
    for _ in range(10):  # the window slides: back to the calibration's distribution, back to small
        recovered = drift.observe(rng.normal(20, 3, 500))
    assert recovered < 0.02
    moderate = ScoreDrift(calibration_of(rng.normal(20, 3, 50_000)), window_rows=5000, refresh_s=0)
    throttled = ScoreDrift(calibration_of(rng.normal(20, 3, 50_000)), window_rows=5000, refresh_s=3600)
    assert throttled.observe(rng.normal(20, 3, 500)) < 0.05  # the first call computes
    assert throttled.observe(np.full(5000, 100.0)) == throttled.observe(np.full(10, 100.0)) < 0.05  # cached
    assert throttled.psi() > 1  # what a refresh would report
    assert 0.1 < moderate.observe(rng.normal(21.5, 3, 5000)) < 2.0  # half a sigma: a moderate shift


@pytest.mark.anyio
async def test_scores_percentiles_and_drift_reach_the_metrics():
    """The digits model's default score is typicality; samples > 1 asks for iwae."""
    async with serving(DEFAULT_MODEL.parents[1], reload_interval=0, drift_window_rows=100) as (_, client):
        assert (await client.post("/anomaly-score", json={"inputs": digits_rows(40).tolist()})).status_code == 200
        assert (await client.post("/anomaly-score", json={"inputs": digits_rows(5).tolist(),
                                                          "samples": 4})).status_code == 200
        calm = metric((await client.get("/metrics")).text, "vae_anomaly_score_psi", score="typicality")
        await asyncio.sleep(1.05)  # the gauge refreshes at most once a second (the PSI is not per request)
        noise = np.full((60, 64), 16.0).tolist()
        assert (await client.post("/anomaly-score", json={"inputs": noise})).status_code == 200
        text = (await client.get("/metrics")).text
    assert metric(text, "vae_anomaly_score_nats_count", score="typicality") == 100
    assert metric(text, "vae_anomaly_score_nats_count", score="iwae") == 5
    assert metric(text, "vae_anomaly_percentile_count", score="typicality") == 100
    assert metric(text, "vae_anomaly_percentile_bucket", score="typicality", le="99.0") < 100  # the noise rows
    assert calm < 0.5 < metric(text, "vae_anomaly_score_psi", score="typicality")
    assert metric(text, "vae_anomaly_score_psi", score="iwae") == 0  # K=4 is not what was calibrated
