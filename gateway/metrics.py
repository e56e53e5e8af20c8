"""Prometheus metrics of the gateway (`internvl_gateway_*`), in a registry of its own exported on /metrics.

Requests of both transports (gRPC and the OpenAI-compatible HTTP API) are counted by the shared request metrics
(`requests{method,code}`, `request_seconds{method}`, `in_flight_requests{method}`; methods `Chat`, `BatchChat`,
`openai.chat_completions`): the gRPC server's interceptor records its calls, the HTTP handler records through the
same `track`. `track_tokens` adds what only a generation has: time to first token and tokens streamed. The
orchestrator reports the cache side: tiles encoded vs reused (hit ratio = reused / (encoded + reused)), image bytes
sent to the vision pool (misses only), and embedding bytes moved, by reference (read by the LLM from the cache) or
inline (through the gateway: combined multi-image mode, and the images the LLM found evicted, handed over after the
miss). The routers report each replica choice by reason, and
the pools their replicas by readiness and this gateway's calls in flight to each; each replica's circuit breaker
(`gateway.circuit`) reports its state and its transitions. Admission control (gateway.admission) reports admitted and
shed requests by priority, its queue and its wait.

Per tenant (`gateway.tenants`; a bounded set: the key file's names, `default`, `anonymous`, or the CNs the client CA
signed; a caller refused as unauthenticated has none and is counted in `requests` only): `tenant_requests{tenant,code}`
and `tenant_request_seconds{tenant}` (every public call, both transports) and `tenant_limited{tenant,limit}` (refusals
by the tenant's rate or concurrency limit).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway import tenants
from gateway.admission import AdmissionMetrics
from gateway.chat_response import Delta
from gateway.circuit import State
from gateway.endpoints import EndpointPool
from services.runtime.request_metrics import LATENCY_BUCKETS, RequestMetrics

PREFIX = "internvl_gateway_"


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.tenant_requests = Counter(PREFIX + "tenant_requests", "Requests by tenant and final gRPC status code",
                                       ["tenant", "code"], registry=r)
        self.tenant_request_seconds = Histogram(PREFIX + "tenant_request_seconds", "Request latency by tenant",
                                                ["tenant"], buckets=LATENCY_BUCKETS, registry=r)
        self.tenant_limited = Counter(PREFIX + "tenant_limited", "Requests refused by their tenant's rate or "
                                      "concurrency limit", ["tenant", "limit"], registry=r)
        self.requests = RequestMetrics(PREFIX, r, on_done=self._tenant_done)
        self.time_to_first_token = Histogram(PREFIX + "time_to_first_token_seconds",
                                             "From request arrival to the first generated token", ["method"],
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.generated_tokens = Counter(PREFIX + "generated_tokens", "Tokens streamed back to callers", ["method"],
                                        registry=r)
        self.tiles_encoded = Counter(PREFIX + "tiles_encoded",
                                     "Image tiles the vision pool encoded for requests (cache misses)", registry=r)
        self.tiles_reused = Counter(PREFIX + "tiles_reused",
                                    "Image tiles of prompts whose embeddings were already cached", registry=r)
        self.media_bytes_sent = Counter(PREFIX + "media_bytes_sent",
                                        "Image and frame bytes sent to the vision pool (misses only)", ["kind"],
                                        registry=r)
        self.embedding_bytes = Counter(PREFIX + "embedding_bytes",
                                       "Embedding bytes moved to the LLM pool: by reference (read from the cache by "
                                       "the LLM service) or inline (through the gateway)", ["path"], registry=r)
        self.encode_calls = Counter(PREFIX + "encode_calls", "Encode calls made to the vision pool", registry=r)
        self.missing_retries = Counter(PREFIX + "missing_embeddings_retries",
                                       "Generate calls retried with the embeddings the LLM found evicted handed over inline", registry=r)
        self.upstream_retries = Counter(PREFIX + "upstream_retries",
                                        "Calls to the vision or LLM pool tried again after failing UNAVAILABLE "
                                        "(a replica died, drained or lost Redis)", ["service", "method"], registry=r)
        self.sessions = Counter(PREFIX + "sessions", "Session rounds by whether they started or continued a session",
                                ["event"], registry=r)
        self.routing_decisions = Counter(PREFIX + "routing_decisions",
                                         "Replica choices by pool and reason: affinity (the key's first choice), "
                                         "overload (an earlier choice was over the load bound), failover (an "
                                         "earlier choice was not ready or failed the call), round_robin",
                                         ["pool", "reason"], registry=r)
        self.endpoint_in_flight = Gauge(PREFIX + "endpoint_in_flight",
                                        "Calls this gateway has in flight to each replica", ["pool", "endpoint"],
                                        registry=r)
        self.endpoints = Gauge(PREFIX + "endpoints", "Replicas of each pool known to this gateway, by readiness",
                               ["pool", "state"], registry=r)
        self.admission = AdmissionMetrics(PREFIX, r)
        self.circuit_state = Gauge(PREFIX + "endpoint_circuit_state",
                                   "Each replica's circuit breaker: 0 closed, 1 half-open (one probe call in flight), "
                                   "2 open (passed over after consecutive failures or timeouts)",
                                   ["pool", "endpoint"], registry=r)
        self.circuit_transitions = Counter(PREFIX + "endpoint_circuit_transitions",
                                           "Changes of a replica's circuit breaker, by the state entered",
                                           ["pool", "endpoint", "state"], registry=r)
        self._endpoint_labels: set[tuple[str, str]] = set()
        for path in ("reference", "inline"):
            self.embedding_bytes.labels(path)
        for kind in ("image", "frame"):
            self.media_bytes_sent.labels(kind)

    def _tenant_done(self, method: str, code: str, seconds: float) -> None:
        tenant = tenants.CURRENT.get()
        if tenant is not None:  # None: refused before it was named
            self.tenant_requests.labels(tenant.name, code).inc()
            self.tenant_request_seconds.labels(tenant.name).observe(seconds)

    def observe_pool(self, pool: EndpointPool) -> None:
        """Replica counts and per-replica calls in flight of `pool` (called on every change)."""
        ready = sum(e.ready for e in pool.endpoints.values())
        self.endpoints.labels(pool.name, "ready").set(ready)
        self.endpoints.labels(pool.name, "not_ready").set(len(pool.endpoints) - ready)
        labels = {(pool.name, address) for address in pool.endpoints}
        for gone in {lbl for lbl in self._endpoint_labels if lbl[0] == pool.name} - labels:
            self.endpoint_in_flight.remove(*gone)
            self.circuit_state.remove(*gone)
            self._endpoint_labels.discard(gone)
        for address, endpoint in pool.endpoints.items():
            self.endpoint_in_flight.labels(pool.name, address).set(endpoint.in_flight)
            if (pool.name, address) not in self._endpoint_labels:
                self.circuit_state.labels(pool.name, address).set(State.CLOSED)  # a new replica's breaker
        self._endpoint_labels |= labels

    def observe_circuit(self, pool: str, address: str, state: State) -> None:
        """A replica's circuit breaker entered `state`."""
        self.circuit_state.labels(pool, address).set(state)
        self.circuit_transitions.labels(pool, address, state.name.lower()).inc()

    async def track_tokens(self, method: str, events: AsyncGenerator, started: float | None = None) -> AsyncGenerator:
        """Passes `events` through, recording the time to the first token (from `started`, a `time.perf_counter()`;
        by default from when the first event is asked for) and the tokens generated."""
        started = time.perf_counter() if started is None else started
        first = True
        # Closed with this generator, so a caller that stops early cancels the services' calls at once.
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, Delta) and event.token_ids:
                    if first:
                        self.time_to_first_token.labels(method).observe(time.perf_counter() - started)
                        first = False
                    self.generated_tokens.labels(method).inc(len(event.token_ids))
                yield event
