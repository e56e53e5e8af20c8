"""The baseline: transformers' native `InternVLForConditionalGeneration` on the same weights, used as the seed's
`model.chat` (one request at a time, images re-encoded every turn) and `batch_chat` (one left-padded batch).

The native model is assembled from the project's loader output without copying a weight: the loader's
`vision_tower.*`, `multi_modal_projector.*` and Qwen2/Llama `model.*` / `lm_head.*` modules are exactly the native
model's `model.vision_tower`, `model.multi_modal_projector`, `model.language_model` and `lm_head` (the names
`tests/reference_impl.py:to_native_state_dict` maps the original weights to). The project's in-process reference
path (`InternVLChat`, scenario 4) shares the same modules, so one copy of the weights serves both.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import InternVLForConditionalGeneration
from transformers.generation.streamers import BaseStreamer

from services.contract import template
from services.model.chat import InternVLChat
from services.model.checkpoint import open_checkpoint
from services.model.modules import load_language_model, load_tokenizer, load_vision


@dataclass
class Generation:
    """One generate call: per row, the new token ids (up to and including the stop token) and timings."""

    ids: list[list[int]]
    started: float
    # Monotonic time at which each decoding step's tokens came out (one entry per step, all rows at once).
    step_times: list[float] = field(default_factory=list)
    finished: float = 0.0

    @property
    def ttft_s(self) -> float:
        return self.step_times[0] - self.started

    @property
    def total_s(self) -> float:
        return self.finished - self.started

    @property
    def tokens(self) -> int:
        return sum(len(row) for row in self.ids)

    @property
    def decode_s(self) -> float:
        """From the first token to the last: the decode phase."""
        return self.step_times[-1] - self.step_times[0] if len(self.step_times) > 1 else 0.0


class _TimingStreamer(BaseStreamer):
    """Records when each step's tokens come out; the first `put` is the prompt itself."""

    def __init__(self, record: Generation):
        self.record = record
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.record.step_times.append(time.perf_counter())

    def end(self) -> None:
        self.record.finished = time.perf_counter()


class Baseline:
    def __init__(self, model: str, dtype: torch.dtype, device: str):
        checkpoint = open_checkpoint(model)
        vision = load_vision(checkpoint, dtype, device)
        language_model = load_language_model(checkpoint, dtype, device)
        tokenizer = load_tokenizer(checkpoint)
        self.chat = InternVLChat(checkpoint, vision, language_model, tokenizer)
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = dtype
        self.stop_id = self.chat.stop_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_id
        config = checkpoint.spec.internvl_hf_config()
        config.image_token_id = self.chat.img_context_id
        # Built on the meta device, then every submodule is replaced by the loaded one: no weight is allocated twice.
        with torch.device("meta"):
            native = InternVLForConditionalGeneration(config)
        native.model.vision_tower = vision.vision_tower
        native.model.multi_modal_projector = vision.multi_modal_projector
        native.model.language_model = language_model.model
        native.lm_head = language_model.lm_head
        leftover = [n for n, t in [*native.named_parameters(), *native.named_buffers()] if t.is_meta]
        if leftover:
            raise RuntimeError(f"native model still has unloaded tensors, e.g. {leftover[0]}")
        self.native = native.eval()

    @property
    def vision(self):
        return self.chat.vision

    @property
    def language_model(self):
        return self.chat.language_model

    # -------------------------------------------------------------------------------------------- prompts

    def prompt(self, question: str, history: Sequence[tuple[str, str]] | None,
               num_patches_list: Sequence[int]) -> tuple[str, str]:
        """(question as stored in history, expanded prompt): the original `chat()`'s prompt rules."""
        return self.chat.build_prompt(question, history, num_patches_list)

    def mixed_prompt(self, question: str, num_patches_list: Sequence[int]) -> str:
        """The expanded prompt of a first turn with these images (tiles per image), as the gateway renders such a
        request: `<image>\\n` before the question for one image, `Image-1: <image>\\nImage-2: ...` for several."""
        text = template.multi_image_prefix(len(num_patches_list)) + question if len(num_patches_list) > 1 \
            else question
        return self.prompt(text, None, num_patches_list)[1]

    def answer_text(self, ids: list[int]) -> str:
        return template.clean_response(self.tokenizer.decode(ids, skip_special_tokens=True))

    # ------------------------------------------------------------------------------------------ generation

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], pixel_values: torch.Tensor | None, max_new_tokens: int) -> Generation:
        """Greedy `generate` of the native model over one prompt, or several left-padded as `batch_chat` does."""
        record = Generation(ids=[], started=time.perf_counter())
        self.tokenizer.padding_side = "left"
        batch = self.tokenizer(list(prompts), return_tensors="pt", padding=len(prompts) > 1)
        input_ids = batch.input_ids.to(self.device)
        kwargs = {}
        if pixel_values is not None:
            kwargs["pixel_values"] = pixel_values.to(self.device, self.dtype)
        out = self.native.generate(input_ids=input_ids, attention_mask=batch.attention_mask.to(self.device),
                                   max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=self.stop_id,
                                   pad_token_id=self.pad_id, streamer=_TimingStreamer(record), **kwargs)
        if record.finished == 0.0:
            record.finished = time.perf_counter()
        for row in out[:, input_ids.shape[1]:].tolist():
            ids = []
            for token in row:
                ids.append(token)
                if token == self.stop_id:
                    break
            record.ids.append(ids)
        return record

    def chat_turn(self, pixel_values: torch.Tensor | None, question: str, history: list[tuple[str, str]] | None,
                  max_new_tokens: int) -> tuple[Generation, list[tuple[str, str]]]:
        """The original `chat(..., history=history, return_history=True)`: re-encodes every image of the
        conversation and prefills the whole history again."""
        counts = [pixel_values.shape[0]] if pixel_values is not None else []
        stored, prompt = self.prompt(question, history, counts)
        generation = self.generate([prompt], pixel_values, max_new_tokens)
        return generation, [*(history or []), (stored, self.answer_text(generation.ids[0]))]

    def batch_chat(self, pixel_values: Sequence[torch.Tensor], questions: Sequence[str],
                   max_new_tokens: int) -> Generation:
        """The original `batch_chat`: one image per question, all prompts left-padded into one generate."""
        prompts = [self.prompt(q, None, [p.shape[0]])[1] for p, q in zip(pixel_values, questions, strict=True)]
        return self.generate(prompts, torch.cat(list(pixel_values)), max_new_tokens)

    # ------------------------------------------------------------------------------------------ bare modules

    @torch.inference_mode()
    def bare_decode_step_s(self, context_tokens: int, steps: int) -> list[float]:
        """Seconds of single-token forwards of the bare language model after a `context_tokens` prefill."""
        lm = self.language_model
        ids = torch.randint(0, 1000, (1, context_tokens), device=self.device)
        out = lm(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache, token, times = out.past_key_values, ids[:, -1:], []
        for _ in range(steps + 1):
            started = time.perf_counter()
            out = lm(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - started)
            cache = out.past_key_values
        return times[1:]

    @torch.inference_mode()
    def bare_tile_s(self, tiles: int) -> float:
        """Seconds per tile of one forward of the bare vision path over `tiles` random tiles."""
        pixels = torch.randn(tiles, 3, self.chat.checkpoint.spec.image_size, self.chat.checkpoint.spec.image_size)
        self.vision.encode(pixels)  # warm-up at this batch size
        started = time.perf_counter()
        self.vision.encode(pixels)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - started) / tiles
