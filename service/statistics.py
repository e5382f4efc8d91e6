"""Triton's statistics extension: per v2 model (`<model>.<operation>`, per version), counts and
cumulative nanoseconds of what the request path and the batchers measure.

Every request, native or v2, counts for the v2 model of its operation (a native `POST /encode` on
digits is a `digits.encode` inference), so the figures are the service's, not one protocol's. The
phases add up to a request's duration, as Triton's do:

- `compute_input`: reading, parsing and validating the request, up to the resolved model;
- `queue`: the time its rows waited in the model's batchers for a forward pass;
- `compute_infer`: the forward passes its rows were part of (each pass's full duration);
- `compute_output`: the rest, the operation's own work around the passes (preprocessing, scoring)
  and building the response.

A request's `RequestTiming` rides in the batcher's `PASS_OBSERVER` context variable to every pass
it is part of; a pass shared by several requests of one v2 model is one execution. All of it runs
on the event loop, so nothing here takes a lock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

# Operations whose requests carry a batch of rows (v2 max_batch_size > 0); sample and interpolate
# answer one request as one inference.
BATCHED_OPERATIONS = frozenset({"encode", "decode", "reconstruct", "anomaly-score", "classify"})
PHASES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")


@dataclass(slots=True)
class Duration:
    """Triton's `$duration_stat`: how many times, and how long in all."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += int(seconds * 1e9)

    def to_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass(slots=True)
class BatchStat:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class ModelStats:
    """One v2 model version's figures since the server started."""

    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    phases: dict[str, Duration] = field(default_factory=lambda: {phase: Duration() for phase in PHASES})
    batches: dict[int, BatchStat] = field(default_factory=dict)
    last_batch: int = -1

    def execution(self, batch: int, rows: int, stack_s: float, infer_s: float, split_s: float) -> None:
        """One forward pass; the second request of this model in the same pass does not count it again."""
        if batch == self.last_batch:
            return
        self.last_batch = batch
        self.execution_count += 1
        stat = self.batches.get(rows)
        if stat is None:
            stat = self.batches[rows] = BatchStat()
        stat.compute_input.add(stack_s)
        stat.compute_infer.add(infer_s)
        stat.compute_output.add(split_s)

    def to_dict(self, name: str, version: int) -> dict[str, Any]:
        return {"name": name, "version": str(version), "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count, "execution_count": self.execution_count,
                "inference_stats": {phase: d.to_dict() for phase, d in self.phases.items()},
                "response_stats": {},
                "batch_stats": [{"batch_size": size, "compute_input": s.compute_input.to_dict(),
                                 "compute_infer": s.compute_infer.to_dict(),
                                 "compute_output": s.compute_output.to_dict()}
                                for size, s in sorted(self.batches.items())],
                "memory_usage": []}


@dataclass(slots=True)
class RequestTiming:
    """One request's share of the passes it waited on: the batcher's PassObserver for that request."""

    start: float = field(default_factory=time.perf_counter)
    stats: ModelStats | None = None  # set once the request's model is known
    parsed: float = 0.0
    rows: int = 0  # rows of its first pass: the request's batch size
    queue_s: float = 0.0
    infer_s: float = 0.0

    def waited(self, seconds: float, rows: int) -> None:
        self.queue_s += seconds
        if not self.rows:
            self.rows = rows

    def ran(self, batch: int, rows: int, stack_s: float, infer_s: float, split_s: float) -> None:
        self.infer_s += infer_s
        if self.stats is not None:
            self.stats.execution(batch, rows, stack_s, infer_s, split_s)


class Statistics:
    """The figures of every (model, version, operation) that has served a request."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, int, str], ModelStats] = {}

    def entry(self, model: str, version: int, operation: str) -> ModelStats:
        key = (model, version, operation)
        stats = self._models.get(key)
        if stats is None:
            stats = self._models[key] = ModelStats()
        return stats

    def finished(self, timing: RequestTiming, operation: str, ok: bool) -> None:
        """A request is over: add its phases (those of a request refused before its model was known
        belong to no model and are not counted)."""
        stats = timing.stats
        if stats is None:
            return
        total = time.perf_counter() - timing.start
        if not ok:
            stats.phases["fail"].add(total)
            return
        phases = stats.phases
        compute_input = timing.parsed - timing.start
        phases["success"].add(total)
        phases["queue"].add(timing.queue_s)
        phases["compute_input"].add(compute_input)
        phases["compute_infer"].add(timing.infer_s)
        phases["compute_output"].add(max(0.0, total - compute_input - timing.queue_s - timing.infer_s))
        stats.inference_count += (timing.rows or 1) if operation in BATCHED_OPERATIONS else 1
        stats.last_inference_ms = time.time_ns() // 1_000_000

    def get(self, model: str, version: int, operation: str) -> ModelStats:
        """The figures of one v2 model version; zeros when it has served nothing yet."""
        return self._models.get((model, version, operation)) or ModelStats()
