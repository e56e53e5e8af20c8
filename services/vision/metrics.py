"""Prometheus metrics of the vision service, in a registry of its own (exported by GrpcServer on /metrics).

Counters the core keeps as plain integers (the cache's bytes written, corrupt values) are read at scrape time
through a small collector, so the cache needs no knowledge of Prometheus.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from services.runtime.request_metrics import RequestMetrics
from services.vision.batcher import BatchStats

PREFIX = "internvl_vision_"

# Tiles per forward: 1 (a lone small image) up to a few hundred (large GPU batches).
_BATCH_TILE_BUCKETS = (1, 2, 4, 8, 13, 16, 24, 32, 48, 64, 96, 128, 256, 512)
_BATCH_REQUEST_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)
_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _CallbackCounters(Collector):
    """Counters whose values are read from callables when scraped."""

    def __init__(self) -> None:
        self._sources: list[tuple[str, str, Callable[[], float]]] = []

    def add(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self._sources.append((name, documentation, read))

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, documentation, read in self._sources:
            yield CounterMetricFamily(name, documentation, value=read())


class VisionMetrics:
    """Every metric the vision service exports. One instance per service (and per test)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.tiles_encoded = Counter(PREFIX + "tiles_encoded", "Tiles run through the vision encoder (the start-up warm-up tile included)", registry=r)
        self.batches = Counter(PREFIX + "batches", "Encoder forwards (micro-batches) run", registry=r)
        self.batch_tiles = Histogram(PREFIX + "batch_tiles", "Tiles per encoder forward",
                                     buckets=_BATCH_TILE_BUCKETS, registry=r)
        self.batch_requests = Histogram(PREFIX + "batch_requests", "Distinct requests whose tiles shared a forward",
                                        buckets=_BATCH_REQUEST_BUCKETS, registry=r)
        self.encode_seconds = Histogram(PREFIX + "encode_seconds", "Wall time of one encoder forward",
                                        buckets=_SECONDS_BUCKETS, registry=r)
        self.queue_tiles = Gauge(PREFIX + "queue_tiles", "Tiles waiting for the encoder (queue depth)", registry=r)
        self.cache_hits = Counter(PREFIX + "cache_hits", "Encode items answered from the cache", registry=r)
        self.cache_misses = Counter(PREFIX + "cache_misses", "Encode items that had to be encoded", registry=r)
        # requests{method,code}, request_seconds{method}, in_flight_requests{method}: recorded by the server.
        self.requests = RequestMetrics(PREFIX, r)
        self.model_info = Gauge(PREFIX + "model_info", "The loaded model (always 1)",
                                ["fingerprint", "model_name", "dtype"], registry=r)
        self._callbacks = _CallbackCounters()
        r.register(self._callbacks)

    def observe_batch(self, stats: BatchStats) -> None:
        self.tiles_encoded.inc(stats.tiles)
        self.batches.inc()
        self.batch_tiles.observe(stats.tiles)
        self.batch_requests.observe(stats.requests)
        self.encode_seconds.observe(stats.seconds)

    def observe_item(self, hit: bool) -> None:
        (self.cache_hits if hit else self.cache_misses).inc()

    def watch_queue(self, read: Callable[[], int], cancelled: Callable[[], int]) -> None:
        """The queue depth, and the queued tiles dropped unencoded because their caller cancelled."""
        self.queue_tiles.set_function(read)
        self._callbacks.add(PREFIX + "tiles_cancelled", "Queued tiles dropped before the encoder ran them because "
                            "their request was cancelled (the client went away or its deadline passed)", cancelled)

    def watch_cache(self, bytes_written: Callable[[], int], corrupt: Callable[[], int]) -> None:
        self._callbacks.add(PREFIX + "cache_written_bytes", "Bytes of values written to the embedding cache",
                            bytes_written)
        self._callbacks.add(PREFIX + "cache_corrupt_values",
                            "Cached values rejected as corrupt or from another model (each re-encoded)", corrupt)

    def set_model(self, fingerprint: str, model_name: str, dtype: str) -> None:
        self.model_info.labels(fingerprint, model_name, dtype).set(1)
