"""Where a timed request's time went, from each server's own metrics read just before and just after it.

`vllm serve` (summed over its replicas): its engine's time to first token (from the request's arrival at the
engine), the prefill time (the vision encoder runs in the same steps as the prompt's prefill, so it is in here) and
the time queued. Ours: the vision service's encoder forwards and the tiles it encoded, and the LLM services' time to
first token (from the Generate call's arrival: the embeddings' fetch and the prefill). What the client measured
beyond these is the servers' front ends: HTTP, decoding and hashing the image, the template, tokenisation, and for
ours the gateway's calls. Requests run one at a time where this is used, so the deltas are that request's.
"""

from __future__ import annotations

from bench.peer.openai_stream import get_text
from bench.peer.sides import Side
from bench.stack import metric_value

VLLM = {"engine_ttft_s": "vllm:time_to_first_token_seconds_sum",
        "engine_prefill_s": "vllm:request_prefill_time_seconds_sum",
        "engine_queue_s": "vllm:request_queue_time_seconds_sum"}
OURS_VISION = {"vision_encode_s": "internvl_vision_encode_seconds_sum",
               "vision_tiles_encoded": "internvl_vision_tiles_encoded_total"}
OURS_LLM = {"llm_ttft_s": "internvl_llm_time_to_first_token_seconds_sum"}


def snapshot(side: Side) -> dict[str, float]:
    totals: dict[str, float] = {}

    def add(text: str, names: dict[str, str]) -> None:
        for key, name in names.items():
            totals[key] = totals.get(key, 0.0) + metric_value(text, name)

    for serve in side.serves:
        add(get_text(serve.endpoint, "/metrics"), VLLM)
    if side.stack is not None:
        add(side.stack.metrics("vision-0"), OURS_VISION)
        for name in side.stack.llm_names:
            add(side.stack.metrics(name), OURS_LLM)
    return totals


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: round(after[key] - before.get(key, 0.0), 6) for key in after}
