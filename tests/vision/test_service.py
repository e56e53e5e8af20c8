"""The transport-free vision core on the tiny checkpoint: keys, cache behaviour, batching, validation, config."""

from __future__ import annotations

import argparse
import asyncio
import uuid

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
import torch
from helpers.media import encoded, gradient, png
from torch_kernels import Kernels

from services.contract.encoding import MediaItem, PreprocessOptions
from services.contract.errors import InvalidArgumentError, InvalidMediaError, NotFoundError
from services.model.checkpoint import open_checkpoint
from services.model.modules import load_vision
from services.runtime.embedding_store import encode_value
from services.vision import config as vision_config
from services.vision.config import VisionConfig
from services.vision.memstore import InProcessRedis
from services.vision.preprocess import load_image
from services.vision.service import VisionService

TOL = 1e-5


@pytest.fixture(scope="module")
def checkpoint_dir(tiny_checkpoint):
    return tiny_checkpoint()


@pytest.fixture(scope="module")
def reference(checkpoint_dir):
    """The in-process vision path: what every stored embedding must equal."""
    model = load_vision(open_checkpoint(checkpoint_dir), torch.float32, "cpu")

    def encode(source, max_num: int = 12, use_thumbnail: bool = True) -> torch.Tensor:
        pixels = load_image(source, max_num=max_num, use_thumbnail=use_thumbnail)
        return model.encode(pixels).reshape(-1, model.config.text_config.hidden_size)

    return encode


def make_config(checkpoint_dir, **overrides) -> VisionConfig:
    settings = {"model": str(checkpoint_dir), "dtype": "float32", "device": "cpu", "max_wait_ms": 2.0,
                "namespace": f"t{uuid.uuid4().hex[:12]}", **overrides}
    return VisionConfig(**settings)


@pytest_asyncio.fixture
async def service(checkpoint_dir):
    svc = await VisionService.load(make_config(checkpoint_dir), store=InProcessRedis())
    try:
        yield svc
    finally:
        await svc.close()


@pytest.mark.asyncio
async def test_encode_stores_what_the_vision_path_computes(service, reference):
    image = gradient(900, 500)
    data = encoded(image)
    [item] = await service.encode([MediaItem.image(data)], PreprocessOptions(max_num=4))
    assert (item.num_tiles, item.num_tokens, item.cache_hit) == (3, 3 * 256, False)  # 2x1 grid + thumbnail
    stored = (await service.fetch(item.key)).to_tensor()
    assert stored.shape == (3 * 256, 64) and stored.dtype == torch.float32
    assert (stored - reference(data, max_num=4)).abs().max().item() <= TOL

    # Cache on == cache off: the hit serves the very same numbers, and no encoder ran.
    tiles_before = service.batcher.tiles_encoded
    [again] = await service.encode([MediaItem.image(data)], PreprocessOptions(max_num=4))
    assert again.cache_hit and again.key == item.key and again.num_tiles == 3
    assert service.batcher.tiles_encoded == tiles_before
    assert torch.equal((await service.fetch(item.key)).to_tensor(), stored)


@pytest.mark.asyncio
async def test_frames_encode_like_the_same_pixels_as_a_file(service, reference):
    image = gradient(300, 200)
    frame = MediaItem.frame(image.tobytes(), height=200, width=300)
    [from_frame, from_file] = await service.encode([frame, MediaItem.image(encoded(image))],
                                                   PreprocessOptions(max_num=2, use_thumbnail=False))
    assert from_frame.key != from_file.key  # different media kinds, different content addresses
    a = (await service.fetch(from_frame.key)).to_tensor()
    b = (await service.fetch(from_file.key)).to_tensor()
    assert torch.equal(a, b)
    assert (a - reference(encoded(image), max_num=2, use_thumbnail=False)).abs().max().item() <= TOL


@pytest.mark.asyncio
async def test_defaults_come_from_the_model(service):
    data = encoded(gradient(1000, 700))
    [default] = await service.encode([MediaItem.image(data)])
    [explicit] = await service.encode([MediaItem.image(data)], PreprocessOptions(max_num=12, use_thumbnail=True))
    assert default.key == explicit.key and explicit.cache_hit and default.num_tiles == 7


