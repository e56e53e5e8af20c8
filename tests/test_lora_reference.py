"""The LoRA parity reference itself: OriginalInternVL reproduces the independent forwards (reference_impl, and
transformers' Qwen2) from the original weight names, and write_swift_adapter writes a real, non-trivial adapter in
ms-swift's layout whose merged and unmerged forms agree."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from lora_reference import (
    INTERNLM2_TARGETS,
    QWEN2_TARGETS,
    VISION_AND_LANGUAGE_TARGETS,
    OriginalInternVL,
    unwrap,
    write_swift_adapter,
)
from reference_impl import internlm2_logits, internvit_forward, read_original
from safetensors import safe_open
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

TARGETS = {"internlm2": INTERNLM2_TARGETS, "qwen2": QWEN2_TARGETS}
PROMPT = torch.tensor([1, 5, 100, 2000, 77, 9, 151644, 3000])  # [N]: arbitrary ids, one of them a special token


@pytest.fixture(scope="module")
def original(tiny_checkpoint):
    """Factory: original(llm, vision="300m") -> OriginalInternVL, built once per module and parameter set."""
    made: dict[tuple[str, str], OriginalInternVL] = {}

    def build(llm: str, vision: str = "300m") -> OriginalInternVL:
        if (llm, vision) not in made:
            made[llm, vision] = OriginalInternVL(tiny_checkpoint(llm=llm, vision=vision))
        return made[llm, vision]

    return build


def pixels(tiles: int, seed: int = 0) -> torch.Tensor:
    """[tiles, 3, 448, 448], roughly the range of normalised images."""
    return torch.randn(tiles, 3, 448, 448, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("llm", ["qwen2", "internlm2"])
@pytest.mark.parametrize("vision", ["300m", "6b"])
def test_parameter_names_are_the_checkpoints(tiny_checkpoint, original, llm, vision):
    _, weights = read_original(tiny_checkpoint(llm=llm, vision=vision))
    params = dict(original(llm, vision).named_parameters())
    assert set(params) == set(weights)
    for name, tensor in weights.items():
        assert torch.equal(params[name], tensor), name


def test_internlm2_logits_match_reference_impl(tiny_checkpoint, original):
    config, weights = read_original(tiny_checkpoint(llm="internlm2"))
    model = original("internlm2")
    ours = model.logits(model.embed(PROMPT))
    expected = internlm2_logits(config, weights, PROMPT[None])[0]
    assert ours.shape == (len(PROMPT), config["llm_config"]["vocab_size"])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("llm", "vision"), [("internlm2", "300m"), ("qwen2", "6b")])
def test_encode_images_matches_internvit_forward(tiny_checkpoint, original, llm, vision):
    config, weights = read_original(tiny_checkpoint(llm=llm, vision=vision))
    tiles = pixels(2)
    ours = original(llm, vision).encode_images(tiles)
    assert ours.shape == (2, 256, config["llm_config"]["hidden_size"])
    torch.testing.assert_close(ours, internvit_forward(config, weights, tiles), atol=1e-5, rtol=0)


def test_qwen2_logits_match_transformers(tiny_checkpoint):
    config, weights = read_original(tiny_checkpoint(llm="qwen2"))
    lc = config["llm_config"]
    hf_config = Qwen2Config(
        vocab_size=lc["vocab_size"], hidden_size=lc["hidden_size"], intermediate_size=lc["intermediate_size"],
        num_hidden_layers=lc["num_hidden_layers"], num_attention_heads=lc["num_attention_heads"],
        num_key_value_heads=lc["num_key_value_heads"], rms_norm_eps=lc["rms_norm_eps"],
        max_position_embeddings=lc["max_position_embeddings"], tie_word_embeddings=lc["tie_word_embeddings"],
        rope_parameters={"rope_type": "default", "rope_theta": lc["rope_theta"]}, use_sliding_window=False,
        attn_implementation="eager")
    hf = Qwen2ForCausalLM(hf_config).eval()
    hf.load_state_dict({k.removeprefix("language_model."): v for k, v in weights.items()
                        if k.startswith("language_model.")}, strict=True)
    model = OriginalInternVL(tiny_checkpoint(llm="qwen2"))
    with torch.no_grad():
        expected = hf(input_ids=PROMPT[None]).logits[0]
    torch.testing.assert_close(model.logits(model.embed(PROMPT)), expected, atol=1e-5, rtol=0)


def test_greedy_follows_the_logits(original):
    model = original("qwen2")
    prompt = model.embed(PROMPT)
    tokens, top = model.greedy(prompt, max_new_tokens=3, top_k=4)
    assert len(tokens) == len(top) == 3
    # Step by step: each token is the argmax given the previous ones, and top lists the best log-probabilities.
    ids = PROMPT
    for token, alternatives in zip(tokens, top, strict=True):
        logprobs = torch.log_softmax(model.logits(model.embed(ids))[-1], -1)
        assert token == int(logprobs.argmax()) == alternatives[0][0]
        assert len(alternatives) == 4
        assert [v for _, v in alternatives] == sorted((v for _, v in alternatives), reverse=True)
        for token_id, value in alternatives:
            assert value == pytest.approx(float(logprobs[token_id]), abs=1e-5)
        ids = torch.cat([ids, torch.tensor([token])])
    # Stopping on stop_id: it is generated, then decoding ends.
    stopped, stopped_top = model.greedy(prompt, max_new_tokens=3, stop_id=tokens[1], top_k=2)
    assert stopped == tokens[:2] and len(stopped_top) == 2


@pytest.mark.parametrize("llm", ["internlm2", "qwen2"])
def test_adapter_changes_logits_and_merges_to_the_same(tmp_path, original, llm):
    base = original(llm)
    before = base.logits(base.embed(PROMPT))
    _, adapted = write_swift_adapter(base, tmp_path, target_modules=TARGETS[llm], seed=1)
    reference = unwrap(adapted)
    assert reference is adapted.base_model.model
    after = reference.logits(reference.embed(PROMPT))
    assert (after - before).abs().max() > 1e-2, "the adapter is a no-op"
    # write_swift_adapter wrapped a copy: the base model is untouched.
    torch.testing.assert_close(base.logits(base.embed(PROMPT)), before, atol=0, rtol=0)
    merged = unwrap(copy.deepcopy(adapted).merge_and_unload())
    assert isinstance(merged, OriginalInternVL)
    assert not any("lora" in name for name, _ in merged.named_modules())
    torch.testing.assert_close(merged.logits(merged.embed(PROMPT)), after, atol=1e-5, rtol=0)
    merged_tokens, _ = merged.greedy(merged.embed(PROMPT), max_new_tokens=3)
    assert merged_tokens == reference.greedy(reference.embed(PROMPT), max_new_tokens=3)[0]


@pytest.mark.parametrize("llm", ["internlm2", "qwen2"])
def test_vision_and_language_targets_wrap_every_linear(tmp_path, original, llm):
    base = original(llm)
    _, adapted = write_swift_adapter(base, tmp_path, target_modules=VISION_AND_LANGUAGE_TARGETS)
    wrapped = {name.removeprefix("base_model.model.") for name, module in adapted.named_modules()
               if hasattr(module, "lora_A")}
    linears = {name for name, module in base.named_modules() if isinstance(module, nn.Linear)}
    # Every linear but Qwen2's lm_head, which ms-swift's Qwen2 targets leave out as well.
    assert wrapped == linears - {"language_model.lm_head"}
    assert any(name.startswith("vision_model.") for name in wrapped) and {"mlp1.1", "mlp1.3"} <= wrapped

    tiles = pixels(1)
    reference = unwrap(adapted)
    after = reference.encode_images(tiles)
    assert (after - base.encode_images(tiles)).abs().max() > 1e-3
    merged = unwrap(copy.deepcopy(adapted).merge_and_unload())
    torch.testing.assert_close(merged.encode_images(tiles), after, atol=1e-5, rtol=0)


@pytest.mark.parametrize("llm", ["internlm2", "qwen2"])
def test_swift_layout(tmp_path, tiny_checkpoint, original, llm):
    checkpoint, adapted = write_swift_adapter(original(llm), tmp_path, target_modules=TARGETS[llm], r=4,
                                              lora_alpha=16)
    assert checkpoint == tmp_path / "v0-20261202-101010" / "checkpoint-10"
    for name in ("adapter_config.json", "adapter_model.safetensors", "args.json", "additional_config.json",
                 "trainer_state.json"):
        assert (checkpoint / name).is_file(), name
    assert (checkpoint.parent / "args.json").is_file()

    adapter_config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert adapter_config["target_modules"] == TARGETS[llm]
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 16
    assert adapter_config["peft_type"] == "LORA" and adapter_config["task_type"] == "CAUSAL_LM"
    assert adapter_config["base_model_name_or_path"] == str(tiny_checkpoint(llm=llm))
    args = json.loads((checkpoint / "args.json").read_text())
    assert args["train_type"] == "lora" and args["lora_rank"] == 4 and args["lora_alpha"] == 16
    assert args["target_regex"] == TARGETS[llm]
    assert json.loads((checkpoint / "additional_config.json").read_text()) == {
        "lora_dtype": None, "lorap_lr_ratio": None, "lorap_emb_lr": 1e-06}
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 10

    with safe_open(checkpoint / "adapter_model.safetensors", framework="pt") as reader:
        keys = set(reader.keys())
        tensors = {key: reader.get_tensor(key) for key in keys}
    first = ("base_model.model.language_model.model.layers.0.attention.wqkv" if llm == "internlm2"
             else "base_model.model.language_model.model.layers.0.self_attn.q_proj")
    assert {first + ".lora_A.weight", first + ".lora_B.weight"} <= keys
    key_format = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(A|B)\.weight")
    for key in keys:
        match = key_format.fullmatch(key)
        assert match, key  # no adapter name ("default") in the keys
        assert re.fullmatch(TARGETS[llm], match["module"]), key
    # The saved tensors are the (non-zero) weights of the reference model, rank 4.
    params = dict(adapted.named_parameters())
    for key, tensor in tensors.items():
        assert torch.equal(params[key.replace(".weight", ".default.weight")], tensor), key
        assert 4 in tensor.shape and tensor.abs().max() > 0
