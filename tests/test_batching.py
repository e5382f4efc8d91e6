"""The batcher on its own: gates (threading.Event) instead of sleeps decide what runs when."""

import asyncio
import concurrent.futures
import threading

import numpy as np
import pytest

from service.batching import Batcher, BatchFailed, QueueFull

pytestmark = pytest.mark.anyio


class Gated:
    """fn(x) = [2x, row sums]; records each batch; blocks on `gate` while it is clear."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_next = False

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        self.batches.append(x.copy())
        self.entered.set()
        assert self.gate.wait(10)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("boom")
        return [2 * x, x.sum(axis=1)]


class FakeMetric:
    def __init__(self) -> None:
        self.values: list[float] = []

    def observe(self, v: float) -> None:
        self.values.append(v)

    def set(self, v: float) -> None:
        self.values.append(v)

    def inc(self, v: float = 1) -> None:
        self.values.append(v)


class FakeMetrics:
    def __init__(self) -> None:
        self.batch_size, self.queue_wait, self.inference = FakeMetric(), FakeMetric(), FakeMetric()
        self.queue_depth, self.rows = FakeMetric(), FakeMetric()


def rows(start: int, n: int, width: int = 3) -> np.ndarray:
    return np.arange(start * width, (start + n) * width, dtype=np.float32).reshape(n, width)


async def wait_entered(fn: Gated) -> None:
    assert await asyncio.to_thread(fn.entered.wait, 10)
    fn.entered.clear()


def make(fn: Gated, **kw) -> Batcher:
    options = {"name": "t", "max_batch_size": 64, "max_delay_s": 0.0, "max_queue_rows": 1000}
    return Batcher(fn, **(options | kw))


async def test_an_idle_batcher_starts_a_call_at_once():
    fn = Gated()
    out = await make(fn)(rows(0, 2))
    assert len(fn.batches) == 1 and fn.batches[0].shape == (2, 3)
    np.testing.assert_array_equal(out[0], 2 * rows(0, 2))
    np.testing.assert_array_equal(out[1], rows(0, 2).sum(axis=1))


async def test_calls_arriving_during_a_batch_form_the_next_one_and_get_their_own_rows():
    fn = Gated()
    fn.gate.clear()
    b = make(fn)
    first = asyncio.create_task(b(rows(0, 1)))
    await wait_entered(fn)
    later = [asyncio.create_task(b(rows(10 * i, i))) for i in range(1, 5)]
    await asyncio.sleep(0)
    assert b.queued_rows == 1 + 2 + 3 + 4
    fn.gate.set()
    results = await asyncio.gather(first, *later)
    assert [len(x) for x in fn.batches] == [1, 10]
    for i, out in enumerate(results[1:], start=1):
        np.testing.assert_array_equal(out[0], 2 * rows(10 * i, i))
    assert b.queued_rows == 0


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
async def test_each_call_hears_whether_its_pass_was_all_finite():
    """Callers that refuse inf and NaN check their own rows only when their pass, inputs or outputs, held one."""
    fn = Gated()
    fn.gate.clear()
    b = make(fn)
    first = asyncio.create_task(b(rows(0, 1)))
    await wait_entered(fn)
    bad = rows(10, 2)
    bad[1, 0] = np.nan
    shared = [asyncio.create_task(b(r)) for r in (rows(20, 1), bad)]
    await asyncio.sleep(0)
    fn.gate.set()
    clean, *mixed = await asyncio.gather(first, *shared)
    assert [len(x) for x in fn.batches] == [1, 3]
    assert clean.finite and [out.finite for out in mixed] == [False, False]
    np.testing.assert_array_equal(mixed[0][0], 2 * rows(20, 1))  # its own rows are still its own
    overflowing = await b(np.full((1, 2), 3e38, np.float32))  # finite in, inf out (2x)
    assert not overflowing.finite and not np.isfinite(overflowing[0]).all()


async def test_batch_size_counts_rows_and_a_large_call_goes_alone():
    fn = Gated()
    fn.gate.clear()
    b = make(fn, max_batch_size=5)
    first = asyncio.create_task(b(rows(0, 1)))
    await wait_entered(fn)
    tasks = [asyncio.create_task(b(rows(i, n))) for i, n in ((1, 3), (2, 2), (3, 9), (4, 1))]
    await asyncio.sleep(0)
    fn.gate.set()
    await asyncio.gather(first, *tasks)
    assert [len(x) for x in fn.batches] == [1, 3 + 2, 9, 1]  # 9 rows exceed the limit: that call runs alone


async def test_delay_waits_from_the_first_call_to_fill_a_batch():
    fn = Gated()
    b = make(fn, max_delay_s=0.2)
    tasks = [asyncio.create_task(b(rows(i, 1))) for i in range(3)]
    await asyncio.gather(*tasks)
    assert [len(x) for x in fn.batches] == [3]


async def test_a_full_batch_does_not_wait_for_the_delay():
    fn = Gated()
    b = make(fn, max_delay_s=30.0, max_batch_size=4)
    await asyncio.wait_for(asyncio.gather(*(b(rows(i, 2)) for i in range(2))), timeout=5)
    assert [len(x) for x in fn.batches] == [4]


async def test_a_cancelled_call_is_never_computed():
    fn = Gated()
    fn.gate.clear()
    b = make(fn)
    first = asyncio.create_task(b(rows(0, 1)))
    await wait_entered(fn)
    doomed = asyncio.create_task(b(rows(5, 2)))
    kept = asyncio.create_task(b(rows(7, 1)))
    await asyncio.sleep(0)
    doomed.cancel()
    fn.gate.set()
    await first
    np.testing.assert_array_equal((await kept)[0], 2 * rows(7, 1))
    assert [x.tolist() for x in fn.batches[1:]] == [rows(7, 1).tolist()]
    assert b.queued_rows == 0


async def test_a_failing_batch_fails_only_its_own_calls():
    fn = Gated()
    fn.gate.clear()
    b = make(fn)
    first = asyncio.create_task(b(rows(0, 1)))
    await wait_entered(fn)
    fn.fail_next = True
    second = asyncio.create_task(b(rows(1, 1)))
    await asyncio.sleep(0)
    fn.gate.set()
    with pytest.raises(BatchFailed, match="RuntimeError: boom"):
        await first
    np.testing.assert_array_equal((await second)[0], 2 * rows(1, 1))
    np.testing.assert_array_equal((await b(rows(2, 1)))[0], 2 * rows(2, 1))


async def test_queue_bound_refuses_at_once():
    fn = Gated()
    fn.gate.clear()
    b = make(fn, max_queue_rows=4)
    first = asyncio.create_task(b(rows(0, 1)))
    await wait_entered(fn)
    waiting = asyncio.create_task(b(rows(1, 3)))
    await asyncio.sleep(0)
    with pytest.raises(QueueFull, match="3 rows are queued"):
        await b(rows(2, 2))
    fn.gate.set()
    await asyncio.gather(first, waiting)
    assert len((await b(rows(0, 10)))[0]) == 10  # an empty queue admits a call larger than the bound


async def test_rows_in_must_equal_rows_out():
    b = Batcher(lambda x: [x[:-1]], name="lossy", max_batch_size=8, max_delay_s=0, max_queue_rows=8)
    with pytest.raises(BatchFailed, match="3 rows in, 2 rows out"):
        await b(rows(0, 3))


async def test_the_batcher_reports_its_metrics():
    fn = Gated()
    fn.gate.clear()
    m = FakeMetrics()
    b = make(fn, metrics=m)
    first = asyncio.create_task(b(rows(0, 2)))
    await wait_entered(fn)
    second = asyncio.create_task(b(rows(1, 3)))
    await asyncio.sleep(0)
    assert m.queue_depth.values[-1] == 3
    fn.gate.set()
    await asyncio.gather(first, second)
    assert m.batch_size.values == [2, 3] and m.rows.values == [2, 3]
    assert len(m.queue_wait.values) == 2 and len(m.inference.values) == 2
    assert m.queue_depth.values[-1] == 0


async def test_many_concurrent_callers_each_get_their_own_rows():
    fn = Gated()
    b = make(fn, max_batch_size=16)
    outs = await asyncio.gather(*(b(rows(i, 1 + i % 3)) for i in range(200)))
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out[0], 2 * rows(i, 1 + i % 3))
    assert max(len(x) for x in fn.batches) > 1
    assert sum(len(x) for x in fn.batches) == sum(1 + i % 3 for i in range(200))


class Blocking:
    """fn(x) = [x]; names the thread each batch ran on; blocks while `gate` is clear."""

    def __init__(self) -> None:
        self.threads: list[str] = []
        self.gate = threading.Event()
        self.entered = threading.Event()

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        self.threads.append(threading.current_thread().name)
        self.entered.set()
        assert self.gate.wait(10)
        return [x]


async def test_a_large_call_runs_in_the_background_and_holds_up_no_other_model():
    """Two models share one inference thread; one's call larger than a batch runs on the background pool,
    so while it is stuck the other model's small calls still run on the inference thread."""
    light_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="light")
    background = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="background")
    heavy_fn, small_fn = Blocking(), Gated()
    pools = {"executor": light_pool, "background": background}
    heavy, small = make(heavy_fn, max_batch_size=4, **pools), make(small_fn, max_batch_size=4, **pools)
    try:
        stuck = asyncio.create_task(heavy(rows(0, 9)))
        assert await asyncio.to_thread(heavy_fn.entered.wait, 10)
        out = await asyncio.wait_for(small(rows(0, 2)), 5)  # the inference thread is free
        np.testing.assert_array_equal(out[0], 2 * rows(0, 2))
        assert not stuck.done()
        heavy_fn.gate.set()
        heavy_fn.entered.clear()
        (big,) = await stuck
        np.testing.assert_array_equal(big, rows(0, 9))
        (four,) = await heavy(rows(0, 4))  # one batch's worth is not large: the inference thread
        assert four.shape == (4, 3)
        assert heavy_fn.threads[0].startswith("background") and heavy_fn.threads[1].startswith("light")
    finally:
        heavy_fn.gate.set()
        light_pool.shutdown()
        background.shutdown()
