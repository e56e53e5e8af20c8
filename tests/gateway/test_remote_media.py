"""Remote media fetching: the allowlist, the private-address guard, redirects, size limits, timeouts, and the
replacement of a request's remote URLs by their bytes.

Everything runs against a real aiohttp server on 127.0.0.1 started by the test. 127.0.0.1 is loopback, so the tests
that exercise fetching lift the guard (`allow_private_media_addresses=True`); the guard's own tests leave it on and
check that the loopback server is refused, both as a literal IP and through a name (`localhost`) that resolves to it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import socket
from dataclasses import dataclass

import pytest
import pytest_asyncio
from aiohttp import web
from helpers.media import png

from gateway import config as gateway_config
from gateway.chat_request import CallerTurn, ChatRequest, ContentPart, ImageInput, VideoInput
from gateway.media import decode_data_url
from gateway.remote_media import (
    MAX_REDIRECTS,
    BlockedAddressError,
    HostAllowlist,
    PublicAddressResolver,
    RemoteMedia,
    address_problem,
    host_pattern_problem,
)
from services.contract.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    InvalidMediaError,
    MediaAccessError,
)

pytestmark = pytest.mark.timeout(30)

LIMIT = 10_000
READ_TIMEOUT_S = 0.25


PNG = png(8, 6)


@dataclass
class MediaServer:
    base: str  # http://127.0.0.1:PORT
    port: int
    requests: list[str]


async def _png(request: web.Request) -> web.Response:
    return web.Response(body=PNG, content_type="image/png")


async def _redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound("/cat.png")


async def _redirect_evil(request: web.Request) -> web.Response:
    raise web.HTTPFound("http://evil.test/cat.png")


async def _chain(request: web.Request) -> web.Response:
    """/chain/N answers N redirects (/chain/N-1, ..., /chain/0) before the PNG."""
    hops = int(request.match_info["hops"])
    if hops == 0:
        return await _png(request)
    raise web.HTTPTemporaryRedirect(f"/chain/{hops - 1}")


async def _big_stream(request: web.Request) -> web.StreamResponse:
    """More than LIMIT bytes, chunked: no Content-Length to refuse early, so only the streaming count can."""
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    with contextlib.suppress(ConnectionError):
        for _ in range(4):
            await response.write(b"x" * 4096)
        await response.write_eof()
    return response


async def _big_length(request: web.Request) -> web.StreamResponse:
    """Announces a gigabyte; the client must refuse from the header, before reading."""
    response = web.StreamResponse(headers={"Content-Length": str(10**9)})
    await response.prepare(request)
    with contextlib.suppress(ConnectionError):
        await response.write(b"x" * 100)
    return response


async def _slow_head(request: web.Request) -> web.Response:
    await asyncio.sleep(2 * READ_TIMEOUT_S)
    return await _png(request)


async def _trickle(request: web.Request) -> web.StreamResponse:
    """A byte every 20 ms: never idle for the read timeout, but slower in total than it."""
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    with contextlib.suppress(ConnectionError):
        for _ in range(int(4 * READ_TIMEOUT_S / 0.02)):
            await response.write(b"x")
            await asyncio.sleep(0.02)
        await response.write_eof()
    return response


async def _missing(request: web.Request) -> web.Response:
    return web.Response(status=404, text="secret server-side detail")


def _barrier(parties: int):
    """A handler that answers only once `parties` requests are in flight together (proves concurrent fetching)."""
    arrived = 0
    everyone = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        nonlocal arrived
        arrived += 1
        if arrived >= parties:
            everyone.set()
        try:
            await asyncio.wait_for(everyone.wait(), timeout=2)
        except TimeoutError:
            return web.Response(status=503)
        return await _png(request)

    return handler


@pytest_asyncio.fixture
async def server():
    requests: list[str] = []

    @web.middleware
    async def record(request, handler):
        requests.append(request.path)
        return await handler(request)

    app = web.Application(middlewares=[record])
    app.router.add_get("/cat.png", _png)
    app.router.add_get("/redirect", _redirect)
    app.router.add_get("/redirect-evil", _redirect_evil)
    app.router.add_get("/chain/{hops}", _chain)
    app.router.add_get("/big", _big_stream)
    app.router.add_get("/big-length", _big_length)
    app.router.add_get("/slow-head", _slow_head)
    app.router.add_get("/trickle", _trickle)
    app.router.add_get("/missing", _missing)
    app.router.add_get("/together", _barrier(3))
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield MediaServer(f"http://127.0.0.1:{port}", port, requests)
    finally:
        await runner.cleanup()


@pytest_asyncio.fixture
async def fetcher():
    """Factory of RemoteMedia for the local server (guard lifted unless asked), all closed after the test."""
    made: list[RemoteMedia] = []

    def make(domains=("127.0.0.1", "localhost"), *, private=True, **options) -> RemoteMedia:
        options.setdefault("media_read_timeout_s", READ_TIMEOUT_S)
        media = RemoteMedia(domains, max_media_bytes=LIMIT, allow_private_media_addresses=private, **options)
        made.append(media)
        return media

    yield make
    for media in made:
        await media.close()


# ------------------------------------------------------------------------------------------- allowlist unit


def test_allowlist_matches_exact_names_and_subdomain_wildcards():
    allow = HostAllowlist(["img.example.com", "*.cdn.example.org", "Photos.Example.NET.", "[::1]", "10.0.0.5"])
    for host in ["img.example.com", "IMG.Example.com", "img.example.com.", "a.cdn.example.org",
                 "a.b.cdn.example.org", "A.CDN.EXAMPLE.ORG.", "photos.example.net", "::1", "0:0:0:0:0:0:0:1",
                 "10.0.0.5"]:
        assert allow.allows(host), host
    for host in ["example.com", "x.img.example.com", "cdn.example.org", "badcdn.example.org",
                 "cdn.example.org.evil.test", "evil.test", "10.0.0.6", "", "."]:
        assert not allow.allows(host), host
    assert not HostAllowlist([]) and HostAllowlist(["a.test"])


def test_allowlist_patterns_are_validated():
    for good in ["img.example.com", "*.example.com", "localhost", "127.0.0.1", "::1", "[2001:db8::1]",
                 "bücher.example", "under_score.example"]:
        assert host_pattern_problem(good) is None, good
    for bad, why in [("", "names no host"), ("*.", "names no host"), ("foo.*.com", "only allowed as a leading"),
                     ("*example.com", "only allowed as a leading"), ("example.com:8080", "without scheme, port"),
                     ("http://example.com", "without scheme, port"), ("a..b", "not a valid host name"),
                     ("-a.example", "not a valid host name"), ("*.10.0.0.5", "cannot take a '\\*.' wildcard")]:
        problem = host_pattern_problem(bad)
        assert problem is not None and re.search(why, problem), (bad, problem)


# ----------------------------------------------------------------------------------- address guard unit


@pytest.mark.parametrize(("address", "kind"), [
    ("127.0.0.1", "loopback"), ("10.1.2.3", "private"), ("192.168.0.1", "private"), ("172.16.0.1", "private"),
    ("169.254.169.254", "link-local"), ("100.64.0.1", "carrier-grade NAT"), ("224.0.0.1", "multicast"),
    ("239.1.2.3", "multicast"), ("0.0.0.0", "unspecified"), ("255.255.255.255", None), ("240.0.0.1", None),
    ("::1", "loopback"), ("::", "unspecified"), ("fe80::1", "link-local"), ("fc00::1", "private"),
    ("ff02::1", "multicast"), ("::ffff:127.0.0.1", "loopback (embedded in IPv6)"),
    ("::ffff:169.254.169.254", "link-local (embedded in IPv6)"), ("2002:7f00:1::", "loopback (embedded in IPv6)"),
    ("64:ff9b::a00:1", "private (embedded in IPv6)"), ("fe80::1%eth0", "link-local"),
])
def test_non_public_addresses_are_named(address, kind):
    problem = address_problem(address)
    assert problem is not None
    if kind is not None:
        assert problem == kind


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888", "::ffff:8.8.8.8",
                                     "64:ff9b::808:808"])
def test_public_addresses_pass(address):
    assert address_problem(address) is None


@pytest.mark.asyncio
async def test_resolver_refuses_names_of_loopback_and_passes_public_addresses():
    resolver = PublicAddressResolver()
    try:
        with pytest.raises(BlockedAddressError) as caught:
            await resolver.resolve("localhost", 80)
        assert caught.value.host == "localhost" and caught.value.kind == "loopback"
        # A numeric host resolves without DNS, so this checks the pass-through path offline.
        results = await resolver.resolve("8.8.8.8", 443)
        assert [r["host"] for r in results] == ["8.8.8.8"] and results[0]["port"] == 443
    finally:
        await resolver.close()


# ------------------------------------------------------------------------------------------------ fetching


@pytest.mark.asyncio
async def test_fetches_an_allowed_url(server, fetcher):
    media = fetcher()
    assert await media.fetch(f"{server.base}/cat.png", "content[0] (image)") == PNG
    # Host matching ignores case, as DNS does.
    assert await media.fetch(f"http://LOCALHOST:{server.port}/cat.png", "content[0] (image)") == PNG
    # One session, reused, made on this loop.
    session = media._session
    await media.fetch(f"{server.base}/cat.png", "w")
    assert media._session is session
    await media.close()
    assert media._session is None and session.closed


@pytest.mark.asyncio
async def test_redirects_are_followed_up_to_the_limit(server, fetcher):
    media = fetcher()
    assert await media.fetch(f"{server.base}/redirect", "content[0] (image)") == PNG
    assert await media.fetch(f"{server.base}/chain/{MAX_REDIRECTS}", "content[0] (image)") == PNG
    with pytest.raises(InvalidMediaError, match=rf"^content\[0\] \(image\): fetching .*/chain/{MAX_REDIRECTS + 1} "
                                                rf"was redirected more than {MAX_REDIRECTS} times"):
        await media.fetch(f"{server.base}/chain/{MAX_REDIRECTS + 1}", "content[0] (image)")


@pytest.mark.asyncio
async def test_redirect_off_the_allowlist_is_refused(server, fetcher):
    media = fetcher()
    with pytest.raises(MediaAccessError, match=r"^content\[1\] \(image\): host 'evil.test' \(redirected from "
                                               r"http://127.0.0.1:\d+/redirect-evil\) is not in the gateway's "
                                               r"--allowed-media-domains$"):
        await media.fetch(f"{server.base}/redirect-evil", "content[1] (image)")


@pytest.mark.asyncio
async def test_host_off_the_allowlist_is_refused_before_connecting(server, fetcher):
    media = fetcher(domains=("*.example.com",))
    with pytest.raises(MediaAccessError, match=r"^content\[0\] \(image\): host '127.0.0.1' is not in the "
                                               r"gateway's --allowed-media-domains$"):
        await media.fetch(f"{server.base}/cat.png", "content[0] (image)")
    assert server.requests == []


@pytest.mark.asyncio
async def test_empty_allowlist_refuses_and_says_how_to_enable(server, fetcher):
    media = fetcher(domains=())
    with pytest.raises(InvalidArgumentError, match=r"^content\[0\] \(image\): remote URLs are not fetched; .*"
                                                   r"--allowed-media-domains"):
        await media.fetch(f"{server.base}/cat.png", "content[0] (image)")
    assert server.requests == []


@pytest.mark.asyncio
async def test_malformed_urls_are_refused(fetcher):
    media = fetcher()
    for url, why in [("ftp://127.0.0.1/cat.png", "only http and https URLs are fetched, got 'ftp'"),
                     ("http://user:pw@127.0.0.1/cat.png", r"credentials \(user:password@\) are refused"),
                     ("http://user@127.0.0.1/cat.png", r"credentials \(user:password@\) are refused"),
                     ("http:///cat.png", "has no host"),
                     ("http://127.0.0.1:99999/cat.png", "is not a valid URL")]:
        with pytest.raises(InvalidArgumentError, match=rf"^content\[0\] \(image\): .*{why}"):
            await media.fetch(url, "content[0] (image)")


@pytest.mark.asyncio
async def test_guard_refuses_a_loopback_literal(server, fetcher):
    media = fetcher(domains=("127.0.0.1", "::ffff:127.0.0.1"), private=False)
    with pytest.raises(MediaAccessError, match=r"^content\[0\] \(image\): '127.0.0.1' is a loopback address; the "
                                               r"gateway fetches media only from public addresses \(start it with "
                                               r"--allow-private-media-addresses to lift this\)$"):
        await media.fetch(f"{server.base}/cat.png", "content[0] (image)")
    # Python spells the mapped address either way, depending on its version.
    embedded = r"'::ffff:(127\.0\.0\.1|7f00:1)' is a loopback \(embedded in IPv6\) address"
    with pytest.raises(MediaAccessError, match=embedded):
        await media.fetch(f"http://[::ffff:127.0.0.1]:{server.port}/cat.png", "content[0] (image)")
    assert server.requests == []


@pytest.mark.asyncio
async def test_guard_refuses_a_name_resolving_to_loopback(server, fetcher):
    media = fetcher(private=False)
    with pytest.raises(MediaAccessError, match=r"^content\[0\] \(image\): host 'localhost' resolves to 127.0.0.1, "
                                               r"which is a loopback address; .*--allow-private-media-addresses"):
        await media.fetch(f"http://localhost:{server.port}/cat.png", "content[0] (image)")
    assert server.requests == []


@pytest.mark.asyncio
async def test_oversized_bodies_are_refused(server, fetcher):
    media = fetcher()
    with pytest.raises(InvalidMediaError, match=rf"^content\[0\] \(image\): http://127.0.0.1:\d+/big sent more than "
                                                rf"the limit of {LIMIT} bytes \(--max-media-bytes\)$"):
        await media.fetch(f"{server.base}/big", "content[0] (image)")
    with pytest.raises(InvalidMediaError, match=rf"/big-length has {10**9} bytes \(Content-Length\), above the "
                                                rf"limit of {LIMIT} \(--max-media-bytes\)$"):
        await media.fetch(f"{server.base}/big-length", "content[0] (image)")


@pytest.mark.asyncio
async def test_read_timeouts(server, fetcher):
    media = fetcher()
    timeout = rf"the response took longer than the read timeout of {READ_TIMEOUT_S} s \(--media-read-timeout-s\)$"
    with pytest.raises(DeadlineExceededError, match=rf"^content\[0\] \(video\): cannot fetch .*/slow-head: {timeout}"):
        await media.fetch(f"{server.base}/slow-head", "content[0] (video)")
    # Never idle for the timeout, but longer than it in total: the body's own deadline.
    with pytest.raises(DeadlineExceededError, match=rf"/trickle: {timeout}"):
        await media.fetch(f"{server.base}/trickle", "content[0] (video)")


@pytest.fixture
def unanswered_port():
    """A listening port whose accept queue is full, so that a further connect hangs (SYNs are dropped)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    yield port
    for sock in [*fillers, listener]:
        sock.close()


