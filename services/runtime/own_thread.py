"""Running a blocking call in a thread of its own that exits when the call returns.

On CPU, torch's OpenMP runtime (libgomp) gives every thread that runs a parallel kernel a team of worker threads that
lives as long as that thread. Once a process holds more of them than it has CPUs, libgomp cuts its spin-wait from
300,000 to 100 rounds, and the model thread's workers then sleep and are woken in the kernel around every parallel
region of every forward (about 1,000 voluntary context switches per vision forward instead of about 20, measured).
So each service runs its torch kernels on one thread (the vision encoder's, the LLM engine's), and whatever else must
run one (loading the weights copies every tensor with parallel kernels) runs here, so its team goes with the thread.
`asyncio.to_thread`'s threads stay alive, and their teams with them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


async def in_own_thread(fn: Callable[..., T], *args) -> T:
    """`fn(*args)` in a fresh thread that exits as soon as it has returned."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="own-thread")
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
    finally:
        pool.shutdown(wait=False)
