"""A generic asyncio micro-batcher: merges concurrent calls to one function into one call.

It knows nothing about HTTP or models: it is handed `fn(stacked_rows) -> list of arrays`, runs it
off the event loop, and gives each caller exactly its own rows back. When the function is idle a
call starts at once; calls that arrive while a batch runs form the next batch (optionally after
waiting `max_delay_s` from the first queued call to fill it). Batch size counts rows, not calls.
Whoever is awaiting a call can hear how its batch went through the `PASS_OBSERVER` context variable
(the service's per-request statistics do), without the batcher knowing who listens.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

BatchFn = Callable[[np.ndarray], Sequence[np.ndarray]]


class QueueFull(Exception):
    """Too many rows are already waiting; the caller should retry later."""


class BatchFailed(Exception):
    """The batch this call was part of raised; other batches are unaffected."""


class _Observer(Protocol):
    def observe(self, amount: float) -> None: ...


class _Setter(Protocol):
    def set(self, value: float) -> None: ...


class _Incrementer(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class BatcherMetrics(Protocol):
    @property
    def batch_size(self) -> _Observer: ...
    @property
    def queue_wait(self) -> _Observer: ...
    @property
    def inference(self) -> _Observer: ...
    @property
    def queue_depth(self) -> _Setter: ...
    @property
    def rows(self) -> _Incrementer: ...


class PassObserver(Protocol):
    """Hears, on the event loop, how each forward pass that served one caller's rows went."""

    def waited(self, seconds: float, rows: int) -> None:
        """The caller's `rows` waited `seconds` in the queue before their pass started."""

    def ran(self, batch: int, rows: int, stack_s: float, infer_s: float, split_s: float) -> None:
        """Pass number `batch` (unique per process) of `rows` rows in all succeeded: seconds stacking its
        inputs, running fn, splitting its outputs."""


# Set by a caller (per asyncio task) to hear of its passes; calls made while it is None cost nothing more.
PASS_OBSERVER: ContextVar[PassObserver | None] = ContextVar("vae_pass_observer", default=None)
_BATCH_NUMBERS = itertools.count()


def all_finite(arrays: Sequence[np.ndarray]) -> bool:
    """Whether every value is finite, in one reduction per array: a NaN or inf anywhere makes its sum
    non-finite (so can finite values summed past float32: a false alarm, never a miss). The ufunc itself,
    not ndarray.sum, whose overflow warning would come from numpy's module, past service/__init__.py's filter."""
    return all(np.isfinite(np.add.reduce(a, axis=None)) for a in arrays)


class _PassValues:
    """One pass's stacked inputs and outputs, summed once, when the first of its callers asks."""

    __slots__ = ("_arrays", "_finite")

    def __init__(self, arrays: tuple[np.ndarray, ...]):
        self._arrays: tuple[np.ndarray, ...] = arrays
        self._finite: bool | None = None

    @property
    def finite(self) -> bool:
        if self._finite is None:
            self._finite, self._arrays = all_finite(self._arrays), ()
        return self._finite


class Outputs(list[np.ndarray]):
    """fn's outputs for one call's rows, and whether the whole pass, its inputs and outputs, held only
    finite values. Worked out once per pass and only if asked, so a caller that must refuse inf and NaN
    looks at its own rows only when the pass did not, and a caller that does not ask pays nothing."""

    __slots__ = ("_pass",)

    def __init__(self, outputs: list[np.ndarray], values: _PassValues):
        super().__init__(outputs)
        self._pass = values

    @property
    def finite(self) -> bool:
        return self._pass.finite


@dataclass(slots=True)
class _Item:
    rows: np.ndarray  # [n, D]
    future: asyncio.Future[Outputs]
    observer: PassObserver | None = None
    enqueued: float = field(default_factory=time.monotonic)


