"""vLLM's own statistics as our engine's figures (`EngineLoad`, `StepReport`).

vLLM hands every engine step's `SchedulerStats` to its stat loggers, on the event loop's thread of the process that
runs `AsyncLLM` (ours). `StatsLogger` is such a logger: it keeps the latest occupancy and calls back once per step,
so the engine can tell its observer (the service's metrics) what the step did and what the engine holds now.

What each figure means here:
- `running`, `waiting`: vLLM's scheduler counts (an answer of n is a request of its own in vLLM);
- `kv_bytes`, `kv_budget_bytes`: the used share of vLLM's paged KV pool and the pool's size; vLLM reserves no KV
  ahead (it pages as sequences grow), so `kv_reserved_bytes` is what is held;
- the prefix cache lives in the pool's free blocks, so it has no bytes or budget of its own (0); its lookups and hits
  are counted per request by the engine, from vLLM's `num_cached_tokens` of each request;
- a step (`StepReport`): vLLM's iteration details (requests decoding, requests prefilling and their tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vllm.v1.metrics.loggers import StatLoggerBase

from services.llm.engine.api import EngineLoad, StepReport


@dataclass
class Occupancy:
    """The latest figures; counters only grow."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0  # share of the KV pool in use, 0-1
    steps: int = 0


class StatsLogger(StatLoggerBase):
    """A vLLM stat logger feeding one `Occupancy`; `on_step(report)` is called after each engine step's figures
    arrived."""

    def __init__(self, occupancy: Occupancy, on_step: Callable[[StepReport], None]):
        self.occupancy = occupancy
        self.on_step = on_step

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
        if scheduler_stats is None:
            return
        occupancy = self.occupancy
        occupancy.running = scheduler_stats.num_running_reqs
        occupancy.waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
        occupancy.kv_usage = scheduler_stats.kv_cache_usage
        details = scheduler_stats.iteration_details
        if details is None or details.is_dummy:
            return
        occupancy.steps += 1
        self.on_step(StepReport(decode_rows=details.num_generation_requests, prefill_rows=details.num_ctx_requests,
                                prefill_tokens=details.num_ctx_tokens))

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        pass

    def record_sleep_state(self, is_awake: int, level: int) -> None:
        pass


def logger_factory(occupancy: Occupancy, on_step: Callable[[StepReport], None]):
    """A stat logger factory for `AsyncLLM(stat_loggers=[...])`: vLLM calls it with (vllm_config, engine_index)."""
    return lambda vllm_config, engine_index=0: StatsLogger(occupancy, on_step)


def kv_pool_bytes(vllm_config) -> int:
    """The size of vLLM's KV pool once its engine started: blocks x tokens per block x bytes per token."""
    model, cache, parallel = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    per_token = (2 * model.get_num_layers(parallel) * model.get_num_kv_heads(parallel) * model.get_head_size()
                 * model.dtype.itemsize)
    return (cache.num_gpu_blocks or 0) * cache.block_size * per_token


def engine_load(occupancy: Occupancy, pool_bytes: int, prefix_lookups: int, prefix_hits: int,
                in_flight: int) -> EngineLoad:
    """Our figures from vLLM's. `in_flight`: the vLLM requests (answers) not finished yet. vLLM reports its counts
    with each step, so after the last step of a burst they would stay as that step saw them; they never exceed what
    is in flight."""
    running = min(occupancy.running, in_flight)
    held = int(occupancy.kv_usage * pool_bytes) if in_flight else 0
    return EngineLoad(running=running, waiting=min(occupancy.waiting, in_flight - running), kv_bytes=held,
                      kv_reserved_bytes=held, kv_budget_bytes=pool_bytes, prefix_lookups=prefix_lookups,
                      prefix_hits=prefix_hits, steps=occupancy.steps)