@pytest.mark.asyncio
async def test_key_changes_with_every_input_that_changes_the_embeddings(tiny_checkpoint):
    base_dir = tiny_checkpoint()
    ppm = bytearray(encoded(gradient(640, 480), "PPM"))
    other = bytearray(ppm)
    other[-1] ^= 1  # one byte of one pixel: still a valid image
    services = {
        "base": await VisionService.load(make_config(base_dir, namespace="k"), store=InProcessRedis()),
        "seed": await VisionService.load(make_config(tiny_checkpoint(seed=1), namespace="k"), store=InProcessRedis()),
        "dtype": await VisionService.load(make_config(base_dir, namespace="k", dtype="bfloat16"),
                                          store=InProcessRedis()),
    }
    try:
        base = services["base"]
        key = base.key_for(MediaItem.image(bytes(ppm)), 12, True)
        assert key == base.key_for(MediaItem.image(bytes(ppm)), 12, True)
        variants = {
            "model": services["seed"].key_for(MediaItem.image(bytes(ppm)), 12, True),
            "dtype": services["dtype"].key_for(MediaItem.image(bytes(ppm)), 12, True),
            "max_num": base.key_for(MediaItem.image(bytes(ppm)), 6, True),
            "use_thumbnail": base.key_for(MediaItem.image(bytes(ppm)), 12, False),
            "one byte": base.key_for(MediaItem.image(bytes(other)), 12, True),
        }
        for what, variant in variants.items():
            assert variant != key, what
        assert len(set(variants.values())) == len(variants)
        assert services["seed"].checkpoint.fingerprint != base.checkpoint.fingerprint

        # The one-byte change is a real, different image to the encoder as well.
        [a, b] = await base.encode([MediaItem.image(bytes(ppm)), MediaItem.image(bytes(other))])
        assert (a.key, b.key) == (key, variants["one byte"])
    finally:
        for svc in services.values():
            await svc.close()


@pytest.mark.asyncio
async def test_frame_keys_include_the_shape(service):
    rgb = bytes(range(256)) * 9  # 2304 bytes = 768 pixels
    a = service.key_for(MediaItem.frame(rgb, 24, 32), 12, True)
    b = service.key_for(MediaItem.frame(rgb, 32, 24), 12, True)
    assert a != b


@pytest.mark.asyncio
async def test_concurrent_requests_for_one_missing_image_encode_it_once(service):
    data = encoded(gradient(800, 600))
    results = await asyncio.gather(*(service.encode([MediaItem.image(data)], PreprocessOptions(max_num=2))
                                     for _ in range(5)))
    keys = {r[0].key for r in results}
    assert len(keys) == 1
    assert service.cache.computes == 1
    assert service.batcher.tiles_encoded == results[0][0].num_tiles
    # The same image twice in one request is one encode too.
    [x, y] = await service.encode([MediaItem.image(data), MediaItem.image(data)], PreprocessOptions(max_num=2))
    assert x.key == y.key and x.cache_hit and y.cache_hit


@pytest.mark.asyncio
async def test_tiles_of_concurrent_requests_are_batched_and_split_back(checkpoint_dir, reference):
    svc = await VisionService.load(make_config(checkpoint_dir, max_wait_ms=300, max_batch_tiles=64),
                                   store=InProcessRedis())
    try:
        images = [encoded(gradient(448 * (i + 1), 448)) for i in range(4)]  # 1, 3, 4, 5 tiles
        results = await asyncio.gather(*(svc.encode([MediaItem.image(d)], PreprocessOptions(max_num=4))
                                         for d in images))
        assert [r[0].num_tiles for r in results] == [1, 3, 4, 5]
        assert any(stats.requests >= 2 for stats in svc.batcher.history)
        for data, [item] in zip(images, results, strict=True):
            stored = (await svc.fetch(item.key)).to_tensor()
            assert (stored - reference(data, max_num=4)).abs().max().item() <= TOL
    finally:
        await svc.close()


@pytest.mark.asyncio
async def test_an_image_larger_than_a_batch_is_split_across_forwards(checkpoint_dir, reference):
    svc = await VisionService.load(make_config(checkpoint_dir, max_batch_tiles=4), store=InProcessRedis())
    try:
        data = encoded(gradient(1000, 700))
        [item] = await svc.encode([MediaItem.image(data)])
        assert item.num_tiles == 7
        assert [s.tiles for s in svc.batcher.history][-2:] == [4, 3]
        stored = (await svc.fetch(item.key)).to_tensor()
        assert (stored - reference(data)).abs().max().item() <= TOL
    finally:
        await svc.close()


