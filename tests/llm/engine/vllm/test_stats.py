"""vLLM's statistics as our engine's figures (services.llm.engine.vllm.stats), from vLLM's own stats objects."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from vllm.v1.metrics.stats import SchedulerIterationDetails, SchedulerStats

from services.llm.engine.api import StepReport
from services.llm.engine.vllm.stats import Occupancy, engine_load, kv_pool_bytes, logger_factory


def details(ctx_requests: int, ctx_tokens: int, generating: int, dummy: bool = False) -> SchedulerIterationDetails:
    return SchedulerIterationDetails(iteration_index=0, num_ctx_requests=ctx_requests, num_ctx_tokens=ctx_tokens,
                                     num_generation_requests=generating, num_generation_tokens=generating,
                                     elapsed_ms=1.0, is_dummy=dummy)


def test_each_step_is_reported_and_the_occupancy_kept():
    occupancy, steps = Occupancy(), []
    logger = logger_factory(occupancy, steps.append)(vllm_config=None, engine_index=0)
    logger.record(SchedulerStats(num_running_reqs=3, num_waiting_reqs=2, num_skipped_waiting_reqs=1,
                                 kv_cache_usage=0.25, iteration_details=details(1, 300, 2)), None)
    logger.record(SchedulerStats(num_running_reqs=3, iteration_details=details(0, 0, 3, dummy=True)), None)
    logger.record(None, None)  # outputs without scheduler figures change nothing
    logger.record(SchedulerStats(num_running_reqs=4, kv_cache_usage=0.5), None)  # no step details: not a step
    assert steps == [StepReport(decode_rows=2, prefill_rows=1, prefill_tokens=300)]
    assert (occupancy.running, occupancy.waiting, occupancy.kv_usage, occupancy.steps) == (4, 0, 0.5, 1)


def test_the_load_never_shows_more_than_is_in_flight():
    occupancy = Occupancy(running=3, waiting=2, kv_usage=0.5, steps=7)
    busy = engine_load(occupancy, 1000, prefix_lookups=4, prefix_hits=1, in_flight=5)
    assert (busy.running, busy.waiting, busy.kv_bytes, busy.kv_reserved_bytes, busy.kv_budget_bytes) == (
        3, 2, 500, 500, 1000)
    assert (busy.prefix_lookups, busy.prefix_hits, busy.steps, busy.prefix_bytes) == (4, 1, 7, 0)
    # The last step of a burst saw three running; all have finished since.
    idle = engine_load(occupancy, 1000, 4, 1, in_flight=0)
    assert (idle.running, idle.waiting, idle.kv_bytes) == (0, 0, 0)
    assert engine_load(occupancy, 1000, 4, 1, in_flight=4).waiting == 1


def test_the_pool_size_is_blocks_times_tokens_times_bytes_per_token():
    model = SimpleNamespace(get_num_layers=lambda parallel: 2, get_num_kv_heads=lambda parallel: 2,
                            get_head_size=lambda: 32, dtype=torch.float32)
    config = SimpleNamespace(model_config=model, cache_config=SimpleNamespace(num_gpu_blocks=512, block_size=128),
                             parallel_config=None)
    # K and V, 2 layers, 2 KV heads of 32 floats: 1 KiB per token.
    assert kv_pool_bytes(config) == 512 * 128 * 1024
