"""End to end: a real redis-server and `internvl-serve vision` as a real process, driven over gRPC.

One server process for the whole module (starting one costs seconds of imports). Tests that read metrics look
at how much a counter moved during the test, never at absolute values, so their order does not matter.
"""

from __future__ import annotations

import io
import re
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import redis
import torch
from helpers.media import bomb_png, png
from internvl.common.v1 import common_pb2
from internvl.vision.v1 import vision_pb2, vision_pb2_grpc
from PIL import Image
from procs import run_service

from services.contract.cache_keys import cache_key, model_identity
from services.model.checkpoint import open_checkpoint
from services.model.modules import load_vision
from services.runtime.embedding_store import encode_value
from services.runtime.grpc_errors import error_detail
from services.runtime.grpc_server import channel_options
from services.vision.preprocess import load_image

pytestmark = pytest.mark.e2e

TOL = 1e-5
HIDDEN = 64  # the tiny checkpoint's LLM width
MAX_PIXELS = 2_000_000
# Golden images and their tile counts in the golden tiling file (grid + thumbnail).
GOLDEN = [("landscape_1000x700.png", 12, 7), ("portrait_333x1200.png", 12, 5), ("wide_2200x300.png", 6, 7),
          ("small_120x90.png", 12, 13)]
DTYPES = {common_pb2.DTYPE_FLOAT32: torch.float32, common_pb2.DTYPE_BFLOAT16: torch.bfloat16}


@pytest.fixture(scope="module")
def checkpoint_dir(tiny_checkpoint):
    return tiny_checkpoint()


@pytest.fixture(scope="module")
def namespace():
    return f"it{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def server(checkpoint_dir, redis_url, namespace):
    # A generous batching window so that concurrent requests reliably meet in one batch on a slow CI machine.
    with run_service("vision", "--model", str(checkpoint_dir), "--redis-url", redis_url, "--dtype", "float32",
                     "--device", "cpu", "--namespace", namespace, "--max-wait-ms", "150", "--max-batch-tiles", "64",
                     "--max-image-pixels", str(MAX_PIXELS), "--cache-ttl-s", "600", "--max-items", "8") as service:
        yield service


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address, options=channel_options()) as channel:
        yield vision_pb2_grpc.VisionServiceStub(channel)


@pytest.fixture(scope="module")
def reference(checkpoint_dir):
    model = load_vision(open_checkpoint(checkpoint_dir), torch.float32, "cpu")

    def encode(source, max_num: int = 12, use_thumbnail: bool = True) -> torch.Tensor:
        return model.encode(load_image(source, max_num=max_num, use_thumbnail=use_thumbnail)).reshape(-1, HIDDEN)

    return encode