@pytest.mark.asyncio
async def test_torch_kernels_run_on_the_encoder_thread_only(checkpoint_dir, reference):
    """On CPU each thread that runs a parallel torch kernel gets an OpenMP team of its own; with more such workers
    than CPUs libgomp stops spin-waiting, and the encoder's forwards slow down. So loading, warming up, the event
    loop (joining a request split over batches included) and preprocessing run no torch kernel of their own."""
    data = encoded(gradient(1000, 700))
    on_loop, in_pool = Kernels(), Kernels()
    with on_loop:
        svc = await VisionService.load(make_config(checkpoint_dir, max_batch_tiles=4), store=InProcessRedis())
        preprocess = svc._preprocess

        def recorded(*args):
            with in_pool:
                return preprocess(*args)

        svc._preprocess = recorded
        try:
            await svc.warm_up()
            [item] = await svc.encode([MediaItem.image(data)])
            assert [s.tiles for s in svc.batcher.history][-2:] == [4, 3]
            [again] = await svc.encode([MediaItem.image(data)])
            assert again.cache_hit
            stored = await svc.fetch(item.key)
        finally:
            await svc.close()
    assert on_loop.ops == [] and in_pool.ops == []
    assert (stored.to_tensor() - reference(data)).abs().max().item() <= TOL


