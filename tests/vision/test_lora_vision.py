"""LoRA adapters in the vision service: an adapter that changes the vision tower or projector encodes with its own
weights (what PEFT computes) under keys of its own; a language-only adapter encodes as the base, under the base's
keys; tiles of different adapters share the encoder's micro-batches without changing one another's embeddings.

The reference is PEFT: `lora_reference.write_swift_adapter` returns the PEFT model the adapter was saved from, whose
`encode_images` runs InternViT, pixel shuffle and mlp1 through PEFT's LoRA layers at the original module names.
Everything runs in float32 on CPU with the in-process store.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers.media import encoded, gradient
from lora_reference import (
    INTERNLM2_TARGETS,
    QWEN2_TARGETS,
    VISION_AND_LANGUAGE_TARGETS,
    OriginalInternVL,
    unwrap,
    write_swift_adapter,
)

from services.contract.encoding import MediaItem, PreprocessOptions
from services.contract.errors import NotFoundError
from services.model.adapter_options import AdapterOptions
from services.vision.config import VisionConfig
from services.vision.memstore import InProcessRedis
from services.vision.preprocess import load_image
from services.vision.service import VisionService

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(300)]

TOL = 1e-4
OPTIONS = PreprocessOptions(max_num=2)  # a 900x500 image: a 2x1 grid and the thumbnail, 3 tiles
LANGUAGE_TARGETS = {"qwen2": QWEN2_TARGETS, "internlm2": INTERNLM2_TARGETS}


@dataclass
class World:
    directory: Path
    original: OriginalInternVL
    adapters: dict[str, tuple[Path, object]]  # "vl": vision and language; "lang": language only

    def reference(self, name: str, data: bytes) -> torch.Tensor:
        """What model `name` ("" the base) embeds `data` as under OPTIONS: [tiles * 256, llm_hidden]."""
        model = unwrap(self.adapters[name][1]) if name else self.original
        pixels = load_image(data, max_num=OPTIONS.max_num)
        with torch.no_grad():
            rows = model.encode_images(pixels)
        return rows.reshape(-1, rows.shape[-1])


@pytest.fixture(scope="module")
def world(tiny_checkpoint, tmp_path_factory):
    made: dict[tuple[str, str], World] = {}

    def get(llm: str = "qwen2", vision: str = "300m") -> World:
        if (llm, vision) not in made:
            directory = tiny_checkpoint(llm=llm, vision=vision)
            original = OriginalInternVL(directory)
            adapters = {
                "vl": write_swift_adapter(original, tmp_path_factory.mktemp("vl"),
                                          target_modules=VISION_AND_LANGUAGE_TARGETS, r=8, lora_alpha=32, seed=1),
                "lang": write_swift_adapter(original, tmp_path_factory.mktemp("lang"),
                                            target_modules=LANGUAGE_TARGETS[llm], r=4, lora_alpha=16, seed=2),
            }
            made[llm, vision] = World(Path(directory), original, adapters)
        return made[llm, vision]

    return get


@contextlib.asynccontextmanager
async def serving(world: World, **overrides):
    """A vision service with both adapters, the language-only one first (the vision slots count only those that
    touch the vision side)."""
    settings = {"model": str(world.directory), "dtype": "float32", "device": "cpu", "max_wait_ms": 2.0,
                "namespace": f"t{uuid.uuid4().hex[:12]}",
                "adapters": AdapterOptions(loras=tuple((name, str(world.adapters[name][0])) for name in ("lang", "vl"))),
                **overrides}
    service = await VisionService.load(VisionConfig(**settings), store=InProcessRedis())
    try:
        yield service
    finally:
        await service.close()


async def stored(service: VisionService, key: str) -> torch.Tensor:
    return (await service.fetch(key)).to_tensor()


def image(seed: int = 0) -> bytes:
    return encoded(gradient(900 + seed, 500))


@pytest.mark.parametrize(("llm", "vision"), [("qwen2", "300m"), ("internlm2", "6b")])
async def test_vision_adapter_encodes_as_peft_under_its_own_key(world, llm, vision):
    w = world(llm, vision)
    data = image()
    async with serving(w) as service:
        [base] = await service.encode([MediaItem.image(data)], OPTIONS)
        [adapted] = await service.encode([MediaItem.image(data)], OPTIONS, adapter="vl")
        base_rows, adapted_rows = await stored(service, base.key), await stored(service, adapted.key)
        info = service.model_info()
    assert (base.num_tiles, adapted.num_tiles) == (3, 3)
    assert not base.cache_hit and not adapted.cache_hit
    assert adapted.key != base.key
    assert info.key_identity("vl") != info.key_identity("")
    expected = w.reference("vl", data)
    assert adapted_rows.shape == expected.shape == (3 * 256, 64)
    torch.testing.assert_close(adapted_rows, expected, atol=TOL, rtol=0)
    torch.testing.assert_close(base_rows, w.reference("", data), atol=TOL, rtol=0)
    assert (adapted_rows - base_rows).abs().max() > 1e-2, "the adapter did not change the embeddings"


async def test_language_only_adapter_shares_the_base_keys_and_embeddings(world):
    w = world()
    first, second = image(0), image(1)
    async with serving(w) as service:
        assert service.model_info().key_identity("lang") == service.model_info().key_identity("")
        [base] = await service.encode([MediaItem.image(first)], OPTIONS)
        tiles = service.batcher.tiles_encoded
        [lang] = await service.encode([MediaItem.image(first)], OPTIONS, adapter="lang")
        assert lang.key == base.key and lang.cache_hit and not base.cache_hit
        assert service.batcher.tiles_encoded == tiles  # no encoder forward
        # And the other way round: what the language-only adapter encoded is the base's.
        [lang_first] = await service.encode([MediaItem.image(second)], OPTIONS, adapter="lang")
        [base_second] = await service.encode([MediaItem.image(second)], OPTIONS)
        assert base_second.key == lang_first.key and base_second.cache_hit and not lang_first.cache_hit
        torch.testing.assert_close(await stored(service, lang_first.key), w.reference("", second), atol=TOL, rtol=0)
        # The vision adapter's key is another one, and encoding it is a miss.
        [vl] = await service.encode([MediaItem.image(first)], OPTIONS, adapter="vl")
        assert vl.key != base.key and not vl.cache_hit


async def test_base_and_adapter_tiles_in_one_micro_batch_equal_their_solo_results(world):
    w = world()
    data = image()
    namespace = f"t{uuid.uuid4().hex[:12]}"  # both services' keys alike
    async with serving(w, namespace=namespace) as solo_service:
        [solo_base] = await solo_service.encode([MediaItem.image(data)], OPTIONS)
        solo_base_rows = await stored(solo_service, solo_base.key)
        [solo_vl] = await solo_service.encode([MediaItem.image(data)], OPTIONS, adapter="vl")
        solo_vl_rows = await stored(solo_service, solo_vl.key)
        assert all(stats.requests == 1 for stats in solo_service.batcher.history)

    async with serving(w, namespace=namespace, max_wait_ms=300, max_batch_tiles=64) as service:
        batches: list[list[int]] = []  # the slot of every tile, per encoder forward
        encoder = service.batcher._encoder

        def recording(pixels, slots):
            batches.append(list(slots))
            return encoder(pixels, slots)

        service.batcher._encoder = recording
        [base], [vl] = await asyncio.gather(service.encode([MediaItem.image(data)], OPTIONS),
                                            service.encode([MediaItem.image(data)], OPTIONS, adapter="vl"))
        base_rows, vl_rows = await stored(service, base.key), await stored(service, vl.key)
    assert batches == [[0, 0, 0, 1, 1, 1]] or batches == [[1, 1, 1, 0, 0, 0]], batches
    assert [(s.tiles, s.requests) for s in service.batcher.history] == [(6, 2)]
    assert (base.key, vl.key) == (solo_base.key, solo_vl.key)
    torch.testing.assert_close(base_rows, solo_base_rows, atol=1e-5, rtol=0)
    torch.testing.assert_close(vl_rows, solo_vl_rows, atol=1e-5, rtol=0)
    torch.testing.assert_close(vl_rows, w.reference("vl", data), atol=TOL, rtol=0)


async def test_unknown_adapter_is_not_found(world):
    w = world()
    async with serving(w) as service:
        with pytest.raises(NotFoundError, match="'nope'.*lang, vl"):
            await service.encode([MediaItem.image(image())], OPTIONS, adapter="nope")
        assert service.batcher.tiles_encoded == 0


async def test_model_info_lists_the_adapters(world):
    w = world()
    async with serving(w) as service:
        info = service.model_info()
    assert [(a.name, a.touches_vision, a.rank) for a in info.adapters] == [("lang", False, 4), ("vl", True, 8)]
    assert info.adapter("vl").digest != info.adapter("lang").digest
