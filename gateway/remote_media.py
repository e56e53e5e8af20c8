"""Remote media: the gateway fetches `http(s)://` image and video URLs, only from hosts it is told to trust.

A request's remote URLs are fetched before media resolution (`RemoteMedia.resolve_urls`), on the gateway's event loop
with aiohttp's client, and replaced by the bytes they returned; everything after (probing, decoding, the embedding
cache key) then sees only bytes, so the cache key covers what was fetched, never the URL.

A URL a caller sends makes the gateway open a connection, so every rule here guards against server-side request
forgery and resource exhaustion:

* only `http` and `https`, no credentials in the URL, and the host must match `--allowed-media-domains` (empty: no
  remote fetching at all);
* unless `--allow-private-media-addresses`, every address the host resolves to (or a literal IP host) must be a
  public unicast address: loopback, private, link-local (cloud metadata), CGNAT, multicast, reserved addresses and
  IPv6 forms embedding them are refused. The check lives in the connector's resolver, so the connection goes to the
  very addresses that were checked (a second DNS answer cannot rebind the host between check and connect);
* redirects are followed by hand, at most `MAX_REDIRECTS`, each hop checked like the first URL;
* the body is read in chunks and refused as soon as it passes `--max-media-bytes`, and the connect and read phases
  have their own timeouts.

Every refusal is a domain error whose message names the content part (`where`) and the rule, with the flag that
changes it where there is one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import os
import re
import socket
from collections.abc import Awaitable, Iterable
from typing import TYPE_CHECKING

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from gateway.chat_request import ChatRequest, ContentPart
from services.contract.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    InvalidMediaError,
    MediaAccessError,
)
from services.runtime import tracing

if TYPE_CHECKING:
    from gateway.config import GatewayConfig

MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
READ_CHUNK_BYTES = 64 * 1024
# Longest URL quoted back in a message (signed URLs can be kilobytes long).
SHOWN_URL_CHARS = 200

DISABLED_MESSAGE = ("remote URLs are not fetched; send a base64 data: URL, the bytes, or a path under the gateway's "
                    "media root (a gateway started with --allowed-media-domains fetches http(s) URLs from those hosts)")

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?")
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def is_remote_url(url: str | None) -> bool:
    """Whether `url` is one this module fetches (http or https, in any letter case)."""
    return url is not None and url[:8].lower().startswith(("http://", "https://"))


# ------------------------------------------------------------------------------------------------ allowlist


def normalize_host(host: str) -> str:
    """The form hosts and patterns are compared in: lower case, IDNA (`xn--`), no trailing dot; IP addresses in
    their canonical form, without brackets."""
    host = host.strip().removeprefix("[").removesuffix("]").rstrip(".").lower()
    literal = _ip_literal(host)
    if literal is not None:
        return literal  # one spelling per address: "0:0::1" and "::1" are the same host
    if not host.isascii():
        try:
            host = URL.build(scheme="http", host=host).raw_host or host
        except (ValueError, UnicodeError):
            pass  # left as is: host_pattern_problem reports it, and it matches no URL's host
    return host


def host_pattern_problem(pattern: str) -> str | None:
    """Why `pattern` is not a valid --allowed-media-domains entry, or None.

    Valid: a host name (`img.example.com`), an IP address (`10.0.0.5`, `::1`), or `*.` and a domain with at least
    one dot-free label (`*.example.com`).
    """
    wildcard, name = _split_pattern(pattern)
    if not name:
        return f"{pattern!r} names no host"
    if "*" in name:
        return f"{pattern!r}: '*' is only allowed as a leading '*.' (e.g. *.example.com)"
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        return f"{pattern!r}: an IP address cannot take a '*.' wildcard" if wildcard else None
    if any(c in name for c in "/:@?#"):
        return f"{pattern!r}: give a host name only, without scheme, port, path or credentials"
    if not all(_LABEL.fullmatch(label) for label in name.split(".")):
        return f"{pattern!r} is not a valid host name"
    return None


def _split_pattern(pattern: str) -> tuple[bool, str]:
    """(whether `pattern` is a `*.` wildcard, its host part normalized)."""
    pattern = pattern.strip()
    wildcard = pattern.startswith("*.")
    return wildcard, normalize_host(pattern[2:] if wildcard else pattern)


class HostAllowlist:
    """Host patterns: exact names, or `*.example.com` for any subdomain of example.com (not example.com itself)."""

    def __init__(self, patterns: Iterable[str]):
        split = [_split_pattern(p) for p in patterns]
        self.exact = frozenset(name for wildcard, name in split if name and not wildcard)
        # Kept with a leading dot, so "*.example.com" cannot match "badexample.com".
        self.suffixes = tuple("." + name for wildcard, name in split if name and wildcard)

    def __bool__(self) -> bool:
        return bool(self.exact or self.suffixes)

    def allows(self, host: str) -> bool:
        host = normalize_host(host)
        return host in self.exact or any(host.endswith(s) and len(host) > len(s) for s in self.suffixes)


# ------------------------------------------------------------------------------------- private-address guard


def address_problem(address: str) -> str | None:
    """What kind of non-public address `address` is ("loopback", "private", ...), or None for a public one."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        # IPv6 forms that carry an IPv4 address reach that address (directly, or through a 6to4 / NAT64 relay).
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            inner = address_problem(str(embedded))
            return f"{inner} (embedded in IPv6)" if inner else None
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.version == 4 and ip in _CGNAT:
        return "carrier-grade NAT"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:
        return "non-global"
    return None


