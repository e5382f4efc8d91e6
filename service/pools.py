"""The service's thread pools: light work at the normal CPU priority, large work below it.

A one-row request must neither wait behind a neighbour's 131,000-row anomaly score nor share the
cores equally with it. Forward passes larger than one batch (`VAE_MAX_BATCH_SIZE` rows: only a lone
large call makes one), the scoring of large passes and the drawing of pictures run on background
threads whose nice value is `VAE_BACKGROUND_NICE` higher, so the kernel gives light work the CPU
first and background work what is left; an idle machine runs it at full speed. Linux only (elsewhere
a thread's nice value is the whole process's, so it is left alone).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger("vaeserve")
T = TypeVar("T")


def lower_priority(nice: int) -> None:
    """Raise the calling thread's nice value by `nice` (on Linux, nice() is per thread)."""
    if nice <= 0 or sys.platform != "linux":
        return
    try:
        os.nice(nice)
    except OSError as e:  # a sandbox may forbid it; the pools still work, without priorities
        log.warning("could not lower the background threads' CPU priority (VAE_BACKGROUND_NICE): %s", e)


async def run_in(executor: Executor | None, fn: Callable[..., T], *args: object) -> T:
    """fn(*args) on `executor` (the background pool), off the event loop; asyncio's default pool if None."""
    if executor is None:
        return await asyncio.to_thread(fn, *args)
    return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)


@dataclass(frozen=True, slots=True)
class Pools:
    inference: ThreadPoolExecutor  # forward passes of one batch or less
    background: ThreadPoolExecutor  # larger passes, scoring and pictures, at lower priority

    @classmethod
    def start(cls, inference_threads: int, nice: int) -> Pools:
        """`inference_threads` of each kind: a heavy request has as many threads as light ones, no more."""
        return cls(ThreadPoolExecutor(inference_threads, thread_name_prefix="vae-inference"),
                   ThreadPoolExecutor(inference_threads, thread_name_prefix="vae-background",
                                      initializer=lower_priority, initargs=(nice,)))

    def shutdown(self) -> None:
        self.inference.shutdown(wait=True, cancel_futures=False)
        self.background.shutdown(wait=True, cancel_futures=False)
