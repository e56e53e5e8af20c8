"""The LLM service's two refusals before any work: a model it does not serve, and a full queue.

Both rules are held here and checked nowhere else in the LLM service (the gateway refuses unknown model ids for its
own API; an engine is never asked). This is the place because it is the first thing `LLMService.generate` does for
every request, before the work a refused request must not cost: the prompt's tokenisation, the constraint's
compilation, the embedding fetch. An engine could not refuse that early (it is handed the request after that work),
and a second engine should not have to carry the rules again.

- **Adapter served.** The adapters served are those the service was built with, the same list GetModelInfo reports,
  so what is listed is exactly what is accepted. A request naming another is NotFoundError, naming those served.
- **Queue full.** A request counts against `--max-queue` from the moment it is taken here until the engine admits it:
  while the service prepares it and while it waits in the engine (`EngineLoad.waiting`). Counting the requests in
  preparation is what lets one check, before the work, hold the bound: a burst that finds the engine's queue empty
  cannot all pass and overfill it after their preparation. One more is OverloadedError.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

from services.contract.errors import NotFoundError, OverloadedError


class Intake:
    """The adapters served and the queue's bound; `waiting()` is the engine's count of requests not yet admitted."""

    def __init__(self, adapters: Sequence[str], max_queue: int, waiting: Callable[[], int]):
        self.adapters = tuple(adapters)
        self.max_queue = max_queue
        self._waiting = waiting
        self.preparing = 0  # requests taken (`queued`), not yet handed to the engine

    def check_adapter(self, adapter: str) -> None:
        """Refuses an adapter this server does not serve ("" is the base, always served)."""
        if adapter and adapter not in self.adapters:
            raise NotFoundError(f"model {adapter!r} is not served by this LLM server (adapters: "
                                f"{', '.join(self.adapters) or 'none'})")

    @contextlib.contextmanager
    def queued(self) -> Iterator[None]:
        """A place in the queue while the request is prepared: hand it to the engine inside, where the engine's
        waiting count takes it over. Refuses it when the queue is full."""
        if self.preparing + self._waiting() >= self.max_queue:
            raise OverloadedError(f"the LLM server's queue is full ({self.max_queue} waiting requests)")
        self.preparing += 1
        try:
            yield
        finally:
            self.preparing -= 1