class BlockedAddressError(OSError):
    """A host resolved to a non-public address. An OSError, so aiohttp reports it as the DNS failure it wraps."""

    def __init__(self, host: str, address: str, kind: str):
        super().__init__(f"{host} resolves to {address} ({kind})")
        self.host, self.address, self.kind = host, address, kind


class PublicAddressResolver(AbstractResolver):
    """Resolves like aiohttp's threaded resolver, and refuses a host if any of its addresses is not public.

    The connector connects to exactly the addresses returned here, which is what makes the check hold: no second
    lookup happens between the check and the connection. aiohttp calls no resolver for literal IP hosts; those are
    checked by `RemoteMedia` before the request.
    """

    def __init__(self, inner: AbstractResolver | None = None):
        self._inner = inner if inner is not None else aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            kind = address_problem(result["host"])
            if kind is not None:
                raise BlockedAddressError(host, result["host"], kind)
        return results

    async def close(self) -> None:
        await self._inner.close()


# --------------------------------------------------------------------------------------------------- fetcher


class RemoteMedia:
    """Fetches remote media URLs under the gateway's allowlist, address guard, size limit and timeouts."""

    def __init__(self, allowed_media_domains: Iterable[str] = (), *, max_media_bytes: int,
                 allow_private_media_addresses: bool = False, media_connect_timeout_s: float = 5.0,
                 media_read_timeout_s: float = 30.0, max_redirects: int = MAX_REDIRECTS):
        self.allowlist = HostAllowlist(allowed_media_domains)
        self.max_media_bytes = max_media_bytes
        self.allow_private_addresses = allow_private_media_addresses
        self.connect_timeout_s = media_connect_timeout_s
        self.read_timeout_s = media_read_timeout_s
        self.max_redirects = max_redirects
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_config(cls, config: GatewayConfig) -> RemoteMedia:
        return cls(config.allowed_media_domains, max_media_bytes=config.max_media_bytes,
                   allow_private_media_addresses=config.allow_private_media_addresses,
                   media_connect_timeout_s=config.media_connect_timeout_s,
                   media_read_timeout_s=config.media_read_timeout_s)

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    # ------------------------------------------------------------------------------------------- requests

    async def resolve_urls(self, request: ChatRequest) -> ChatRequest:
        """`request` with every remote image and video URL (new content and caller history) replaced by its bytes.

        The fetches run concurrently; the first refusal fails the request and cancels the others. Parts that are not
        remote URLs (bytes, paths, data: URLs) are left exactly as they were.
        """
        turns = [(f"history[{n}].user_content", turn.user) for n, turn in enumerate(request.history)]
        turns.append(("content", request.content))
        fetches: dict[tuple[int, int], Awaitable[bytes]] = {}
        for t, (prefix, parts) in enumerate(turns):
            for i, part in enumerate(parts):
                media, kind = (part.image, "image") if part.image is not None else (part.video, "video")
                if media is not None and is_remote_url(media.url):
                    fetches[t, i] = self.fetch(media.url, f"{prefix}[{i}] ({kind})")
        if not fetches:
            return request
        with tracing.tracer().start_as_current_span("media.fetch") as span:
            fetched = dict(zip(fetches, await _gather_or_cancel(fetches.values())))
            tracing.set_attributes({"internvl.urls": len(fetched),
                                    "internvl.bytes": sum(map(len, fetched.values()))}, span)

        def with_bytes(t: int, parts: tuple[ContentPart, ...]) -> tuple[ContentPart, ...]:
            return tuple(_part_with_data(part, fetched[t, i]) if (t, i) in fetched else part
                         for i, part in enumerate(parts))

        history = tuple(dataclasses.replace(turn, user=with_bytes(t, turn.user))
                        for t, turn in enumerate(request.history))
        return dataclasses.replace(request, history=history, content=with_bytes(len(history), request.content))

    async def fetch(self, url: str, where: str) -> bytes:
        """The body of `url`, following redirects; a domain error naming `where` and the rule for any refusal."""
        current = self._checked_url(url, where, via="")
        session = self._client()
        for _ in range(self.max_redirects + 1):
            try:
                async with session.get(current, allow_redirects=False) as response:
                    if response.status in REDIRECT_STATUSES:
                        current = self._redirect_target(response, current, where)
                        continue
                    if not 200 <= response.status < 300:
                        raise InvalidMediaError(f"{where}: fetching {_shown(current)} returned HTTP "
                                                f"{response.status}")
                    return await self._read_body(response, current, where)
            except aiohttp.ClientConnectorDNSError as exc:
                blocked = exc.os_error if isinstance(exc.os_error, BlockedAddressError) else exc.__cause__
                if isinstance(blocked, BlockedAddressError):
                    raise _private_address_error(where, blocked.host, blocked.address, blocked.kind) from None
                raise InvalidMediaError(f"{where}: cannot fetch {_shown(current)}: cannot resolve host "
                                        f"{current.raw_host!r}") from None
            except aiohttp.ConnectionTimeoutError:
                raise DeadlineExceededError(
                    f"{where}: cannot fetch {_shown(current)}: no connection within the connect timeout of "
                    f"{self.connect_timeout_s} s (--media-connect-timeout-s)") from None
            except TimeoutError:  # aiohttp's read timeout (waiting for the response) or ours (the whole body)
                raise DeadlineExceededError(
                    f"{where}: cannot fetch {_shown(current)}: the response took longer than the read timeout of "
                    f"{self.read_timeout_s} s (--media-read-timeout-s)") from None
            except aiohttp.ClientError as exc:
                raise InvalidMediaError(f"{where}: cannot fetch {_shown(current)}: {_reason(exc)}") from None
        raise InvalidMediaError(f"{where}: fetching {_shown(url)} was redirected more than {self.max_redirects} "
                                "times")

    # ------------------------------------------------------------------------------------------ internals

    def _client(self) -> aiohttp.ClientSession:
        """The one client session, created on first use so that it belongs to the running loop."""
        if self._session is None or self._session.closed:
            resolver = None if self.allow_private_addresses else PublicAddressResolver()
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=resolver),
                # `connect` covers DNS, TCP and TLS; `sock_read` bounds the wait for the response head (the body
                # has its own total deadline in _read_body).
                timeout=aiohttp.ClientTimeout(total=None, connect=self.connect_timeout_s,
                                              sock_read=self.read_timeout_s),
                # Fetches run for different callers: no cookies may carry over from one to another.
                cookie_jar=aiohttp.DummyCookieJar(),
                # An environment proxy would resolve and connect by itself, past the address guard.
                trust_env=False,
                # Identity encoding makes Content-Length the body's real size, checked before reading.
                headers={"Accept-Encoding": "identity", "User-Agent": "internvl-gateway"},
            )
        return self._session

    def _checked_url(self, url: str | URL, where: str, via: str) -> URL:
        """`url` parsed, if the scheme, credentials, allowlist and (for an IP literal host) the guard allow it.

        `via` is "" for the caller's URL and " (redirected from ...)" for a redirect hop.
        """
        if not self.allowlist:  # fetching is off: that is the one thing worth telling, whatever the URL
            raise InvalidArgumentError(f"{where}: {DISABLED_MESSAGE}")
        try:
            parsed = url if isinstance(url, URL) else URL(url)
            parsed.port  # noqa: B018 - yarl checks the port's range only when it is read
        except (ValueError, TypeError):
            raise InvalidArgumentError(f"{where}: {_shown(url)}{via} is not a valid URL") from None
        if parsed.scheme not in ("http", "https"):
            raise InvalidArgumentError(f"{where}: only http and https URLs are fetched, got {parsed.scheme!r}{via}")
        if parsed.user is not None or parsed.password is not None:
            raise InvalidArgumentError(f"{where}: URLs with credentials (user:password@) are refused{via}")
        if not parsed.raw_host:
            raise InvalidArgumentError(f"{where}: {_shown(parsed)}{via} has no host")
        if not self.allowlist.allows(parsed.raw_host):
            raise MediaAccessError(f"{where}: host {normalize_host(parsed.raw_host)!r}{via} is not in the gateway's "
                                   "--allowed-media-domains")
        if not self.allow_private_addresses:
            literal = _ip_literal(parsed.raw_host)
            kind = address_problem(literal) if literal is not None else None
            if kind is not None:
                raise _private_address_error(where, literal, literal, kind)
        return parsed

    def _redirect_target(self, response: aiohttp.ClientResponse, current: URL, where: str) -> URL:
        location = response.headers.get("Location")
        via = f" (redirected from {_shown(current)})"
        if not location:
            raise InvalidMediaError(f"{where}: {_shown(current)} answered HTTP {response.status} without a Location")
        try:
            target = current.join(URL(location))
        except (ValueError, TypeError):
            raise InvalidMediaError(f"{where}: {_shown(current)} redirected to an invalid URL") from None
        return self._checked_url(target, where, via)

    async def _read_body(self, response: aiohttp.ClientResponse, url: URL, where: str) -> bytes:
        limit = self.max_media_bytes
        if response.content_length is not None and response.content_length > limit:
            raise InvalidMediaError(f"{where}: {_shown(url)} has {response.content_length} bytes (Content-Length), "
                                    f"above the limit of {limit} (--max-media-bytes)")
        body = bytearray()
        async with asyncio.timeout(self.read_timeout_s):
            async for chunk in response.content.iter_chunked(READ_CHUNK_BYTES):
                body += chunk
                if len(body) > limit:  # refused mid-stream: a missing or false Content-Length saves no memory
                    raise InvalidMediaError(f"{where}: {_shown(url)} sent more than the limit of {limit} bytes "
                                            "(--max-media-bytes)")
        return bytes(body)


