"""Prometheus metrics of the gateway (`internvl_gateway_*`), in a registry of its own exported on /metrics.

Both transports (gRPC and the OpenAI-compatible HTTP API) count requests through `track_stream` / `track`, labelled
by `rpc` (`Chat`, `BatchChat`, `openai.chat_completions`) and the gRPC status code name the call ended with. The
orchestrator reports the cache side: tiles encoded vs reused (hit ratio = reused / (encoded + reused)), image bytes
sent to the vision pool (misses only), and embedding bytes moved, by reference (read by the LLM from the cache) or
inline (through the gateway, combined multi-image mode only).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.errors import grpc_status_name
from gateway.types import Delta, Finish
from services.common.grpc_errors import status_for

PREFIX = "internvl_gateway_"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def status_name(exc: BaseException) -> str:
    """The gRPC status code name a call failing with `exc` ends with."""
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "CANCELLED"
    return grpc_status_name(exc) or status_for(exc)[0].name


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(PREFIX + "requests", "Requests by RPC and final gRPC status code", ["rpc", "code"],
                                registry=r)
        self.in_flight = Gauge(PREFIX + "in_flight_requests", "Requests being answered now", ["rpc"], registry=r)
        self.time_to_first_token = Histogram(PREFIX + "time_to_first_token_seconds",
                                             "From request arrival to the first generated token", ["rpc"],
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.request_seconds = Histogram(PREFIX + "request_seconds", "End-to-end latency of a request", ["rpc"],
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.generated_tokens = Counter(PREFIX + "generated_tokens", "Tokens streamed back to callers", ["rpc"],
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
                                       "Generate calls retried after re-encoding evicted embeddings", registry=r)
        self.upstream_retries = Counter(PREFIX + "upstream_retries",
                                        "Calls to the vision or LLM pool tried again after failing UNAVAILABLE "
                                        "(a replica died, drained or lost Redis)", ["service", "method"], registry=r)
        self.sessions = Counter(PREFIX + "sessions", "Session rounds by whether they started or continued a session",
                                ["event"], registry=r)
        for path in ("reference", "inline"):
            self.embedding_bytes.labels(path)
        for kind in ("image", "frame"):
            self.media_bytes_sent.labels(kind)

    async def track_stream(self, rpc: str, events: AsyncIterator) -> AsyncIterator:
        """Passes `events` through, recording the request, its time to first token, its tokens and its latency."""
        started = time.perf_counter()
        first, finished = True, False
        code = "OK"
        self.in_flight.labels(rpc).inc()
        try:
            async for event in events:
                if isinstance(event, Delta) and event.token_ids:
                    if first:
                        self.time_to_first_token.labels(rpc).observe(time.perf_counter() - started)
                        first = False
                    self.generated_tokens.labels(rpc).inc(len(event.token_ids))
                finished = isinstance(event, Finish)
                yield event
        except GeneratorExit:
            # Closed by the consumer: after the finish that is a normal end, before it a cancellation.
            code = "OK" if finished else "CANCELLED"
            raise
        except BaseException as exc:
            code = status_name(exc)
            raise
        finally:
            self.in_flight.labels(rpc).dec()
            self.requests.labels(rpc, code).inc()
            self.request_seconds.labels(rpc).observe(time.perf_counter() - started)

    @contextlib.contextmanager
    def track(self, rpc: str) -> Iterator[None]:
        """Records a unary request: count by status, latency, in-flight."""
        started = time.perf_counter()
        code = "OK"
        self.in_flight.labels(rpc).inc()
        try:
            yield
        except BaseException as exc:
            code = status_name(exc)
            raise
        finally:
            self.in_flight.labels(rpc).dec()
            self.requests.labels(rpc, code).inc()
            self.request_seconds.labels(rpc).observe(time.perf_counter() - started)
