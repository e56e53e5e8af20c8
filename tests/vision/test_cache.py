"""The embedding cache: keys, value codec, and the Redis store against a real redis-server."""

import asyncio
import json
import struct
import uuid

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
import torch

from services.contract.cache_keys import SCHEMA_VERSION, cache_key, frame_media
from services.runtime.embedding_store import MAGIC, EmbeddingCache, decode_value, encode_value

FP = "fingerprint-a"
IMAGE = bytes(range(256)) * 40
BASE = {
    "model_fingerprint": FP,
    "max_num": 12,
    "use_thumbnail": True,
    "image_size": 448,
    "media": IMAGE,
    "media_kind": "image",
}


# ---------------------------------------------------------------------------------------------- keys


def test_key_format_and_determinism():
    key = cache_key(**BASE)
    assert key == cache_key(**BASE)
    prefix = f"internvl:emb:v{SCHEMA_VERSION}:"
    assert key.startswith(prefix) and len(key) == len(prefix) + 64
    assert cache_key(**BASE, namespace="test").startswith(f"test:emb:v{SCHEMA_VERSION}:")


def _flip_one_byte(data: bytes) -> bytes:
    return data[:100] + bytes([data[100] ^ 1]) + data[101:]


@pytest.mark.parametrize(
    "change",
    [
        {"model_fingerprint": "fingerprint-b"},
        {"max_num": 6},
        {"use_thumbnail": False},
        {"image_size": 224},
        {"media": _flip_one_byte(IMAGE)},
        {"media": IMAGE + b"\0"},
        {"media_kind": "frame"},
    ],
    ids=lambda change: next(iter(change)),
)
def test_key_changes_with_every_input(change):
    assert cache_key(**{**BASE, **change}) != cache_key(**BASE)


def test_frame_key_includes_shape():
    rgb = bytes(range(36))
    a = cache_key(**{**BASE, "media": frame_media(rgb, 3, 4), "media_kind": "frame"})
    b = cache_key(**{**BASE, "media": frame_media(rgb, 4, 3), "media_kind": "frame"})
    assert a != b
    with pytest.raises(ValueError):
        frame_media(rgb, 2, 2)


def test_fields_cannot_run_into_each_other():
    # Length prefixes keep ("ab", "c") and ("a", "bc") apart.
    a = cache_key(**{**BASE, "model_fingerprint": "fp1"})
    b = cache_key(**{**BASE, "model_fingerprint": "fp", "max_num": 112})
    assert a != b


def test_key_rejects_bad_arguments():
    with pytest.raises(ValueError):
        cache_key(**{**BASE, "media_kind": "video"})
    with pytest.raises(TypeError):
        cache_key(**{**BASE, "use_thumbnail": 1})
    with pytest.raises(TypeError):
        cache_key(**{**BASE, "max_num": True})


# ---------------------------------------------------------------------------------------------- codec


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(512, 64), (3, 5, 7), (), (0, 8)])
def test_codec_round_trips_exactly(dtype, shape):
    gen = torch.Generator().manual_seed(0)
    tensor = (torch.randn(shape, generator=gen) * 100).to(dtype)
    decoded = decode_value(encode_value(tensor, FP), FP)
    assert decoded is not None
    assert decoded.dtype == dtype and decoded.shape == tensor.shape
    # Bitwise equality, NaN-safe and -0.0-safe.
    assert torch.equal(decoded.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))


def test_codec_round_trips_special_values_and_views():
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40], dtype=torch.float32)
    decoded = decode_value(encode_value(special, FP), FP)
    assert torch.equal(decoded.view(torch.int32), special.view(torch.int32))
    column = torch.arange(32, dtype=torch.bfloat16).reshape(8, 4)[:, 1]  # a non-contiguous view
    assert torch.equal(decode_value(encode_value(column, FP), FP), column)


def test_codec_rejects_unsupported_dtype():
    with pytest.raises(ValueError):
        encode_value(torch.zeros(2, dtype=torch.int64), FP)