# ---------------------------------------------------------------------------------------------------- helpers


async def _gather_or_cancel(awaitables: Iterable[Awaitable[bytes]]) -> list[bytes]:
    """asyncio.gather, but the first failure cancels the fetches still running instead of leaving them behind."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _part_with_data(part: ContentPart, data: bytes) -> ContentPart:
    """`part` with its media's URL replaced by `data`; every other field (num_segments, bound, ...) kept."""
    if part.image is not None:
        return dataclasses.replace(part, image=dataclasses.replace(part.image, url=None, data=data))
    return dataclasses.replace(part, video=dataclasses.replace(part.video, url=None, data=data))


def _private_address_error(where: str, host: str, address: str, kind: str) -> MediaAccessError:
    subject = f"{host!r}" if _ip_literal(host) is not None else f"host {host!r} resolves to {address}, which"
    return MediaAccessError(f"{where}: {subject} is a {kind} address; the gateway fetches media only from public "
                            "addresses (start it with --allow-private-media-addresses to lift this)")


def _ip_literal(host: str) -> str | None:
    """`host` as an IP address string if it is one, else None."""
    try:
        return str(ipaddress.ip_address(host.removeprefix("[").removesuffix("]")))
    except ValueError:
        return None


def _shown(url: str | URL) -> str:
    text = str(url)
    return text if len(text) <= SHOWN_URL_CHARS else text[:SHOWN_URL_CHARS] + "..."


def _reason(exc: aiohttp.ClientError) -> str:
    """A short, caller-safe reason for a client error (never a traceback or a repr of internals)."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return "the server's TLS certificate was not accepted"
    if isinstance(exc, aiohttp.ClientSSLError):
        return "the TLS handshake failed"
    if isinstance(exc, aiohttp.ClientConnectorError):
        error = exc.os_error
        # asyncio's strerror repeats the address; the errno's own text ("Connection refused") is the reason.
        return f"cannot connect ({os.strerror(error.errno) if error.errno else type(error).__name__})"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the connection broke while reading the body"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(exc, aiohttp.ClientResponseError):
        return "the server sent an invalid HTTP response"
    if isinstance(exc, aiohttp.InvalidURL):
        return "the URL is invalid"
    return type(exc).__name__