@pytest_asyncio.fixture
async def redis_client(redis_url):
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.mark.asyncio
async def test_corrupt_or_foreign_values_are_re_encoded(checkpoint_dir, redis_url, redis_client, reference):
    svc = await VisionService.load(make_config(checkpoint_dir), store=aioredis.Redis.from_url(redis_url))
    try:
        data = encoded(gradient(500, 500))
        [item] = await svc.encode([MediaItem.image(data)], PreprocessOptions(max_num=2))
        good = await redis_client.get(item.key)
        bad_values = [
            good[:-1] + bytes([good[-1] ^ 0xFF]),  # one flipped bit pattern in the payload
            good[: len(good) // 2],  # truncated
            b"not an embedding",
            encode_value(torch.zeros(item.num_tokens, 64), "another-model"),
        ]
        for bad in bad_values:
            await redis_client.set(item.key, bad)
            computes = svc.cache.computes
            [again] = await svc.encode([MediaItem.image(data)], PreprocessOptions(max_num=2))
            assert not again.cache_hit and svc.cache.computes == computes + 1
            assert await redis_client.get(item.key) == good  # rewritten, and deterministic
        assert svc.cache.corrupt == len(bad_values)
        stored = (await svc.fetch(item.key)).to_tensor()
        assert (stored - reference(data, max_num=2)).abs().max().item() <= TOL
        # A well-formed value of the wrong shape (only a bug writes one) is not trusted either.
        await redis_client.set(item.key, encode_value(torch.zeros(100, 64), svc.checkpoint.fingerprint))
        [fixed] = await svc.encode([MediaItem.image(data)], PreprocessOptions(max_num=2))
        assert fixed.num_tiles == item.num_tiles and await redis_client.get(item.key) == good
        assert await redis_client.ttl(item.key) > 0  # written with the configured TTL
    finally:
        await redis_client.delete(item.key)
        await svc.close()


@pytest.mark.asyncio
async def test_lookup_and_fetch(service):
    [item] = await service.encode([MediaItem.image(png(100, 80))], PreprocessOptions(max_num=1))
    absent = item.key[:-4] + "0000"
    assert await service.lookup([item.key, absent, item.key]) == [True, False, True]
    assert await service.lookup([]) == []
    with pytest.raises(NotFoundError, match="encode it again"):
        await service.fetch(absent)
    with pytest.raises(InvalidArgumentError, match=r"keys\[1\]") as info:
        await service.lookup([item.key, "session:secret"])
    assert info.value.item_index == 1
    with pytest.raises(InvalidArgumentError):
        await service.fetch("some:other:key")


GOOD = MediaItem.image(png(64, 64))  # a small square stays one tile


@pytest.mark.parametrize(("items", "options", "error", "index", "message"), [
    ([], PreprocessOptions(), InvalidArgumentError, None, "no items"),
    ([GOOD] * 9, PreprocessOptions(), InvalidArgumentError, None, "at most 8"),
    ([GOOD], PreprocessOptions(max_num=0), InvalidArgumentError, None, "max_num must be between 1 and 40"),
    ([GOOD], PreprocessOptions(max_num=41), InvalidArgumentError, None, "max_num must be between 1 and 40"),
    ([GOOD, MediaItem("", b"")], PreprocessOptions(), InvalidArgumentError, 1, "neither image_bytes nor frame"),
    ([GOOD, MediaItem.image(b"")], PreprocessOptions(), InvalidMediaError, 1, "empty"),
    ([GOOD, MediaItem.image(b"GIF89a but not really")], PreprocessOptions(), InvalidMediaError, 1, "cannot decode"),
    ([GOOD, MediaItem.image(png(64, 64)[:-40])], PreprocessOptions(), InvalidMediaError, 1, "cannot decode"),
    ([GOOD, MediaItem.image(png(101, 100))], PreprocessOptions(), InvalidMediaError, 1, "above the limit of 10000"),
    ([GOOD, MediaItem.frame(b"\0" * 11, 2, 2)], PreprocessOptions(), InvalidMediaError, 1, "has 12 bytes, got 11"),
    ([GOOD, MediaItem.frame(b"", 0, 2)], PreprocessOptions(), InvalidMediaError, 1, "must be positive"),
    ([GOOD, MediaItem.frame(b"\0" * 30300, 101, 100)], PreprocessOptions(), InvalidMediaError, 1, "above the limit"),
], ids=["empty", "too-many", "max_num-0", "max_num-41", "unset", "empty-bytes", "not-an-image", "truncated",
        "pixel-limit", "frame-size", "frame-shape", "frame-pixel-limit"])
@pytest.mark.asyncio
async def test_bad_input_names_the_item(checkpoint_dir, items, options, error, index, message):
    svc = await VisionService.load(make_config(checkpoint_dir, max_items=8, max_image_pixels=10_000),
                                   store=InProcessRedis())
    try:
        with pytest.raises(error, match=message) as info:
            await svc.encode(items, options)
        assert info.value.item_index == index
        if index is not None:
            assert str(info.value).startswith(f"items[{index}]: ")
        [ok] = await svc.encode([GOOD])  # still serving
        assert ok.num_tiles == 1
    finally:
        await svc.close()


@pytest.mark.asyncio
async def test_requests_sharing_a_bad_image_each_get_their_own_index(service):
    bad = MediaItem.image(b"\x89PNG\r\n\x1a\n garbage")
    first, second = await asyncio.gather(service.encode([bad]), service.encode([GOOD, GOOD, bad]),
                                         return_exceptions=True)
    assert isinstance(first, InvalidMediaError) and first.item_index == 0
    assert isinstance(second, InvalidMediaError) and second.item_index == 2
    assert str(second).startswith("items[2]: ")


def test_in_process_store_evicts_lru_and_expires():
    now = [0.0]
    store = InProcessRedis(max_bytes=10, clock=lambda: now[0])

    async def scenario():
        await store.set("a", b"1234")
        await store.set("b", b"5678", ex=5)
        assert await store.get("a") == b"1234"  # a is now the most recently used
        await store.set("c", b"90")
        await store.set("d", b"xy")  # 12 > 10 bytes: evicts b, the least recently used
        assert await store.exists("a", "b", "c", "d") == 3 and store.evictions == 1
        await store.set("e", b"!", ex=5)
        assert await store.ttl("e") == 5 and await store.ttl("a") == -1 and await store.ttl("zz") == -2
        now[0] = 6.0
        assert await store.get("e") is None
        async with store.pipeline(transaction=False) as pipe:
            pipe.exists("a")
            pipe.exists("e")
            assert await pipe.execute() == [1, 0]
        assert await store.delete("a", "zz") == 1
        assert store.used_bytes == 4

    asyncio.run(scenario())


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    vision_config.add_arguments(parser)
    return parser.parse_args(["--model", "m", "--port", "0", *argv])


def test_config_from_args_and_environment():
    config = VisionConfig.from_args(_parse("--max-batch-tiles", "16", "--cache-ttl-s", "0"),
                                    environ={"INTERNVL_REDIS_URL": "redis://cache:6379/0"})
    assert config.redis_url == "redis://cache:6379/0"
    assert config.max_batch_tiles == 16 and config.cache_ttl_s is None
    flag_wins = VisionConfig.from_args(_parse("--redis-url", "redis://other:1/0"),
                                       environ={"INTERNVL_REDIS_URL": "redis://cache:6379/0"})
    assert flag_wins.redis_url == "redis://other:1/0"
    assert VisionConfig.from_args(_parse(), environ={}).redis_url is None
    with pytest.raises(Exception):  # noqa: B017 - frozen dataclass
        config.max_batch_tiles = 1  # type: ignore[misc]


@pytest.mark.parametrize("argv", [("--max-batch-tiles", "0"), ("--max-wait-ms", "-1"), ("--max-items", "0"),
                                  ("--namespace", "a:b"), ("--max-image-pixels", "0"), ("--cache-ttl-s", "-5")])
def test_config_rejects_bad_values(argv):
    with pytest.raises(InvalidArgumentError):
        VisionConfig.from_args(_parse(*argv), environ={})


def test_chunk_size_is_capped_below_the_message_limit():
    config = VisionConfig(model="m")
    assert config.chunk_bytes(0) == 1 << 20
    assert config.chunk_bytes(8192) == 8192
    assert config.chunk_bytes(1 << 30) < config.server.max_message_bytes
    for bad in (-1, 1, 4095):
        with pytest.raises(InvalidArgumentError):
            config.chunk_bytes(bad)


def test_store_without_a_redis_url_is_in_process_and_redis_errors_are_one_line():
    from services.contract.errors import NotReadyError
    from services.vision.service import connect_store

    assert isinstance(asyncio.run(connect_store(VisionConfig(model="m"))), InProcessRedis)
    with pytest.raises(NotReadyError) as info:
        asyncio.run(connect_store(VisionConfig(model="m", redis_url="redis://:hunter2@127.0.0.1:1/0")))
    assert "hunter2" not in str(info.value) and "redis://:***@127.0.0.1:1/0" in str(info.value)


@pytest.mark.asyncio
async def test_fetch_with_the_item_encodes_what_the_cache_lost(service):
    """FetchEmbeddings given the image: the rows even when the cache no longer holds them (encoded again, stored
    again), equal to what Encode stored; a key that is not the item's is refused."""
    data = png(300, 200)
    options = PreprocessOptions(max_num=2)
    [item] = await service.encode([MediaItem.image(data)], options)
    stored = (await service.fetch(item.key)).to_tensor()
    await service.store.delete(item.key)
    tiles = service.batcher.tiles_encoded
    fetched = await service.fetch_or_encode(item.key, MediaItem.image(data), options)
    assert torch.equal(fetched.to_tensor(), stored)
    assert service.batcher.tiles_encoded - tiles == item.num_tiles
    assert await service.lookup([item.key]) == [True]  # stored again for the next reader
    # Present: read, not encoded.
    assert torch.equal((await service.fetch_or_encode(item.key, MediaItem.image(data), options)).to_tensor(), stored)
    assert service.batcher.tiles_encoded - tiles == item.num_tiles
    with pytest.raises(InvalidArgumentError, match="not the key of the item"):
        await service.fetch_or_encode(item.key, MediaItem.image(data), PreprocessOptions(max_num=1))


@pytest.mark.asyncio
async def test_fetch_with_the_item_encodes_under_the_salt_its_key_was_made_with(service):
    """A tenant's salted key (Encode with key_salt) is re-encoded by FetchEmbeddings given the same salt; without the
    salt the key is not the item's."""
    data = png(200, 300)
    options = PreprocessOptions(max_num=2)
    [item] = await service.encode([MediaItem.image(data)], options, key_salt="tenant-a")
    [unsalted] = await service.encode([MediaItem.image(data)], options)
    assert item.key != unsalted.key
    stored = (await service.fetch(item.key)).to_tensor()
    await service.store.delete(item.key)
    fetched = await service.fetch_or_encode(item.key, MediaItem.image(data), options, key_salt="tenant-a")
    assert torch.equal(fetched.to_tensor(), stored)
    with pytest.raises(InvalidArgumentError, match="not the key of the item"):
        await service.fetch_or_encode(item.key, MediaItem.image(data), options)
