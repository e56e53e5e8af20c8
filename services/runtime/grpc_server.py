"""Lifecycle shared by every gRPC server of the project: request metrics and error interceptors, message limits,
grpc.health.v1, reflection, a Prometheus `/metrics` port, and a graceful SIGTERM (NOT_SERVING, drain streams, stop).

Health: "" (liveness) is SERVING while the process runs; each service name (readiness) is NOT_SERVING until
`mark_ready()`, i.e. until the model is loaded and has run once, and again from the moment a drain starts.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
import prometheus_client
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.contract.errors import InvalidArgumentError
from services.runtime import tracing
from services.runtime.flags import flag, flag_group
from services.runtime.grpc_errors import ErrorMappingInterceptor
from services.runtime.ports import bind_error, check_bindable, write_port_file
from services.runtime.request_metrics import RequestMetrics, RequestMetricsInterceptor
from services.runtime.tls import ServerTls, ServerTlsFlags

log = logging.getLogger(__name__)

# Big enough for a 78B tile's embeddings in one chunk message (4 MiB) plus framing, small enough to bound memory.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def _port_help(default: int | None) -> str:
    return "gRPC port (0: any free port)" + ("" if default is None else f" (default {default})")


@dataclass(frozen=True)
class ServerOptions:
    """Transport settings common to the services (built once by each service's CLI; each field is a flag).

    `port` has no default: a service that has one gives it as the flag group's `defaults`, otherwise `--port` is
    required.
    """

    port: int = flag(help=_port_help)
    host: str = flag("0.0.0.0", "address to bind (default %(default)s)")
    metrics_port: int | None = flag(None, "Prometheus /metrics port (0: any free port; default: none)")
    max_message_bytes: int = flag(DEFAULT_MAX_MESSAGE_BYTES, "gRPC message size limit (default %(default)s)")
    # Seconds a draining server lets running calls finish after SIGTERM (keep below the pod's grace period).
    drain_seconds: float = flag(30.0, "grace period for running calls after SIGTERM (default %(default)s)")
    # Where to send traces (OTLP/gRPC, e.g. http://collector:4317); None: the OTEL_* environment decides (off unless
    # it names an exporter). See services.runtime.tracing.
    otlp_endpoint: str | None = flag(
        None, "send OpenTelemetry traces to this OTLP/gRPC collector (e.g. http://collector:4317); "
              "default: off unless the OTEL_* environment names an exporter")
    # None: plaintext. Otherwise TLS, and mutual TLS when it names a client CA (services.runtime.tls).
    tls: ServerTls | None = flag_group(ServerTlsFlags, title="TLS (default: plaintext)", build=ServerTlsFlags.load,
                                       default=None)
    # Where to report the ports bound (services.runtime.ports), for whoever started the process with port 0.
    port_file: str | None = flag(None, "once bound, write the ports (those given as 0 too) to this file as JSON: "
                                       '{"port": P, "metrics_port": M, ...}')

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.port <= 65535, f"--port must be in [0, 65535], got {self.port}"),
            (self.metrics_port is None or 0 <= self.metrics_port <= 65535,
             f"--metrics-port must be in [0, 65535], got {self.metrics_port}"),
            (self.max_message_bytes >= 1, f"--max-message-bytes must be >= 1, got {self.max_message_bytes}"),
            (self.drain_seconds >= 0, f"--drain-seconds must be >= 0, got {self.drain_seconds}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidArgumentError(message)


# Clients balance round-robin over the pods their DNS lookup returned, and gRPC re-resolves only when a connection
# closes. Ageing connections out (GOAWAY after 2 minutes) makes every client re-resolve, so new replicas get traffic;
# the grace outlasts the longest stream (the gateway's 300 s default deadline) so no stream is cut.
_CONNECTION_AGE = [("grpc.max_connection_age_ms", 120_000), ("grpc.max_connection_age_grace_ms", 330_000)]
# gRPC binds with SO_REUSEPORT by default, so a second server on a port silently shares it with the first (the kernel
# splits the connections between them); a port another process holds must be an error instead.
_EXCLUSIVE_PORT = [("grpc.so_reuseport", 0)]


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


class GrpcServer:
    """An aio server with the project's interceptors, health and reflection. `add` servicers, then `start`."""

    def __init__(self, options: ServerOptions, service_names: Sequence[str],
                 interceptors: Sequence[grpc.aio.ServerInterceptor] = (), *, requests: RequestMetrics):
        """`requests`: the service's request metrics (every call to `service_names` is recorded there).

        `interceptors` run between the two shared ones (e.g. the gateway's bearer-token check): the metrics wrap
        everything, so their refusals are counted, and the error mapping sees only the handlers' own errors.
        """
        self.options = options
        self.service_names = list(service_names)
        self.requests = requests
        # Tracing's span outermost, so that the request id and everything after it lands on the call's span.
        chain = [*tracing.server_interceptors(), RequestMetricsInterceptor(requests, self.service_names),
                 *interceptors, ErrorMappingInterceptor()]
        self.server = grpc.aio.server(interceptors=chain,
                                      options=[*channel_options(options.max_message_bytes), *_CONNECTION_AGE,
                                               *_EXCLUSIVE_PORT])
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], self.server)
        self.port: int | None = None
        self.metrics_port: int | None = None

    def add(self, register: Callable[[object, grpc.aio.Server], None], servicer: object) -> None:
        register(servicer, self.server)

    async def start(self, registry: prometheus_client.CollectorRegistry | None = None) -> int:
        """Binds (port 0 picks a free one), starts serving NOT_SERVING, returns the bound port (also `self.port`;
        the metrics server's in `self.metrics_port`). PortBindError when a port cannot be bound.

        `registry` is what `/metrics` exports (default: the request metrics' own); services keep their metrics in a
        registry of their own so that several can live in one test process.
        """
        registry = self.requests.registry if registry is None else registry
        # Liveness ("") is SERVING as soon as the process serves RPCs; readiness (the service names) only once the
        # model is loaded and warm, so a probe never kills a pod that is still loading weights.
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        for name in self.service_names:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        host, port = self.options.host, self.options.port
        check_bindable("--port", host, port)
        try:
            if self.options.tls is None:
                self.port = self.server.add_insecure_port(f"{host}:{port}")
            else:
                self.port = self.server.add_secure_port(f"{host}:{port}", self.options.tls.credentials())
        except RuntimeError as exc:  # gRPC's "Failed to bind to address ..."
            raise bind_error("--port", host, port) from exc
        if self.port == 0:  # how older gRPC releases said it
            raise bind_error("--port", host, port)
        if self.options.metrics_port is not None:
            try:
                metrics, _ = prometheus_client.start_http_server(self.options.metrics_port, addr=host,
                                                                 registry=registry)
            except OSError as exc:
                raise bind_error("--metrics-port", host, self.options.metrics_port, exc) from None
            self.metrics_port = metrics.server_port
        await self.server.start()
        tls = "plaintext" if self.options.tls is None else (
            "mutual TLS" if self.options.tls.client_ca is not None else "TLS")
        log.info("listening on %s:%d, %s (metrics on %s)", host, self.port, tls, self.metrics_port)
        return self.port

    def report_ports(self, **others: int) -> None:
        """Writes the bound ports, and `others` the process bound besides (the gateway's HTTP port), to
        `--port-file` if given; call once everything is bound."""
        if self.options.port_file is not None:
            ports = {"port": self.port, **({} if self.metrics_port is None else {"metrics_port": self.metrics_port})}
            write_port_file(self.options.port_file, {**ports, **others})

    async def mark_ready(self) -> None:
        for name in self.service_names:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("ready: %s", ", ".join(self.service_names))

    async def mark_not_ready(self) -> None:
        """Readiness NOT_SERVING (liveness stays SERVING): the process is fine but cannot serve right now."""
        for name in self.service_names:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def serve_until_signalled(self) -> None:
        """Runs until SIGTERM/SIGINT, then drains: NOT_SERVING at once, calls get `drain_seconds` to finish."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        server_done = asyncio.ensure_future(self.server.wait_for_termination())
        signalled = asyncio.ensure_future(stop.wait())
        await asyncio.wait({server_done, signalled}, return_when=asyncio.FIRST_COMPLETED)
        await self.stop()
        server_done.cancel()
        signalled.cancel()

    async def stop(self) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.options.drain_seconds)