@pytest.mark.asyncio
async def test_connect_timeout(unanswered_port, fetcher):
    media = fetcher(media_connect_timeout_s=0.2)
    with pytest.raises(DeadlineExceededError, match=r"^content\[0\] \(image\): cannot fetch .*: no connection within "
                                                    r"the connect timeout of 0.2 s \(--media-connect-timeout-s\)$"):
        await media.fetch(f"http://127.0.0.1:{unanswered_port}/cat.png", "content[0] (image)")


@pytest.mark.asyncio
async def test_http_errors_and_connection_errors_are_short(server, fetcher):
    media = fetcher()
    with pytest.raises(InvalidMediaError) as caught:
        await media.fetch(f"{server.base}/missing", "content[0] (image)")
    assert str(caught.value) == f"content[0] (image): fetching {server.base}/missing returned HTTP 404"
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(InvalidMediaError, match=rf"^content\[0\] \(image\): cannot fetch http://127.0.0.1:{port}/x: "
                                                r"cannot connect \([^)]+\)$"):
        await media.fetch(f"http://127.0.0.1:{port}/x", "content[0] (image)")


# ---------------------------------------------------------------------------------------------- requests


@pytest.mark.asyncio
async def test_resolve_urls_replaces_remote_urls_by_bytes(server, fetcher, tmp_path):
    media = fetcher()
    data_url = ImageInput(url="data:image/png;base64,AAAA")
    by_path = ImageInput(path="cat.png")
    by_bytes = ImageInput(data=b"raw")
    request = ChatRequest(
        content=(ContentPart(text="Compare."),
                 ContentPart(image=ImageInput(url=f"{server.base}/cat.png")),
                 ContentPart(image=data_url),
                 ContentPart(image=by_path),
                 ContentPart(video=VideoInput(url=f"{server.base}/redirect", num_segments=4, bound=(1.0, 2.0),
                                              max_num=2))),
        history=(CallerTurn((ContentPart(image=by_bytes), ContentPart(image=ImageInput(url=f"{server.base}/cat.png"))),
                            "An earlier answer."),),
        session_id="s", max_num=6, system_message="sys", request_id="r1")
    resolved = await media.resolve_urls(request)
    assert resolved.content[1].image == ImageInput(data=PNG)
    assert resolved.content[4].video == VideoInput(data=PNG, num_segments=4, bound=(1.0, 2.0), max_num=2)
    assert resolved.history[0].user[1].image == ImageInput(data=PNG)
    assert resolved.history[0].assistant_text == "An earlier answer."
    # Everything that was not a remote URL is the very same object.
    assert resolved.content[0] is request.content[0]
    assert resolved.content[2].image is data_url and resolved.content[3].image is by_path
    assert resolved.history[0].user[0].image is by_bytes
    assert (resolved.session_id, resolved.max_num, resolved.system_message, resolved.request_id) == (
        "s", 6, "sys", "r1")


