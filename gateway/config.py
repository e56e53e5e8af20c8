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
from dataclasses import dataclass, field
from pathlib import Path

from gateway.endpoints import parse_target
from gateway.remote_media import host_pattern_problem
from gateway.routing import Policy
from services.contract.cache_keys import DEFAULT_NAMESPACE
from services.contract.errors import InvalidArgumentError
from services.contract.tiling import DEFAULT_MAX_PIXELS
from services.runtime.grpc_server import ServerOptions, add_server_options
from services.runtime.redis_client import redis_url_problem
from services.runtime.tls import (
    ClientTls,
    add_upstream_arguments,
    upstream_tls_from_args,
)

ENV_REDIS_URL = "INTERNVL_REDIS_URL"
ENV_API_TOKEN = "INTERNVL_API_TOKEN"
ROUTING_POLICIES = tuple(p.value for p in Policy)
DEFAULT_PORT = 50051


@dataclass(frozen=True)
class GatewayConfig:
    """Everything `internvl-serve gateway` can be told. Validated on construction."""

    # gRPC targets of the two pools: `dns:///name:port` (a headless Service: every ready replica, re-resolved),
    # `ipv4:a:p,b:p` / `ipv6:[a]:p,...` lists, or one `host:port`. The gateway routes each call to one replica.
    vision_target: str
    llm_target: str
    # How Generate picks its LLM replica: `affinity` (by the conversation's prefix identity, with a load bound, so a
    # conversation keeps its prefix KV cache) or `round_robin` (the next ready replica).
    llm_routing: str = "affinity"
    # The load bound of affinity routing (LLM Generate and vision Encode): a replica with more than ceil((1 + this) x
    # the pool's mean) + 1 calls in flight from this gateway is passed over for the key's next choice.
    routing_epsilon: float = 0.25
    # Seconds between DNS lookups of the targets (also done at once after a call fails UNAVAILABLE).
    resolve_interval_s: float = 5.0
    server: ServerOptions = field(default_factory=lambda: ServerOptions(port=DEFAULT_PORT))
    # OpenAI-compatible HTTP API port; None: no HTTP API.
    http_port: int | None = None
    # Sessions; None: an in-process store (one gateway replica only, lost on restart).
    redis_url: str | None = None
    session_ttl_s: int = 3600
    # Files a request may name by path must lie under this directory; None: paths are refused.
    media_root: str | None = None
    # Largest image or video a request may carry or name (bytes).
    max_media_bytes: int = 64 * 1024 * 1024
    # Hosts whose http(s) image and video URLs the gateway fetches: exact names (`img.example.com`) or `*.example.com`
    # (any subdomain, not example.com itself). Empty: remote URLs are refused.
    allowed_media_domains: tuple[str, ...] = ()
    # Let remote media come from loopback, private, link-local and other non-public addresses (off: a caller's URL
    # cannot reach the gateway's own network, e.g. a cloud metadata endpoint).
    allow_private_media_addresses: bool = False
    # Seconds a media fetch may take to connect (DNS, TCP, TLS), and to receive the response and read its body.
    media_connect_timeout_s: float = 5.0
    media_read_timeout_s: float = 30.0
    # Images and video frames with more pixels are refused before decoding (decompression-bomb guard).
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Most frames one video may be sampled into (num_segments).
    max_video_frames: int = 64
    # Most image tiles (images, video frames and a session's earlier images together) one request may put in the
    # prompt, checked before anything is encoded. Each tile is 256 tokens: 128 tiles fill a 32k context.
    max_request_tiles: int = 128
    # Images per vision Encode call: a request's cache misses are grouped by the replica their keys prefer and split
    # into calls of at most this many, sent concurrently.
    encode_items_per_call: int = 4
    # Prefix of embedding cache keys (must equal the vision service's --namespace) and of session keys.
    namespace: str = DEFAULT_NAMESPACE
    # Deadline given to the services when the caller set none (seconds).
    default_timeout_s: float = 600.0
    # Threads for media work (file reads, base64, image probing, video decoding, key hashing).
    media_threads: int = 4
    # TLS (and mutual TLS) towards the vision and LLM services; None: plaintext.
    upstream_tls: ClientTls | None = None
    # Bearer token every public call must carry (gRPC `authorization` metadata, HTTP Authorization header);
    # None: no authentication (e.g. behind an authenticating proxy). Health and metrics stay open.
    api_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        checks = [
            (bool(self.vision_target), "--vision-target is required"),
            (bool(self.llm_target), "--llm-target is required"),
            (self.llm_routing in ROUTING_POLICIES,
             f"--llm-routing must be one of {', '.join(ROUTING_POLICIES)}, got {self.llm_routing!r}"),
            (0 <= self.routing_epsilon < math.inf, f"--routing-epsilon must be >= 0, got {self.routing_epsilon}"),
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
            (self.encode_items_per_call >= 1,
             f"--encode-items-per-call must be >= 1, got {self.encode_items_per_call}"),
            (bool(self.namespace) and ":" not in self.namespace,
             f"--namespace must be non-empty and contain no ':', got {self.namespace!r}"),
            (self.default_timeout_s > 0, f"--default-timeout-s must be > 0, got {self.default_timeout_s}"),
            (self.media_threads >= 1, f"--media-threads must be >= 1, got {self.media_threads}"),
            (self.media_root is None or os.path.isdir(self.media_root),
             f"--media-root {self.media_root!r} is not a directory"),
            (self.api_token is None or (len(self.api_token) >= 16 and self.api_token.isprintable()
                                        and " " not in self.api_token),
             "the API token must be at least 16 printable characters without spaces"),
        ]
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
        for flag, target in (("--vision-target", self.vision_target), ("--llm-target", self.llm_target)):
            try:
                parse_target(target)
            except InvalidArgumentError as exc:
                raise InvalidArgumentError(f"{flag}: {exc}") from None

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> GatewayConfig:
        environ = os.environ if environ is None else environ
        return cls(
            vision_target=args.vision_target,
            llm_target=args.llm_target,
            llm_routing=args.llm_routing,
            routing_epsilon=args.routing_epsilon,
            resolve_interval_s=args.resolve_interval_s,
            server=ServerOptions.from_args(args, environ),
            http_port=args.http_port,
            redis_url=args.redis_url or environ.get(ENV_REDIS_URL) or None,
            session_ttl_s=args.session_ttl_s,
            media_root=args.media_root,
            max_media_bytes=args.max_media_bytes,
            allowed_media_domains=_domain_list(args.allowed_media_domains),
            allow_private_media_addresses=args.allow_private_media_addresses,
            media_connect_timeout_s=args.media_connect_timeout_s,
            media_read_timeout_s=args.media_read_timeout_s,
            max_pixels=args.max_pixels,
            max_video_frames=args.max_video_frames,
            max_request_tiles=args.max_request_tiles,
            encode_items_per_call=args.encode_items_per_call,
            namespace=args.namespace,
            default_timeout_s=args.default_timeout_s,
            media_threads=args.media_threads,
            upstream_tls=upstream_tls_from_args(args, environ),
            api_token=_api_token(getattr(args, "api_token_file", None), environ),
        )


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


