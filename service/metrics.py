"""Prometheus metrics. Names are a documented API (README): all start with `vae_`.

Each app gets its own registry, so several apps (tests) can live in one process; under several
worker processes, prometheus-client's multiprocess mode aggregates them (see the README).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import multiprocess as prom_multiprocess

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
INFERENCE_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
QUEUE_WAIT_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.0)
# Served anomaly scores, nats: log-spaced, since a model's scale depends on its data (a 6-feature table
# scores around 10, an MNIST image around 100).
SCORE_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 2000, 5000, 10000)
PERCENTILE_BUCKETS = (10, 25, 50, 75, 90, 95, 99, 99.9, 100)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 131072)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


@dataclass
class NetworkMetrics:
    """The children of the per-network metrics for one (model, version, network)."""

    batch_size: Histogram
    queue_wait: Histogram
    inference: Histogram
    queue_depth: Gauge
    rows: Counter


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        model_labels = ("model", "version")
        net = (*model_labels, "network")
        self.requests = Counter("vae_requests", "Requests by endpoint and status code",
                                (*model_labels, "endpoint", "status"), registry=r)
        self.latency = Histogram("vae_request_duration_seconds", "Request latency, body read to response built",
                                 (*model_labels, "endpoint"), buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("vae_batch_size_rows", "Rows per forward pass", net,
                                    buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.queue_wait = Histogram("vae_queue_wait_seconds", "Time a request waited for its batch to start", net,
                                    buckets=QUEUE_WAIT_BUCKETS, registry=r)
        self.inference = Histogram("vae_inference_seconds", "Forward-pass time per batch", net,
                                   buckets=INFERENCE_BUCKETS, registry=r)
        self.queue_depth = Gauge("vae_queue_depth_rows", "Rows waiting for a forward pass", net, registry=r,
                                 multiprocess_mode="livesum")
        self.rows = Counter("vae_rows_processed", "Rows through a network", net, registry=r)
        self.anomalies = Counter("vae_anomaly_rows_flagged", "Rows scored above the threshold", model_labels,
                                 registry=r)
        self.scored = Counter("vae_anomaly_rows_scored", "Rows scored by /anomaly-score", model_labels, registry=r)
        score_labels = (*model_labels, "score")
        self.score = Histogram("vae_anomaly_score_nats", "Served anomaly scores", score_labels,
                               buckets=SCORE_BUCKETS, registry=r)
        self.percentile = Histogram("vae_anomaly_percentile", "Served scores' percentile among the calibration rows",
                                    score_labels, buckets=PERCENTILE_BUCKETS, registry=r)
        self.drift = Gauge("vae_anomaly_score_psi", "Population stability index of the last VAE_DRIFT_WINDOW_ROWS "
                           "served scores against the calibration", score_labels, registry=r,
                           multiprocess_mode="max")
        self.model_info = Gauge("vae_model_info", "Loaded model versions (value 1), with runtime and device",
                                (*model_labels, "runtime", "device"), registry=r, multiprocess_mode="livemax")
        self._request_children: dict[tuple[str, str, str, int], tuple[Counter, Histogram]] = {}
        self._anomaly_children: dict[tuple[str, str, str], tuple[Histogram, Histogram, Gauge]] = {}
        self.load_failures = Counter("vae_model_load_failures", "Model versions refused at start", model_labels,
                                     registry=r)

    def record_request(self, labels: tuple[str, str], endpoint: str, status: int, seconds: float) -> None:
        """Count and time one request; the label children are looked up once per combination."""
        key = (*labels, endpoint, status)
        children = self._request_children.get(key)
        if children is None:
            children = (self.requests.labels(*labels, endpoint, str(status)), self.latency.labels(*labels, endpoint))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def anomaly(self, model: str, version: int, score: str) -> tuple[Histogram, Histogram, Gauge]:
        """The score histogram, percentile histogram and drift gauge of one (model, version, score)."""
        key = (model, str(version), score)
        children = self._anomaly_children.get(key)
        if children is None:
            children = (self.score.labels(*key), self.percentile.labels(*key), self.drift.labels(*key))
            self._anomaly_children[key] = children
        return children

    def network(self, model: str, version: int, network: str) -> NetworkMetrics:
        labels = (model, str(version), network)
        return NetworkMetrics(
            batch_size=self.batch_size.labels(*labels), queue_wait=self.queue_wait.labels(*labels),
            inference=self.inference.labels(*labels), queue_depth=self.queue_depth.labels(*labels),
            rows=self.rows.labels(*labels),
        )

    def exposition_registry(self) -> CollectorRegistry:
        """The registry /metrics renders: this one, or all worker processes' in multiprocess mode."""
        if multiprocess_dir() is None:
            return self.registry
        merged = CollectorRegistry()
        prom_multiprocess.MultiProcessCollector(merged)
        return merged