class Batcher:
    def __init__(self, fn: BatchFn, *, name: str, max_batch_size: int, max_delay_s: float, max_queue_rows: int,
                 executor: Executor | None = None, background: Executor | None = None,
                 metrics: BatcherMetrics | None = None):
        """`executor` runs the forward passes (one thread is the intent); a private one if None.
        `background`, if given, runs the passes larger than `max_batch_size` instead (a lone large call),
        so that they never hold up a batch of small ones."""
        self.fn = fn
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue_rows = max_queue_rows
        self.executor = executor or concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"batcher-{name}")
        self.background = background or self.executor
        self.metrics = metrics
        self._queue: collections.deque[_Item] = collections.deque()
        self._queued_rows = 0
        self._running = False
        self._timer: asyncio.TimerHandle | None = None

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    async def __call__(self, rows: np.ndarray) -> Outputs:
        """Run fn on these rows as part of some batch; returns fn's outputs for these rows only.

        Raises QueueFull at once when the queue is at its bound, BatchFailed if the batch raised.
        Cancelling the caller (a timeout) takes its rows out: they are not computed afterwards.
        """
        n = len(rows)
        # The bound stops pile-ups; a lone call larger than it (request limits allow it) still runs.
        if self._queued_rows and self._queued_rows + n > self.max_queue_rows:
            raise QueueFull(f"{self.name}: {self._queued_rows} rows are queued (limit {self.max_queue_rows}); "
                            "retry later")
        loop = asyncio.get_running_loop()
        item = _Item(rows, loop.create_future(), PASS_OBSERVER.get())
        self._queue.append(item)
        self._queued_rows += n
        self._depth_changed()
        if not self._running:
            self._schedule(loop)
        return await item.future

    def _depth_changed(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._queued_rows)

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start a batch now, or arm the delay timer from the first queued call."""
        if self.max_delay_s <= 0 or self._queued_rows >= self.max_batch_size:
            self._launch(loop)
        elif self._timer is None:
            wait = self.max_delay_s - (time.monotonic() - self._queue[0].enqueued)
            self._timer = loop.call_later(max(0.0, wait), self._launch, loop)

    def _take(self) -> list[_Item]:
        """Pop the next batch: whole calls, up to max_batch_size rows (a larger call goes alone)."""
        items: list[_Item] = []
        rows = 0
        while self._queue:
            item = self._queue[0]
            n = len(item.rows)
            if item.future.done():  # its caller timed out or went away: never compute it
                self._queue.popleft()
                self._queued_rows -= n
                continue
            if items and rows + n > self.max_batch_size:
                break
            self._queue.popleft()
            self._queued_rows -= n
            items.append(item)
            rows += n
        self._depth_changed()
        return items

    def _launch(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        items = self._take()
        if not items:
            self._running = False
            return
        self._running = True
        now = time.monotonic()
        for item in items:
            if self.metrics is not None:
                self.metrics.queue_wait.observe(now - item.enqueued)
            if item.observer is not None:
                item.observer.waited(now - item.enqueued, len(item.rows))
        # The worker thread hands the outcome straight back with call_soon_threadsafe: one loop pass,
        # where run_in_executor's wrapping asyncio future cost another (and an object per batch).
        parts = [item.rows for item in items]
        executor = self.background if len(parts) == 1 and len(parts[0]) > self.max_batch_size else self.executor
        done = executor.submit(self._run, parts)
        done.add_done_callback(lambda outcome: loop.call_soon_threadsafe(self._finish, loop, items, outcome))

    def _run(self, parts: list[np.ndarray]) -> tuple[np.ndarray, Sequence[np.ndarray], float, float]:
        """In the executor thread: stack, run, check the batch kept its rows; (inputs, outputs, stack s, run s)."""
        start = time.perf_counter()
        x = parts[0] if len(parts) == 1 else np.concatenate(parts)
        stacked = time.perf_counter()
        outputs = self.fn(x)
        seconds = time.perf_counter() - stacked
        for out in outputs:
            if len(out) != len(x):
                raise BatchFailed(f"{self.name}: {len(x)} rows in, {len(out)} rows out")
        return x, outputs, stacked - start, seconds

    def _finish(self, loop: asyncio.AbstractEventLoop, items: list[_Item],
                done: concurrent.futures.Future[tuple[np.ndarray, Sequence[np.ndarray], float, float]]) -> None:
        try:
            x, outputs, stack_s, seconds = done.result()
        except BaseException as exc:  # noqa: BLE001 - every caller of this batch must hear of it
            error = exc if isinstance(exc, BatchFailed) else BatchFailed(f"{self.name}: {type(exc).__name__}: {exc}")
            for item in items:
                if not item.future.done():
                    item.future.set_exception(error)
        else:
            total = sum(len(item.rows) for item in items)
            if self.metrics is not None:
                self.metrics.batch_size.observe(total)
                self.metrics.inference.observe(seconds)
                self.metrics.rows.inc(total)
            split_start = time.perf_counter()
            values = _PassValues((x, *outputs))  # a pass over one batch keeps at most max_batch_size rows of x
            start = 0
            for item in items:
                stop = start + len(item.rows)
                if not item.future.done():
                    item.future.set_result(Outputs([out[start:stop] for out in outputs], values))
                start = stop
            observers = [item.observer for item in items if item.observer is not None]
            if observers:
                split_s = time.perf_counter() - split_start
                batch = next(_BATCH_NUMBERS)
                for observer in observers:
                    observer.ran(batch, total, stack_s, seconds, split_s)
        if self._queue:
            self._schedule(loop)
            if self._timer is not None:
                self._running = False  # waiting on the timer; a new call must not launch early
        else:
            self._running = False