def _domain_list(text: str | None) -> tuple[str, ...]:
    """The entries of a comma-separated `--allowed-media-domains`, stripped, empty ones dropped."""
    return tuple(entry.strip() for entry in (text or "").split(",") if entry.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `internvl-serve gateway` flags; defaults come from `GatewayConfig`."""
    d = GatewayConfig(vision_target="127.0.0.1:1", llm_target="127.0.0.1:1")
    add_server_options(parser, default_port=DEFAULT_PORT)
    parser.add_argument("--http-port", type=int, default=None,
                        help="OpenAI-compatible HTTP API port (default: no HTTP API)")
    parser.add_argument("--vision-target", required=True,
                        help="vision service, e.g. dns:///vision-headless:50052 (Encode routed by content key)")
    parser.add_argument("--llm-target", required=True,
                        help="LLM service, e.g. dns:///llm-headless:50053 or ipv4:10.0.0.5:50053,10.0.0.6:50053")
    parser.add_argument("--llm-routing", choices=ROUTING_POLICIES, default=d.llm_routing,
                        help="affinity: a conversation's turns go to the replica holding its prefix KV cache "
                             f"(load-bounded); round_robin: the next ready replica (default {d.llm_routing})")
    parser.add_argument("--routing-epsilon", type=float, default=d.routing_epsilon,
                        help="load bound of affinity routing: a replica above (1 + this) x the mean calls in flight, plus one, "
                             f"is passed over (default {d.routing_epsilon})")
    parser.add_argument("--resolve-interval-s", type=float, default=d.resolve_interval_s,
                        help=f"seconds between DNS lookups of the targets (default {d.resolve_interval_s})")
    parser.add_argument("--redis-url", default=None,
                        help=f"session store, e.g. redis://redis:6379/0 (default: ${ENV_REDIS_URL}; without either, "
                             "sessions live in this process only)")
    parser.add_argument("--session-ttl-s", type=int, default=d.session_ttl_s,
                        help=f"a session expires this long after its last turn (default {d.session_ttl_s})")
    parser.add_argument("--media-root", default=None,
                        help="directory whose files requests may name by path (default: paths refused)")
    parser.add_argument("--max-media-bytes", type=int, default=d.max_media_bytes,
                        help=f"largest image or video per part (default {d.max_media_bytes})")
    parser.add_argument("--allowed-media-domains", default="",
                        help="comma-separated hosts whose http(s) image and video URLs are fetched, e.g. "
                             "'img.example.com,*.cdn.example.com' (*.d: any subdomain of d, not d itself; quote it "
                             "in a shell); default: none, remote URLs are refused")
    parser.add_argument("--allow-private-media-addresses", action="store_true",
                        help="also fetch media from loopback, private, link-local and other non-public addresses "
                             "(default: refused, so a URL cannot reach the gateway's own network)")
    parser.add_argument("--media-connect-timeout-s", type=float, default=d.media_connect_timeout_s,
                        help="seconds a media fetch may take to connect, DNS and TLS included "
                             f"(default {d.media_connect_timeout_s})")
    parser.add_argument("--media-read-timeout-s", type=float, default=d.media_read_timeout_s,
                        help="seconds a media fetch may wait for the response and read its body, per redirect hop "
                             f"(default {d.media_read_timeout_s})")
    parser.add_argument("--max-pixels", type=int, default=d.max_pixels,
                        help=f"largest image or frame in pixels (default {d.max_pixels})")
    parser.add_argument("--max-video-frames", type=int, default=d.max_video_frames,
                        help=f"most frames sampled from one video (default {d.max_video_frames})")
    parser.add_argument("--max-request-tiles", type=int, default=d.max_request_tiles,
                        help="most image tiles one request may put in the prompt, refused before encoding "
                             f"(default {d.max_request_tiles}: 256 tokens each, a 32k context)")
    parser.add_argument("--encode-items-per-call", type=int, default=d.encode_items_per_call,
                        help=f"images per vision Encode call when fanning out (default {d.encode_items_per_call})")
    parser.add_argument("--namespace", default=d.namespace,
                        help=f"cache key prefix, as the vision service's --namespace (default {d.namespace!r})")
    parser.add_argument("--default-timeout-s", type=float, default=d.default_timeout_s,
                        help=f"deadline for requests that set none (default {d.default_timeout_s})")
    parser.add_argument("--media-threads", type=int, default=d.media_threads,
                        help=f"threads reading and decoding media (default {d.media_threads})")
    parser.add_argument("--api-token-file", default=None,
                        help="file holding the bearer token every gRPC and HTTP call must carry (default: "
                             f"${ENV_API_TOKEN}; without either, no authentication)")
    add_upstream_arguments(parser)