@pytest.fixture(scope="module")
def cache(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def metric(server, name: str, **labels: str) -> float:
    """One sample of the server's /metrics (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$")
    for line in server.metrics().splitlines():
        m = pattern.match(line)
        if m and (m.group(1) or "") == wanted:
            return float(m.group(2))
    return 0.0


def encode(stub, *items: bytes | vision_pb2.EncodeItem, max_num: int | None = None,
           use_thumbnail: bool | None = None) -> list[vision_pb2.EncodedItem]:
    options = common_pb2.PreprocessOptions()
    if max_num is not None:
        options.max_num = max_num
    if use_thumbnail is not None:
        options.use_thumbnail = use_thumbnail
    pb_items = [i if isinstance(i, vision_pb2.EncodeItem) else vision_pb2.EncodeItem(image_bytes=i) for i in items]
    return list(stub.Encode(vision_pb2.EncodeRequest(items=pb_items, options=options), timeout=60).items)


def fetch(stub, key: str, max_chunk_bytes: int = 0) -> tuple[torch.Tensor, list[common_pb2.TensorChunk]]:
    chunks = [r.chunk for r in stub.FetchEmbeddings(
        vision_pb2.FetchEmbeddingsRequest(key=key, max_chunk_bytes=max_chunk_bytes), timeout=60)]
    header = chunks[0].header
    data = bytearray()
    for chunk in chunks:
        assert chunk.offset == len(data)
        data += chunk.data
    assert len(data) == header.total_bytes
    tensor = torch.frombuffer(data, dtype=torch.uint8).view(DTYPES[header.dtype]).reshape(tuple(header.shape))
    return tensor, chunks


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    worst = (actual - expected).abs().max().item()
    assert worst <= TOL, f"max abs diff {worst:.3g} > {TOL}"


# ---------------------------------------------------------------------------------------------------- tests


def test_model_info(stub, checkpoint_dir):
    info = stub.GetModelInfo(vision_pb2.GetModelInfoRequest()).model_info
    assert info.fingerprint == open_checkpoint(checkpoint_dir).fingerprint
    assert (info.dtype, info.llm_hidden_size, info.tokens_per_tile, info.image_size) == (
        common_pb2.DTYPE_FLOAT32, HIDDEN, 256, 448)


def test_golden_images_tile_counts_and_embeddings(server, stub, golden_dir, reference):
    for name, max_num, tiles in GOLDEN:
        path = golden_dir / name
        [item] = encode(stub, path.read_bytes(), max_num=max_num)
        assert (item.num_tiles, item.num_tokens) == (tiles, tiles * 256), name
        embeddings, _ = fetch(stub, item.key)
        assert embeddings.shape == (tiles * 256, HIDDEN)
        assert_close(embeddings, reference(path, max_num=max_num))

        # Again: a hit that ran no encoder.
        tiles_before = metric(server, "internvl_vision_tiles_encoded_total")
        hits_before = metric(server, "internvl_vision_cache_hits_total")
        [again] = encode(stub, path.read_bytes(), max_num=max_num)
        assert again.cache_hit and again.key == item.key and again.num_tiles == tiles
        assert metric(server, "internvl_vision_tiles_encoded_total") == tiles_before
        assert metric(server, "internvl_vision_cache_hits_total") == hits_before + 1
        assert stub.Lookup(vision_pb2.LookupRequest(keys=[item.key])).exists == [True]


def test_concurrent_requests_are_batched_together(server, stub, golden_dir, reference):
    # Six different (image, options) pairs, so six different keys: none is answered by another's encode.
    cases = [("landscape_1000x700.png", 2), ("landscape_1000x700.png", 3), ("portrait_333x1200.png", 2),
             ("portrait_333x1200.png", 3), ("wide_2200x300.png", 2), ("small_120x90.png", 1)]
    batches = metric(server, "internvl_vision_batch_requests_count")
    solo = metric(server, "internvl_vision_batch_requests_bucket", le="1.0")
    tiles_before = metric(server, "internvl_vision_batch_tiles_sum")
    with ThreadPoolExecutor(len(cases)) as pool:
        futures = [pool.submit(encode, stub, (golden_dir / name).read_bytes(), max_num=max_num)
                   for name, max_num in cases]
        results = [f.result()[0] for f in futures]
    assert len({r.key for r in results}) == len(cases) and not any(r.cache_hit for r in results)
    total_tiles = sum(r.num_tiles for r in results)
    new_batches = metric(server, "internvl_vision_batch_requests_count") - batches
    shared = new_batches - (metric(server, "internvl_vision_batch_requests_bucket", le="1.0") - solo)
    assert metric(server, "internvl_vision_batch_tiles_sum") - tiles_before == total_tiles
    assert shared >= 1, "no batch held tiles of more than one request"
    assert new_batches < len(cases)
    for (name, max_num), item in zip(cases, results, strict=True):
        embeddings, _ = fetch(stub, item.key)
        assert_close(embeddings, reference(golden_dir / name, max_num=max_num))


def test_key_changes_with_options_and_one_byte(stub, golden_dir):
    image = Image.open(golden_dir / "landscape_1000x700.png").convert("RGB")
    buf = io.BytesIO()
    image.save(buf, "PPM")
    ppm = buf.getvalue()
    flipped = ppm[:-1] + bytes([ppm[-1] ^ 1])  # the last pixel's blue value: still a valid image
    [base] = encode(stub, ppm, max_num=4)
    variants = {
        "max_num": encode(stub, ppm, max_num=6)[0],
        "use_thumbnail": encode(stub, ppm, max_num=4, use_thumbnail=False)[0],
        "one byte": encode(stub, flipped, max_num=4)[0],
    }
    for what, item in variants.items():
        assert item.key != base.key, what
        assert not item.cache_hit, what
    assert variants["use_thumbnail"].num_tiles == base.num_tiles - 1
    assert not torch.equal(fetch(stub, base.key)[0], fetch(stub, variants["one byte"].key)[0])


def test_corrupt_cache_value_is_detected_and_re_encoded(server, stub, golden_dir, cache, reference):
    path = golden_dir / "portrait_333x1200.png"
    [item] = encode(stub, path.read_bytes(), max_num=4)
    good = cache.get(item.key)
    cache.set(item.key, good[:-10] + bytes(b ^ 0x5A for b in good[-10:]))  # damaged payload, header intact
    corrupt_before = metric(server, "internvl_vision_cache_corrupt_values_total")
    tiles_before = metric(server, "internvl_vision_tiles_encoded_total")
    [again] = encode(stub, path.read_bytes(), max_num=4)
    assert again.key == item.key and not again.cache_hit
    assert metric(server, "internvl_vision_cache_corrupt_values_total") == corrupt_before + 1
    assert metric(server, "internvl_vision_tiles_encoded_total") == tiles_before + item.num_tiles
    assert cache.get(item.key) == good
    assert_close(fetch(stub, item.key)[0], reference(path, max_num=4))


def test_fifty_mib_embedding_round_trips_through_fetch(stub, cache, namespace):
    info = stub.GetModelInfo(vision_pb2.GetModelInfoRequest()).model_info
    # 13 tiles of the 78B model's width (8192) in bfloat16: 52 MiB, far over one gRPC message.
    tensor = torch.randn(13 * 256, 8192, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    key = cache_key(model_identity(info.fingerprint, "bfloat16"), 12, True, 448, b"78b-sized", "image",
                    namespace=namespace)
    cache.set(key, encode_value(tensor, info.fingerprint), ex=120)
    try:
        fetched, chunks = fetch(stub, key)
        assert fetched.dtype == torch.bfloat16 and torch.equal(fetched, tensor)
        assert chunks[0].header.total_bytes == 13 * 256 * 8192 * 2 == 52 * (1 << 20)
        assert max(len(c.data) for c in chunks) == 1 << 20 and len(chunks) == 52  # the default 1 MiB chunks
        big, big_chunks = fetch(stub, key, max_chunk_bytes=64 << 20)  # capped below the 16 MiB message limit
        assert torch.equal(big, tensor) and max(len(c.data) for c in big_chunks) < 16 << 20
    finally:
        cache.delete(key)
    with pytest.raises(grpc.RpcError) as info:
        fetch(stub, key)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


GOOD = png(64, 64)
BAD_ITEMS = {
    "corrupt": GOOD[:40] + b"\0" * 20 + GOOD[60:],
    "truncated": GOOD[: len(GOOD) // 2],
    "not-an-image": b"this is plain text, not a picture",
    "empty": b"",
    "over-pixel-limit": png(1500, 1500),  # 2.25 MP > --max-image-pixels 2 MP
    "forged-bomb": bomb_png(60_000, 60_000),
    "unset": vision_pb2.EncodeItem(),
    "frame-size": vision_pb2.EncodeItem(frame=vision_pb2.RawFrame(rgb=b"\0" * 10, height=2, width=2)),
}


@pytest.mark.parametrize("kind", list(BAD_ITEMS))
def test_bad_items_are_invalid_argument_naming_the_item(stub, kind):
    with pytest.raises(grpc.RpcError) as info:
        encode(stub, GOOD, BAD_ITEMS[kind])
    error = info.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error.details().startswith("items[1]: "), error.details()
    assert error_detail(error).item_index == 1
    if kind in ("over-pixel-limit", "forged-bomb"):
        assert "too large" in error.details() or "above the limit" in error.details()
    # The server keeps serving.
    assert encode(stub, GOOD)[0].num_tiles == 1


@pytest.mark.parametrize(("items", "max_num", "message"), [
    ([], None, "no items"),
    ([GOOD], 0, "max_num must be between 1 and 40"),
    ([GOOD], 41, "max_num must be between 1 and 40"),
    ([GOOD] * 9, None, "at most 8"),
])
def test_bad_requests_are_invalid_argument(stub, items, max_num, message):
    with pytest.raises(grpc.RpcError) as info:
        encode(stub, *items, max_num=max_num)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in info.value.details()


def test_requests_are_counted_by_status(server, stub):
    before = metric(server, "internvl_vision_requests_total", method="Encode", code="INVALID_ARGUMENT")
    with pytest.raises(grpc.RpcError):
        encode(stub, b"")
    assert metric(server, "internvl_vision_requests_total", method="Encode", code="INVALID_ARGUMENT") == before + 1
    assert metric(server, "internvl_vision_requests_total", method="Encode", code="OK") >= 1
    assert metric(server, "internvl_vision_queue_tiles") == 0
    assert metric(server, "internvl_vision_cache_written_bytes_total") > 0
    assert metric(server, "internvl_vision_encode_seconds_count") >= 1
