"""The service's thread pools: background threads run below the light work's CPU priority."""

import os
import sys
import threading

import pytest

from service.pools import Pools


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux's")
def test_background_threads_run_at_a_lower_priority_and_inference_threads_do_not():
    pools = Pools.start(inference_threads=2, nice=7)
    try:
        here = _nice()
        assert pools.inference.submit(_nice).result() == here
        assert pools.background.submit(_nice).result() == min(19, here + 7)
        assert _nice() == here  # the caller's own priority is untouched
    finally:
        pools.shutdown()


def test_nice_zero_leaves_every_thread_as_it_was():
    pools = Pools.start(inference_threads=1, nice=0)
    try:
        assert pools.background.submit(_nice).result() == _nice()
    finally:
        pools.shutdown()


@pytest.mark.anyio
async def test_two_apps_in_one_loop_keep_their_own_pools():
    """An app that stops shuts its own pools down, not another's: the first still draws pictures and
    scores large passes (work on its background pool) after a second app in the same loop has gone."""
    from tests.service_helpers import DEFAULT_MODEL, serving

    async with serving(DEFAULT_MODEL.parents[1]) as (_, client):
        async with serving(DEFAULT_MODEL.parents[1]):
            pass
        picture = await client.post("/sample", json={"model": "digits", "n": 4, "seed": 1},
                                    headers={"accept": "image/png"})
        assert picture.status_code == 200 and picture.content.startswith(b"\x89PNG")
        scored = await client.post("/anomaly-score", json={"model": "digits", "inputs": [[0.0] * 64] * 2,
                                                           "samples": 1000})
        assert scored.status_code == 200, scored.text
