"""Prometheus metrics of the LLM service, in a registry of its own (`internvl_llm_*`).

The engine calls these hooks (services.llm.engine.api.EngineObserver) on the asyncio thread only: `on_step` and
`on_tokens` after every step, `on_finish` for every finished request, `on_schedule` with its `EngineLoad` whenever
its counts change. The prefix cache's counters are exported as deltas of the load's.

Token and request counters carry a `model` label: the base model's name (`model_name`) or the LoRA adapter's.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.llm.engine.api import EngineLoad, EngineObserver, StepReport
from services.runtime.request_metrics import RequestMetrics

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class LLMMetrics(EngineObserver):
    def __init__(self, registry: CollectorRegistry | None = None, model_name: str = "base"):
        self.registry = registry or CollectorRegistry()
        # The `model` label of the base's requests (the service sets its checkpoint's name).
        self.model_name = model_name
        r = self.registry
        self.time_to_first_token = Histogram(
            "internvl_llm_time_to_first_token_seconds", "Request arrival to its first generated token.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "internvl_llm_inter_token_latency_seconds", "Time between consecutive tokens of one stream.",
            buckets=ITL_BUCKETS, registry=r)
        self.generated_tokens = Counter("internvl_llm_generated_tokens", "Tokens generated, by model (base or "
                                        "adapter).", ["model"], registry=r)
        self.prompt_tokens = Counter("internvl_llm_prompt_tokens", "Prompt tokens of finished requests, by model.",
                                     ["model"], registry=r)
        self.cached_prompt_tokens = Counter(
            "internvl_llm_cached_prompt_tokens", "Prompt tokens whose KV came from the prefix cache, by model.",
            ["model"], registry=r)
        self.finished = Counter("internvl_llm_finished_requests", "Finished generations by finish reason and "
                                "model.", ["finish_reason", "model"], registry=r)
        # requests{method,code}, request_seconds{method}, in_flight_requests{method}: recorded by the server.
        self.requests = RequestMetrics("internvl_llm_", r)
        self.running = Gauge("internvl_llm_running_sequences", "Sequences decoding or prefilling.", registry=r)
        self.waiting = Gauge("internvl_llm_waiting_sequences", "Requests queued for admission.", registry=r)
        self.kv_cache_usage = Gauge(
            "internvl_llm_kv_cache_usage_bytes",
            "KV state held: 'running' (the decode batch) and 'prefix' (finished turns kept for reuse).",
            ["pool"], registry=r)
        self.kv_reserved = Gauge("internvl_llm_kv_reserved_bytes", "KV memory admission has promised to running "
                                 "sequences (each one's prompt + max_new_tokens, in the padded batch).", registry=r)
        self.kv_budget = Gauge("internvl_llm_kv_budget_bytes", "Admission's limit on the reserved KV memory.",
                               registry=r)
        self.kv_cache_budget = Gauge("internvl_llm_prefix_cache_budget_bytes", "Prefix cache byte budget.",
                                     registry=r)
        self.prefix_lookups = Counter("internvl_llm_prefix_cache_lookups", "Prefix cache lookups (one per "
                                      "admitted request).", registry=r)
        self.prefix_hits = Counter("internvl_llm_prefix_cache_hits", "Lookups that reused a cached prefix "
                                   "(hit rate = hits / lookups).", registry=r)
        self.forward_steps = Counter("internvl_llm_forward_steps", "Model forwards by kind (decode, prefill).",
                                     ["kind"], registry=r)
        self.scheduler_steps = Counter("internvl_llm_scheduler_steps", "Scheduler steps (at most one decode forward "
                                       "for all running sequences and one prefill forward).", registry=r)
        self.batch_size = Histogram("internvl_llm_decode_batch_size", "Sequences per decode forward.",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.prefill_batch_size = Histogram("internvl_llm_prefill_batch_size", "Prompts per prefill forward.",
                                            buckets=BATCH_BUCKETS, registry=r)
        self.prefill_tokens = Counter("internvl_llm_prefill_tokens", "Prompt tokens fed by prefill forwards "
                                      "(prefix cache hits excluded).", registry=r)
        self._seen = {"lookups": 0, "hits": 0}

    def on_step(self, step: StepReport) -> None:
        self.scheduler_steps.inc()
        if step.decode_rows:
            self.forward_steps.labels("decode").inc()
            self.batch_size.observe(step.decode_rows)
        if step.prefill_rows:
            self.forward_steps.labels("prefill").inc()
            self.prefill_batch_size.observe(step.prefill_rows)
            self.prefill_tokens.inc(step.prefill_tokens)

    def on_tokens(self, timed: list, now: float) -> None:
        """`timed`: (arrival, previous token time or None, TokenDelta, adapter) for each delta delivered at
        `now`."""
        for arrival, previous, delta, adapter in timed:
            if previous is None:
                self.time_to_first_token.observe(now - arrival)
            else:
                self.inter_token_latency.observe(now - previous)
            self.generated_tokens.labels(adapter or self.model_name).inc(len(delta.token_ids))

    def on_finish(self, reason: str, prompt_tokens: int, cached_prompt_tokens: int, adapter: str = "") -> None:
        model = adapter or self.model_name
        self.finished.labels(reason, model).inc()
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.cached_prompt_tokens.labels(model).inc(cached_prompt_tokens)

    def on_schedule(self, load: EngineLoad) -> None:
        """Gauges and the prefix cache's counters, after any change of the engine's state."""
        self.running.set(load.running)
        self.waiting.set(load.waiting)
        self.kv_cache_usage.labels("prefix").set(load.prefix_bytes)
        self.kv_cache_usage.labels("running").set(load.kv_bytes)
        self.kv_reserved.set(load.kv_reserved_bytes)
        self.kv_budget.set(load.kv_budget_bytes)
        self.kv_cache_budget.set(load.prefix_budget_bytes)
        for name, value, counter in (("lookups", load.prefix_lookups, self.prefix_lookups),
                                     ("hits", load.prefix_hits, self.prefix_hits)):
            if value > self._seen[name]:
                counter.inc(value - self._seen[name])
                self._seen[name] = value