def _header_and_payload(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack(">I", blob[len(MAGIC) : len(MAGIC) + 4])
    start = len(MAGIC) + 4
    return json.loads(blob[start : start + n]), blob[start + n :]


def _with_header(header: dict, payload: bytes) -> bytes:
    h = json.dumps(header).encode()
    return MAGIC + struct.pack(">I", len(h)) + h + payload


GOOD = encode_value(torch.randn(16, 8).to(torch.bfloat16), FP)
GOOD_HEADER, GOOD_PAYLOAD = _header_and_payload(GOOD)


@pytest.mark.parametrize(
    "blob",
    [
        pytest.param(GOOD[:-1] + bytes([GOOD[-1] ^ 0xFF]), id="corrupt-payload"),
        pytest.param(GOOD[:-10], id="truncated-payload"),
        pytest.param(GOOD[:20], id="truncated-header"),
        pytest.param(GOOD[:5], id="truncated-magic"),
        pytest.param(b"", id="empty"),
        pytest.param(b"XXXXXXXX" + GOOD[8:], id="wrong-magic"),
        pytest.param(GOOD + b"\0", id="trailing-bytes"),
        pytest.param(MAGIC + struct.pack(">I", 2**31) + GOOD[12:], id="huge-header-length"),
        pytest.param(MAGIC + struct.pack(">I", 5) + b"{not}" + GOOD_PAYLOAD, id="header-not-json"),
        pytest.param(MAGIC + struct.pack(">I", 4000) + b"[" * 4000, id="header-deeply-nested"),
        pytest.param(_with_header([1, 2], GOOD_PAYLOAD), id="header-not-object"),
        pytest.param(
            _with_header({**GOOD_HEADER, "model_fingerprint": "other"}, GOOD_PAYLOAD), id="fingerprint"
        ),
        pytest.param(_with_header({**GOOD_HEADER, "schema_version": 0}, GOOD_PAYLOAD), id="schema-version"),
        pytest.param(_with_header({**GOOD_HEADER, "dtype": "int8"}, GOOD_PAYLOAD), id="dtype"),
        pytest.param(_with_header({**GOOD_HEADER, "shape": [16, 9]}, GOOD_PAYLOAD), id="shape-mismatch"),
        pytest.param(_with_header({**GOOD_HEADER, "shape": [-16, -8]}, GOOD_PAYLOAD), id="negative-shape"),
        pytest.param(_with_header({**GOOD_HEADER, "shape": "16x8"}, GOOD_PAYLOAD), id="shape-not-list"),
        pytest.param(_with_header({**GOOD_HEADER, "checksum": None}, GOOD_PAYLOAD), id="no-checksum"),
        pytest.param(_with_header({**GOOD_HEADER, "byteorder": "big"}, GOOD_PAYLOAD), id="byteorder"),
    ],
)
def test_bad_values_decode_to_none(blob):
    assert decode_value(blob, FP) is None


def test_wrong_expected_fingerprint_is_none():
    assert decode_value(GOOD, FP) is not None
    assert decode_value(GOOD, "fingerprint-b") is None


def test_decode_never_raises_on_random_bytes():
    gen = torch.Generator().manual_seed(1)
    for n in (0, 1, 7, 12, 100, 1000):
        noise = bytes(torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8).tolist())
        assert decode_value(noise, FP) is None
        assert decode_value(MAGIC + noise, FP) is None
    assert decode_value("not bytes", FP) is None  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- redis


@pytest_asyncio.fixture
async def client(redis_url):
    r = aioredis.Redis.from_url(redis_url)
    try:
        yield r
    finally:
        await r.aclose()


def _key(name: str = "img") -> str:
    return cache_key(**{**BASE, "media": name.encode()}, namespace=f"test-{uuid.uuid4().hex}")


@pytest.mark.asyncio
async def test_put_get_exists_ttl(client):
    cache = EmbeddingCache(client, FP, default_ttl_s=3600)
    key, absent = _key("a"), _key("b")
    tensor = torch.randn(256 * 2, 64).to(torch.bfloat16)

    assert await cache.get(key) is None
    written = await cache.put(key, tensor)
    assert written == len(encode_value(tensor, FP)) == cache.bytes_written
    got = await cache.get(key)
    assert got is not None and torch.equal(got, tensor)
    assert await cache.exists([key, absent, key]) == [True, False, True]
    assert await cache.exists([]) == []
    assert 3500 < await client.ttl(key) <= 3600

    await cache.put(key, tensor, ttl_s=60)
    assert 0 < await client.ttl(key) <= 60
    assert (cache.hits, cache.misses, cache.corrupt) == (1, 1, 0)


@pytest.mark.asyncio
async def test_no_ttl_means_no_expiry(client):
    cache = EmbeddingCache(client, FP)
    key = _key()
    await cache.put(key, torch.zeros(4, 4))
    assert await client.ttl(key) == -1
    with pytest.raises(ValueError):
        await cache.put(key, torch.zeros(4, 4), ttl_s=0)