@pytest.mark.asyncio
async def test_resolve_urls_without_remote_urls_is_a_no_op(fetcher):
    media = fetcher(domains=())
    request = ChatRequest(content=(ContentPart(text="Hi"), ContentPart(image=ImageInput(url="data:,x"))))
    assert await media.resolve_urls(request) is request
    assert media._session is None


@pytest.mark.asyncio
async def test_resolve_urls_fetches_concurrently(server, fetcher):
    # /together answers only while three requests are in flight at once: sequential fetching would get HTTP 503.
    media = fetcher(media_read_timeout_s=5)
    part = ContentPart(image=ImageInput(url=f"{server.base}/together"))
    request = ChatRequest(content=(part, part), history=(CallerTurn((part,), "ok"),))
    resolved = await media.resolve_urls(request)
    assert [p.image.data for p in (*resolved.content, *resolved.history[0].user)] == [PNG] * 3


@pytest.mark.asyncio
async def test_resolve_urls_names_the_failing_part(server, fetcher):
    media = fetcher()
    request = ChatRequest(
        content=(ContentPart(text="?"), ContentPart(image=ImageInput(url=f"{server.base}/cat.png"))),
        history=(CallerTurn((ContentPart(text="a"), ContentPart(video=VideoInput(url=f"{server.base}/missing"))),
                            "b"),))
    with pytest.raises(InvalidMediaError, match=r"^history\[0\]\.user_content\[1\] \(video\): fetching "
                                                r".*/missing returned HTTP 404$"):
        await media.resolve_urls(request)
    with pytest.raises(MediaAccessError, match=r"^content\[1\] \(image\): host '127.0.0.1' is not in"):
        await fetcher(domains=("localhost",)).resolve_urls(ChatRequest(content=request.content))


