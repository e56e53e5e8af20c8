"""The peer benchmark's timed runs, in two kinds of phase (`internvl-serve bench` runs them after its own):

1. the repeats on one replica (`run_repeat`, one phase per repeat, `peer-1-repeat-<r>`): `vllm serve` (a), our
   stack on the vLLM engine (b) and on the transformers engine (c), all three up, started on first use and kept
   through the repeats (`PeerSides`); scenarios 10 (arrivals, in the first `arrival_repeats` repeats), 11
   (conversations), 12 (the returning image) and 14 (decode). Within repeat r each scenario's sides run one after
   the other, a-b-c in even repeats and c-b-a in odd ones, the others idle meanwhile, so the machine's drift falls
   on every side alike (as in the main benchmark's repeats);
2. three replicas (`run_pool`, phase `peer-3`): three `vllm serve` behind the round-robin proxy, then our stack with
   three LLM replicas on the vLLM engine (affinity routing); every repeat of scenarios 13 (conversations) and 12 (the
   returning image, which lands on another replica). Here the sides run one after the other, not interleaved: both
   up at once at the 1B shape (six model copies with their KV pools, the API servers, our vision service) need more
   than the 23 GiB of the machine the benchmark was built on.

Before the first timing of `vllm serve`, its prompt ids are checked against ours (`prompt_check`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from bench import workload as W
from bench.peer import arrivals, conversations, sides
from bench.peer.openai_stream import image_url_part, stream_chat, text_part
from bench.peer.prompt_check import check_prompts
from bench.phases import Recorder, wants
from bench.settings import BenchSettings

log = logging.getLogger("bench")

ONE_REPLICA_SIDES = ("vllm", "ours-vllm", "ours-transformers")


def _ready(s: BenchSettings, side: sides.Side, model: str, rec: Recorder) -> sides.Side:
    """Records how it started, checks `vllm serve`'s prompts (once a run), and warms every replica up with a short
    request about an image of its own (each server warms its language model itself, not every vision path)."""
    rec.note("peer.sides", side.describe())
    if side.name == "vllm" and "peer.prompt_check" not in rec.extra:
        endpoint = side.serves[0].endpoint
        image = W.image_png(W.seed(10, 999, 999), s.workload.arrival_image_side)
        rec.extra["peer.prompt_check"] = check_prompts(endpoint, model, image, s.workload.arrival_image_side)
        log.info("peer: vllm serve's prompt ids equal ours (%s tokens)", rec.extra["peer.prompt_check"])
    for i in range(side.replicas):
        image = W.image_png(W.seed(0, 500 + i, side.replicas), s.workload.arrival_image_side)
        stream_chat(side.endpoint, [{"role": "user", "content": [image_url_part(image), text_part("Hello")]}], 2)
    return side


class PeerSides:
    """The one-replica sides, each started on first use and kept until `close()`."""

    def __init__(self, s: BenchSettings, model: str, rec: Recorder):
        self.s, self.model, self.rec = s, model, rec
        self._up: dict[str, sides.Side] = {}
        self._watchdog: sides.MemoryWatchdog | None = None

    def __getitem__(self, name: str) -> sides.Side:
        if name not in self._up:
            self._watchdog = self._watchdog or sides.MemoryWatchdog()
            side = sides.start(self.s, self.model, name, 1)
            try:
                self._up[name] = _ready(self.s, side, self.model, self.rec)
            except BaseException:
                side.stop()
                raise
            self.rec.extra.setdefault("peer.rss_mib_warm", {})[name] = side.rss_mib()
        return self._up[name]

    def close(self) -> None:
        while self._up:
            self._up.popitem()[1].stop()
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None


def _in_order(r: int, runs: list[Callable[[], None]]) -> None:
    for run in reversed(runs) if r % 2 else runs:
        run()


def run_repeat(s: BenchSettings, x: PeerSides, rec: Recorder, r: int) -> None:
    """Repeat r on one replica (module doc); the last repeat stops the sides."""
    w = s.workload
    log.info("peer repeat %d/%d", r + 1, s.repeats)
    rec.load(f"peer repeat {r + 1}")
    if wants(s, 10) and r < w.arrival_repeats:
        for i in range(len(w.peer_arrival_loads)):
            _in_order(r, [lambda name=name, i=i: arrivals.run(s, x[name], x["vllm"], rec, r, i)
                          for name in ONE_REPLICA_SIDES])
    if wants(s, 11):
        variants = [("vllm", "history"), ("ours-vllm", "session"), ("ours-vllm", "history"),
                    ("ours-transformers", "session")]
        _in_order(r, [lambda name=name, mode=mode: conversations.run_conversations(
            s, x[name], rec, 11, r, w.peer_sessions, mode) for name, mode in variants])
    if wants(s, 12):
        _in_order(r, [lambda name=name: conversations.run_returning_image(s, x[name], rec, "1", r, w.peer_between)
                      for name in ("vllm", "ours-vllm")])
    if wants(s, 14):
        _in_order(r, [lambda name=name: conversations.run_decode(s, x[name], rec, r) for name in ONE_REPLICA_SIDES])
    rec.load(f"peer repeat {r + 1} end")
    if r == s.repeats - 1:
        x.close()


def run_pool(s: BenchSettings, model: str, rec: Recorder) -> None:
    """Three replicas of `vllm serve`, then three of our vLLM engine (module doc): each side up for every repeat of
    scenarios 13 and 12, then stopped before the other starts."""
    w = s.workload
    for name in ("vllm", "ours-vllm"):
        try:
            side = sides.start(s, model, name, w.peer_replicas, rec.extra.get("peer.rss_mib_warm", {}).get(name))
        except sides.MemoryShortError as exc:
            # Its scenarios show as missing; the rest of the run goes on.
            log.warning("peer: %s; its three-replica measures are skipped", exc)
            rec.note("peer.skipped", {"side": name, "replicas": w.peer_replicas, "reason": str(exc)})
            continue
        watchdog = sides.MemoryWatchdog()
        try:
            _ready(s, side, model, rec)
            rec.extra.setdefault("peer.rss_mib_pool", {})[name] = side.rss_mib()
            for r in range(s.repeats):
                rec.load(f"peer pool {name} repeat {r + 1}")
                if wants(s, 13):
                    for mode in ("history",) if name == "vllm" else ("session", "history"):
                        conversations.run_conversations(s, side, rec, 13, r, w.peer_pool_sessions, mode)
                if wants(s, 12):
                    conversations.run_returning_image(s, side, rec, "3", r, 0)
        finally:
            watchdog.stop()
            side.stop()
