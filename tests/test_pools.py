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