def test_media_resolution_still_refuses_unfetched_remote_urls():
    for url in ["http://img.example.com/cat.png", "HTTPS://img.example.com/cat.png"]:
        with pytest.raises(InvalidArgumentError, match=r"^content\[0\] \(image\): remote URLs are not fetched; "
                                                       r"send a base64 data: URL.*--allowed-media-domains"):
            decode_data_url(url, "content[0] (image)", LIMIT)


# ------------------------------------------------------------------------------------------------ config


def gateway_args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    gateway_config.add_arguments(parser)
    return parser.parse_args(["--vision-target", "v:1", "--llm-target", "l:1", *extra])


def test_config_flags_parse_and_build_the_fetcher():
    default = gateway_config.GatewayConfig.from_args(gateway_args(), {})
    assert default.allowed_media_domains == () and default.allow_private_media_addresses is False
    assert (default.media_connect_timeout_s, default.media_read_timeout_s) == (5.0, 30.0)
    config = gateway_config.GatewayConfig.from_args(gateway_args(
        "--allowed-media-domains", " img.example.com, *.cdn.example.org,,", "--allow-private-media-addresses",
        "--media-connect-timeout-s", "1.5", "--media-read-timeout-s", "7", "--max-media-bytes", "1234"), {})
    assert config.allowed_media_domains == ("img.example.com", "*.cdn.example.org")
    assert config.allow_private_media_addresses is True
    assert (config.media_connect_timeout_s, config.media_read_timeout_s) == (1.5, 7.0)
    media = RemoteMedia.from_config(config)
    assert media.allowlist.allows("a.cdn.example.org") and not media.allowlist.allows("cdn.example.org")
    assert (media.max_media_bytes, media.allow_private_addresses) == (1234, True)
    assert (media.connect_timeout_s, media.read_timeout_s) == (1.5, 7.0)


@pytest.mark.parametrize(("argv", "message"), [
    (["--media-connect-timeout-s", "0"], r"--media-connect-timeout-s must be > 0, got 0.0"),
    (["--media-read-timeout-s", "-1"], r"--media-read-timeout-s must be > 0, got -1.0"),
    (["--media-read-timeout-s", "inf"], r"--media-read-timeout-s must be > 0, got inf"),
    (["--allowed-media-domains", "img.example.com,example.com:8080"],
     r"--allowed-media-domains: 'example.com:8080': give a host name only"),
    (["--allowed-media-domains", "foo.*.com"], r"--allowed-media-domains: 'foo.\*.com': '\*' is only allowed"),
])
def test_config_flags_are_validated(argv, message):
    with pytest.raises(InvalidArgumentError, match=message):
        gateway_config.GatewayConfig.from_args(gateway_args(*argv), {})
