"""An asyncio server stack run on an event loop of its own thread, for tests that drive it synchronously (hypothesis,
Schemathesis, blocking gRPC stubs) from the test's thread."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import TypeVar

T = TypeVar("T")
START_TIMEOUT_S = 60


@contextlib.contextmanager
def in_background(factory: Callable[[], AbstractAsyncContextManager[T]]) -> Iterator[T]:
    """Enters `factory()` on a new event loop in a daemon thread, yields what it gives, and exits it there."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="background-loop", daemon=True)
    thread.start()
    manager = factory()
    try:
        value = asyncio.run_coroutine_threadsafe(manager.__aenter__(), loop).result(START_TIMEOUT_S)
        try:
            yield value
        finally:
            asyncio.run_coroutine_threadsafe(manager.__aexit__(None, None, None), loop).result(START_TIMEOUT_S)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(START_TIMEOUT_S)
        loop.close()
