"""The adapters vLLM is given (services.llm.engine.vllm.adapters): each adapter's language part in a private copy, in
vLLM's module names, and vLLM's LoRA sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lora_reference import (
    INTERNLM2_TARGETS,
    VISION_AND_LANGUAGE_TARGETS,
    OriginalInternVL,
    write_swift_adapter,
)
from safetensors.torch import load_file

from services.contract.errors import InvalidArgumentError
from services.llm.engine.vllm.adapters import check_adapters, lora_rank, write_language_copies
from services.model.adapters import Adapter, read_adapter
from services.model.checkpoint import open_checkpoint

VISION_ONLY = r"^(mlp1\.(1|3)|vision_model\.encoder\.layers\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2)))$"


@pytest.fixture(scope="module")
def written(tiny_checkpoint, tmp_path_factory):
    """name -> (directory, Adapter as read): InternLM2 adapters of every side."""
    directory = tiny_checkpoint(llm="internlm2")
    original = OriginalInternVL(directory)
    checkpoint = open_checkpoint(directory)
    specs = {"language": INTERNLM2_TARGETS, "both": VISION_AND_LANGUAGE_TARGETS, "vision": VISION_ONLY}
    out = {}
    for name, targets in specs.items():
        path, _ = write_swift_adapter(original, tmp_path_factory.mktemp(name), target_modules=targets, r=4,
                                      lora_alpha=16, use_rslora=name == "both", seed=len(out))
        out[name] = (path, read_adapter(name, path, checkpoint, max_rank=64))
    return out


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_each_copy_is_the_language_part_in_vllms_names(written, tmp_path):
    before = {name: files(path) for name, (path, _) in written.items()}
    copies = write_language_copies([adapter for _, adapter in written.values()], tmp_path)
    assert sorted(copies) == ["both", "language"]  # the vision-only adapter computes with the base here
    assert [copies["language"].lora_id, copies["both"].lora_id] == [1, 2]
    for name, copy in copies.items():
        adapter = written[name][1]
        assert copy.path.parent == tmp_path
        config = json.loads((copy.path / "adapter_config.json").read_text())
        assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_rslora"]) == (
            "LORA", 4, 16.0, name == "both")
        weights = load_file(copy.path / "adapter_model.safetensors")
        language = {m: ab for m, ab in adapter.modules.items() if m.startswith("language_model.")}
        assert len(weights) == 2 * len(language) and any(m.startswith("vision_model.") for m in adapter.modules) == (
            name == "both")
        for module, (a, b) in language.items():
            renamed = "language_model.lm_head" if module == "language_model.output" else module
            assert torch.equal(weights[f"base_model.model.{renamed}.lora_A.weight"], a)
            assert torch.equal(weights[f"base_model.model.{renamed}.lora_B.weight"], b)
        assert sorted(config["target_modules"]) == sorted(
            key.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for key in weights if "lora_A" in key)
        assert "language_model.lm_head" in config["target_modules"]  # InternLM2's head, `output` in the checkpoint
    assert {name: files(path) for name, (path, _) in written.items()} == before  # the user's directories untouched


@pytest.mark.parametrize(("ranks", "rank"), [((), 1), ((1,), 1), ((4, 8), 8), ((9,), 16), ((16, 64), 64),
                                             ((300,), 320), ((512,), 512)])
def test_vllms_rank_is_the_smallest_it_takes_that_holds_the_largest(ranks, rank):
    assert lora_rank([Adapter(f"a{i}", Path("."), r, 8.0, False, {}, "") for i, r in enumerate(ranks)]) == rank


def test_a_rank_vllm_cannot_hold_is_refused_by_name():
    check_adapters([Adapter("fine", Path("."), 512, 8.0, False, {}, "")])
    with pytest.raises(InvalidArgumentError, match="--lora big: rank 1024 is over the vLLM engine's largest LoRA "
                                                   "rank \\(512\\)"):
        check_adapters([Adapter("big", Path("."), 1024, 8.0, False, {}, "")])
