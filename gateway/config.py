"""The gateway's settings: one frozen object, built once from the command line and passed down.

Environment variables are read here and nowhere else, and only when `from_args` runs (never at import time):
`INTERNVL_REDIS_URL` supplies `--redis-url` when the flag is absent, `INTERNVL_API_TOKEN` the bearer token when
`--api-token-file` is absent, and the `INTERNVL_TLS_*` / `INTERNVL_UPSTREAM_TLS_*` variables of
`services.runtime.tls` the certificate paths.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gateway.endpoints import parse_target
from gateway.remote_media import host_pattern_problem
from gateway.routing import Policy
from gateway.tenants import KeyDirectory, load_keys_file
from services.contract.cache_keys import DEFAULT_NAMESPACE
from services.contract.errors import InvalidArgumentError
from services.contract.priority import LABELS as PRIORITY_LABELS
from services.contract.sampling import SamplingLimits
from services.contract.tiling import DEFAULT_MAX_PIXELS
from services.runtime import flags
from services.runtime.flags import flag, flag_group
from services.runtime.grpc_server import ServerOptions
from services.runtime.redis_client import redis_url_problem
from services.runtime.tls import ClientTls, UpstreamTlsFlags

ENV_REDIS_URL = "INTERNVL_REDIS_URL"
ENV_API_TOKEN = "INTERNVL_API_TOKEN"
ROUTING_POLICIES = tuple(p.value for p in Policy)
DEFAULT_PORT = 50051


def _domain_list(text: str | None, environ: Mapping[str, str]) -> tuple[str, ...]:
    """The entries of a comma-separated `--allowed-media-domains`, stripped, empty ones dropped."""
    return tuple(entry.strip() for entry in (text or "").split(",") if entry.strip())


def _api_token(path: str | None, environ: Mapping[str, str]) -> str | None:
    """The token from `--api-token-file` (surrounding whitespace stripped), else `INTERNVL_API_TOKEN`, else None."""
    if path:
        try:
            token = Path(path).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidArgumentError(f"--api-token-file {path}: cannot read it ({exc})") from None
        if not token:
            raise InvalidArgumentError(f"--api-token-file {path} is empty")
        return token
    return environ.get(ENV_API_TOKEN, "").strip() or None


def _api_keys(path: str | None, environ: Mapping[str, str]) -> KeyDirectory | None:
    """The tenants of `--api-keys-file` (gateway.tenants), None without one."""
    return load_keys_file(path) if path else None


# Keyword-only, so that the fields (the flags) keep the order `--help` lists them in.
@dataclass(frozen=True, kw_only=True)
class GatewayConfig:
    """Everything `internvl-serve gateway` can be told, each field a flag. Validated on construction."""

    server: ServerOptions = flag_group(ServerOptions, default_factory=lambda: ServerOptions(port=DEFAULT_PORT),
                                       defaults={"port": DEFAULT_PORT})
    # OpenAI-compatible HTTP API port; None: no HTTP API.
    http_port: int | None = flag(None, "OpenAI-compatible HTTP API port (default: no HTTP API)")
    # gRPC targets of the two pools: `dns:///name:port` (a headless Service: every ready replica, re-resolved),
    # `ipv4:a:p,b:p` / `ipv6:[a]:p,...` lists, or one `host:port`. The gateway routes each call to one replica.
    vision_target: str = flag(help="vision service, e.g. dns:///vision-headless:50052 (Encode routed by content key)")
    llm_target: str = flag(help="LLM service, e.g. dns:///llm-headless:50053 or ipv4:10.0.0.5:50053,10.0.0.6:50053")
    # How Generate picks its LLM replica: `affinity` (by the conversation's prefix identity, with a load bound, so a
    # conversation keeps its prefix KV cache) or `round_robin` (the next ready replica).
    llm_routing: str = flag("affinity", "affinity: a conversation's turns go to the replica holding its prefix KV "
                                        "cache (load-bounded); round_robin: the next ready replica (default "
                                        "%(default)s)", choices=ROUTING_POLICIES)
    # The load bound of affinity routing (LLM Generate and vision Encode): a replica with more than ceil((1 + this) x
    # the pool's mean) + 1 calls in flight from this gateway is passed over for the key's next choice.
    routing_epsilon: float = flag(0.25, "load bound of affinity routing: a replica above (1 + this) x the mean calls "
                                        "in flight, plus one, is passed over (default %(default)s)")
    # Gray failures (see gateway.circuit): the longest one vision call attempt waits for its replica before going to
    # the next one, and each replica's circuit breaker.
    vision_attempt_timeout_s: float = flag(20.0, "seconds one vision call (Encode, Lookup, FetchEmbeddings) waits for "
                                                 "its replica before trying the next one (default %(default)s)")
    circuit_failure_threshold: int = flag(3, "consecutive failures or timeouts of calls to a replica that open its "
                                             "circuit breaker, so it is passed over (default %(default)s)")
    circuit_cooldown_s: float = flag(10.0, "seconds an open circuit breaker waits before one probe call may go to its "
                                           "replica (default %(default)s)")
    # Seconds between DNS lookups of the targets (also done at once after a call fails UNAVAILABLE).
    resolve_interval_s: float = flag(5.0, "seconds between DNS lookups of the targets (default %(default)s)")
    # Sessions; None: an in-process store (one gateway replica only, lost on restart).
    redis_url: str | None = flag(None, f"session store, e.g. redis://redis:6379/0 (default: ${ENV_REDIS_URL}; without "
                                       "either, sessions live in this process only)", env=ENV_REDIS_URL)
    session_ttl_s: int = flag(3600, "a session expires this long after its last turn (default %(default)s)")
    # Files a request may name by path must lie under this directory; None: paths are refused.
    media_root: str | None = flag(None, "directory whose files requests may name by path (default: paths refused)")
    # Largest image or video a request may carry or name (bytes).
    max_media_bytes: int = flag(64 * 1024 * 1024, "largest image or video per part (default %(default)s)")
    # Hosts whose http(s) image and video URLs the gateway fetches: exact names (`img.example.com`) or `*.example.com`
    # (any subdomain, not example.com itself). Empty: remote URLs are refused.
    allowed_media_domains: tuple[str, ...] = flag(
        (), "comma-separated hosts whose http(s) image and video URLs are fetched, e.g. "
            "'img.example.com,*.cdn.example.com' (*.d: any subdomain of d, not d itself; quote it in a shell); "
            "default: none, remote URLs are refused", convert=_domain_list)
    # Let remote media come from loopback, private, link-local and other non-public addresses (off: a caller's URL
    # cannot reach the gateway's own network, e.g. a cloud metadata endpoint).
    allow_private_media_addresses: bool = flag(
        False, "also fetch media from loopback, private, link-local and other non-public addresses (default: "
               "refused, so a URL cannot reach the gateway's own network)")
    # Seconds a media fetch may take to connect (DNS, TCP, TLS), and to receive the response and read its body.
    media_connect_timeout_s: float = flag(5.0, "seconds a media fetch may take to connect, DNS and TLS included "
                                               "(default %(default)s)")
    media_read_timeout_s: float = flag(30.0, "seconds a media fetch may wait for the response and read its body, "
                                             "per redirect hop (default %(default)s)")
    # Images and video frames with more pixels are refused before decoding (decompression-bomb guard).
    max_pixels: int = flag(DEFAULT_MAX_PIXELS, "largest image or frame in pixels (default %(default)s)")
    # Most frames one video may be sampled into (num_segments).
    max_video_frames: int = flag(64, "most frames sampled from one video (default %(default)s)")
    # Most image tiles (images, video frames and a session's earlier images together) one request may put in the
    # prompt, checked before anything is encoded. Each tile is 256 tokens: 128 tiles fill a 32k context.
    max_request_tiles: int = flag(128, "most image tiles one request may put in the prompt, refused before encoding "
                                       "(default %(default)s: 256 tokens each, a 32k context)")
    # Most images and videos (a video counts one, whatever its frames) one request may carry, history included, and
    # one conversation may hold (a session's earlier turns too): refused before any media is read or encoded.
    max_media_items: int = flag(32, "most images and videos one request may carry, its history included, refused "
                                    "before any media is read (default %(default)s)")
    max_conversation_media_items: int = flag(
        64, "most images and videos of a conversation, a session's earlier turns included, refused before any media "
            "is read (default %(default)s)")
    # Images per vision Encode call: a request's cache misses are grouped by the replica their keys prefer and split
    # into calls of at most this many, sent concurrently.
    encode_items_per_call: int = flag(4, "images per vision Encode call when fanning out (default %(default)s)")
    # Prefix of embedding cache keys (must equal the vision service's --namespace) and of session keys.
    namespace: str = flag(DEFAULT_NAMESPACE,
                          "cache key prefix, as the vision service's --namespace (default '%(default)s')")
    # Deadline given to the services when the caller set none (seconds).
    default_timeout_s: float = flag(600.0, "deadline for requests that set none (default %(default)s)")
    # Admission control (gateway.admission): chat requests worked on at once, the queue of those waiting for a slot,
    # how long a standard one may wait, and the priority of requests that name none (and whose tenant sets none).
    max_in_flight: int = flag(64, "chat requests worked on at once; beyond it they queue by priority (default "
                                  "%(default)s)")
    critical_reserve: int = flag(8, "of --max-in-flight, slots only critical requests may take, so they find one "
                                    "while the others fill the rest (default %(default)s)")
    max_queued: int = flag(256, "chat requests waiting for a slot at most; beyond it the least important are refused "
                                "(default %(default)s)")
    queue_wait_s: float = flag(30.0, "most seconds a standard request waits for a slot before it is refused "
                                     "UNAVAILABLE with Retry-After (critical ones wait up to their deadline; "
                                     "default %(default)s)")
    default_priority: str = flag("standard", "priority of requests that name none: critical, standard or sheddable "
                                             "(default %(default)s)", choices=PRIORITY_LABELS)
    # Threads for media work (file reads, base64, image probing, video decoding, key hashing).
    media_threads: int = flag(4, "threads reading and decoding media (default %(default)s)")
    # Bearer token every public call must carry (gRPC `authorization` metadata, HTTP Authorization header);
    # None: no authentication (e.g. behind an authenticating proxy). Health and metrics stay open.
    api_token: str | None = flag(
        None, f"file holding the bearer token every gRPC and HTTP call must carry (default: ${ENV_API_TOKEN}; "
              "without either, no authentication)", option="--api-token-file", convert=_api_token, repr=False)
    # Tenants: each key of this JSON file names its tenant, with the tenant's limits (gateway.tenants). Exclusive
    # with the single token. None: the token's tenant `default`, or with mutual TLS the client certificate's CN, or
    # everyone is `anonymous`.
    api_keys: KeyDirectory | None = flag(
        None, "JSON file mapping API keys to tenants and their limits (see the README's Tenants section); default: "
              "none (the --api-token-file token, else the client certificate's CN under mutual TLS, else no "
              "authentication)", option="--api-keys-file", type=str, convert=_api_keys, repr=False)
    # Off: the prefix KV cache and the LLM routing key are salted per tenant, so no tenant's time to first token
    # reveals another's prompts. On: tenants share prefixes (cheaper; for tenants that trust each other).
    shared_prefix_cache: bool = flag(False, "let tenants share the LLM's prefix KV cache (default: one scope per "
                                            "tenant, so a cache hit never reveals another tenant's prompt)")
    # Off: embedding keys are salted per tenant (each tenant encodes its own images; `usage.reused_tiles` and timing
    # reveal nothing of other tenants). On: one image is encoded once for all tenants.
    shared_embedding_cache: bool = flag(False, "let tenants share image embeddings (default: one key scope per "
                                               "tenant, so reused tiles never reveal another tenant's image)")
    # How much one request's sampling parameters may ask for (n, logit_bias, stop strings, constraint size),
    # checked before any media work (the LLM service checks its own again).
    sampling_limits: SamplingLimits = flag_group(SamplingLimits, title="request limits",
                                                 default_factory=SamplingLimits)
    # TLS (and mutual TLS) towards the vision and LLM services; None: plaintext.
    upstream_tls: ClientTls | None = flag_group(
        UpstreamTlsFlags, title="TLS to the vision and LLM services (default: plaintext)",
        build=UpstreamTlsFlags.load, default=None)

    def __post_init__(self) -> None:
        checks = [
            (bool(self.vision_target), "--vision-target is required"),
            (bool(self.llm_target), "--llm-target is required"),
            (self.llm_routing in ROUTING_POLICIES,
             f"--llm-routing must be one of {', '.join(ROUTING_POLICIES)}, got {self.llm_routing!r}"),
            (0 <= self.routing_epsilon < math.inf, f"--routing-epsilon must be >= 0, got {self.routing_epsilon}"),
            (0 < self.vision_attempt_timeout_s < math.inf,
             f"--vision-attempt-timeout-s must be > 0, got {self.vision_attempt_timeout_s}"),
            (self.circuit_failure_threshold >= 1,
             f"--circuit-failure-threshold must be >= 1, got {self.circuit_failure_threshold}"),
            (0 <= self.circuit_cooldown_s < math.inf,
             f"--circuit-cooldown-s must be >= 0, got {self.circuit_cooldown_s}"),
            (self.resolve_interval_s > 0, f"--resolve-interval-s must be > 0, got {self.resolve_interval_s}"),
            (self.session_ttl_s >= 1, f"--session-ttl-s must be >= 1, got {self.session_ttl_s}"),
            (self.max_media_bytes >= 1, f"--max-media-bytes must be >= 1, got {self.max_media_bytes}"),
            (0 < self.media_connect_timeout_s < math.inf,
             f"--media-connect-timeout-s must be > 0, got {self.media_connect_timeout_s}"),
            (0 < self.media_read_timeout_s < math.inf,
             f"--media-read-timeout-s must be > 0, got {self.media_read_timeout_s}"),
            (self.max_pixels >= 1, f"--max-pixels must be >= 1, got {self.max_pixels}"),
            (self.max_video_frames >= 1, f"--max-video-frames must be >= 1, got {self.max_video_frames}"),
            (self.max_request_tiles >= 1, f"--max-request-tiles must be >= 1, got {self.max_request_tiles}"),
            (self.max_media_items >= 1, f"--max-media-items must be >= 1, got {self.max_media_items}"),
            (self.max_conversation_media_items >= self.max_media_items,
             (f"--max-conversation-media-items ({self.max_conversation_media_items}) must be >= --max-media-items "
              f"({self.max_media_items})")),
            (self.encode_items_per_call >= 1,
             f"--encode-items-per-call must be >= 1, got {self.encode_items_per_call}"),
            (bool(self.namespace) and ":" not in self.namespace,
             f"--namespace must be non-empty and contain no ':', got {self.namespace!r}"),
            (self.default_timeout_s > 0, f"--default-timeout-s must be > 0, got {self.default_timeout_s}"),
            (self.max_in_flight >= 1, f"--max-in-flight must be >= 1, got {self.max_in_flight}"),
            (0 <= self.critical_reserve < self.max_in_flight,
             f"--critical-reserve must be >= 0 and below --max-in-flight, got {self.critical_reserve}"),
            (self.max_queued >= 0, f"--max-queued must be >= 0, got {self.max_queued}"),
            (0 < self.queue_wait_s < math.inf, f"--queue-wait-s must be > 0, got {self.queue_wait_s}"),
            (self.default_priority in PRIORITY_LABELS,
             f"--default-priority must be one of {', '.join(PRIORITY_LABELS)}, got {self.default_priority!r}"),
            (self.media_threads >= 1, f"--media-threads must be >= 1, got {self.media_threads}"),
            (self.media_root is None or os.path.isdir(self.media_root),
             f"--media-root {self.media_root!r} is not a directory"),
            (self.api_token is None or (len(self.api_token) >= 16 and self.api_token.isprintable()
                                        and " " not in self.api_token),
             "the API token must be at least 16 printable characters without spaces"),
            (self.api_keys is None or self.api_token is None,
             (f"--api-keys-file and --api-token-file (or ${ENV_API_TOKEN}) exclude each other: give the token to "
             f"a tenant in the key file instead")),
        ]
        checks += [(False, problem) for problem in self.sampling_limits.problems()]
        for ok, message in checks:
            if not ok:
                raise InvalidArgumentError(message)
        for pattern in self.allowed_media_domains:
            problem = host_pattern_problem(pattern)
            if problem:
                raise InvalidArgumentError(f"--allowed-media-domains: {problem}")
        url_problem = redis_url_problem(self.redis_url)
        if url_problem:
            raise InvalidArgumentError(f"--redis-url: {url_problem}")
        for option, target in (("--vision-target", self.vision_target), ("--llm-target", self.llm_target)):
            try:
                parse_target(target)
            except InvalidArgumentError as exc:
                raise InvalidArgumentError(f"{option}: {exc}") from None

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> GatewayConfig:
        return flags.from_args(cls, args, environ)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `internvl-serve gateway` flags, generated from `GatewayConfig`'s fields."""
    flags.add_flags(parser, GatewayConfig)