@pytest.mark.asyncio
async def test_corrupt_stored_value_is_a_miss_and_removed(client):
    cache = EmbeddingCache(client, FP)
    key = _key()
    await cache.put(key, torch.randn(32, 16).to(torch.float16))
    blob = await client.get(key)
    await client.set(key, blob[:-1] + bytes([blob[-1] ^ 1]))

    assert await cache.get(key) is None
    assert (cache.corrupt, cache.misses) == (1, 1)
    assert await cache.exists([key]) == [False]


@pytest.mark.asyncio
async def test_other_models_value_is_a_miss(client):
    key = _key()
    await EmbeddingCache(client, "fingerprint-b").put(key, torch.ones(8, 8))
    cache = EmbeddingCache(client, FP)
    assert await cache.get(key) is None
    assert cache.corrupt == 1


@pytest.mark.asyncio
async def test_get_or_compute_computes_once_then_hits(client):
    cache = EmbeddingCache(client, FP)
    key = _key()
    tensor = torch.randn(10, 10).to(torch.bfloat16)
    calls = 0

    async def compute():
        nonlocal calls
        calls += 1
        return tensor

    got, hit = await cache.get_or_compute(key, compute)
    assert torch.equal(got, tensor) and not hit
    got, hit = await cache.get_or_compute(key, compute)
    assert torch.equal(got, tensor) and hit
    assert calls == 1 and cache.computes == 1


@pytest.mark.asyncio
async def test_single_flight_runs_compute_once(client):
    cache = EmbeddingCache(client, FP)
    key = _key()
    tensor = torch.randn(256, 32).to(torch.bfloat16)
    calls = 0
    release = asyncio.Event()

    async def compute():
        nonlocal calls
        calls += 1
        await release.wait()
        return tensor

    tasks = [asyncio.create_task(cache.get_or_compute(key, compute)) for _ in range(10)]
    await asyncio.sleep(0.05)  # let every caller join while compute is blocked
    release.set()
    results = await asyncio.gather(*tasks)

    assert calls == 1
    assert cache.computes == 1 and cache.single_flight_joins == 9
    assert all(torch.equal(t, tensor) and not hit for t, hit in results)
    assert torch.equal(await cache.get(key), tensor)


@pytest.mark.asyncio
async def test_single_flight_error_reaches_all_and_next_call_retries(client):
    cache = EmbeddingCache(client, FP)
    key = _key()
    release = asyncio.Event()

    async def failing():
        await release.wait()
        raise RuntimeError("encoder failed")

    tasks = [asyncio.create_task(cache.get_or_compute(key, failing)) for _ in range(3)]
    await asyncio.sleep(0.05)
    release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)

    async def ok():
        return torch.ones(2, 2)

    got, hit = await cache.get_or_compute(key, ok)
    assert torch.equal(got, torch.ones(2, 2)) and not hit


@pytest.mark.asyncio
async def test_single_flight_cancellation(client):
    cache = EmbeddingCache(client, FP)
    key = _key()
    started, release = asyncio.Event(), asyncio.Event()
    cancelled = False

    async def compute():
        nonlocal cancelled
        started.set()
        try:
            await release.wait()
        except asyncio.CancelledError:
            cancelled = True
            raise
        return torch.ones(3)

    # One of two callers cancelled: the work goes on for the other.
    first = asyncio.create_task(cache.get_or_compute(key, compute))
    second = asyncio.create_task(cache.get_or_compute(key, compute))
    await started.wait()
    first.cancel()
    await asyncio.sleep(0.01)
    release.set()
    got, _ = await second
    assert torch.equal(got, torch.ones(3)) and not cancelled
    with pytest.raises(asyncio.CancelledError):
        await first

    # The only caller cancelled: the work is cancelled too, and the key is free for a new fill.
    key2 = _key("other")
    started.clear()
    release.clear()
    only = asyncio.create_task(cache.get_or_compute(key2, compute))
    await started.wait()
    only.cancel()
    with pytest.raises(asyncio.CancelledError):
        await only
    await asyncio.sleep(0.01)
    assert cancelled
    assert await cache.exists([key2]) == [False]
    release.set()
    got, hit = await cache.get_or_compute(key2, compute)
    assert torch.equal(got, torch.ones(3)) and not hit


@pytest.mark.asyncio
async def test_large_value_round_trips(client):
    # 13 tiles at the 8B width (2 MiB per tile in bf16): 26 MiB through one SET/GET.
    cache = EmbeddingCache(client, FP)
    key = _key()
    tensor = torch.randn(13 * 256, 4096).to(torch.bfloat16)
    await cache.put(key, tensor)
    assert torch.equal(await cache.get(key), tensor)
    await client.delete(key)
