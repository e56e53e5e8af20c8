"""Single-process InternVL 2.5 `chat()`: the reference path the services are checked against.

Equivalent to the original `InternVLChatModel.chat`: render the `internvl2_5` prompt, expand each `<image>` into its
IMG_CONTEXT slots, splice the vision embeddings into those slots in order, and generate until `<|im_end|>`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from services.contract import template
from services.model.checkpoint import Checkpoint, open_checkpoint
from services.model.modules import (
    InternVLVisionPath,
    default_device,
    load_language_model,
    load_tokenizer,
    load_vision,
    resolve_dtype,
)


def splice_image_embeddings(
    token_embeds: torch.Tensor, input_ids: torch.Tensor, image_embeds: torch.Tensor, img_context_id: int
) -> torch.Tensor:
    """Writes image embeddings into the IMG_CONTEXT slots, in flat (batch, position) order.

    token_embeds [B, N, H], input_ids [B, N], image_embeds [tiles, 256, H] (tiles in placeholder order).
    Returns a new [B, N, H] tensor; raises ValueError when slot and embedding counts differ.
    """
    slots = input_ids == img_context_id
    flat = image_embeds.reshape(-1, token_embeds.shape[-1])
    if int(slots.sum()) != flat.shape[0]:
        raise ValueError(f"prompt has {int(slots.sum())} image slots but {flat.shape[0]} image embeddings were given")
    out = token_embeds.clone()
    out[slots] = flat.to(out.dtype)
    return out


@dataclass
class GenerationParams:
    """Sampling settings, passed to transformers' generate. Greedy unless `do_sample`."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                                      repetition_penalty=self.repetition_penalty, **self.extra)
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or None)
        return kwargs


class InternVLChat:
    """Vision path + language model + tokenizer of one checkpoint, in one process."""

    def __init__(self, checkpoint: Checkpoint, vision: InternVLVisionPath, language_model: PreTrainedModel,
                 tokenizer: PreTrainedTokenizerBase):
        self.checkpoint = checkpoint
        self.vision = vision
        self.language_model = language_model
        self.tokenizer = tokenizer
        self.img_context_id = tokenizer.convert_tokens_to_ids(template.IMG_CONTEXT)
        self.stop_id = tokenizer.convert_tokens_to_ids(template.STOP_TOKEN)

    @classmethod
    def load(cls, model: str, dtype: str | None = None, device: str | None = None) -> InternVLChat:
        checkpoint = open_checkpoint(model)
        dev = torch.device(device) if device else default_device()
        torch_dtype = resolve_dtype(dtype, dev)
        return cls(checkpoint, load_vision(checkpoint, torch_dtype, dev),
                   load_language_model(checkpoint, torch_dtype, dev), load_tokenizer(checkpoint))

    @property
    def tokens_per_tile(self) -> int:
        return self.checkpoint.spec.tokens_per_tile

    def build_prompt(self, question: str, history: Sequence[tuple[str, str]] | None,
                     num_patches_list: Sequence[int]) -> tuple[str, str]:
        """(question as stored in history, fully expanded prompt text)."""
        question = template.first_turn_question(question, bool(num_patches_list), history is not None)
        text = template.render(question, history or (), self.checkpoint.spec.system_message)
        return question, template.expand_images(text, num_patches_list, self.tokens_per_tile)

    @torch.inference_mode()
    def generate_ids(self, prompt: str, pixel_values: torch.Tensor | None,
                     params: GenerationParams) -> list[int]:
        """Token ids generated after `prompt` (stop token included when reached)."""
        input_ids = self.tokenizer(prompt, return_tensors="pt").input_ids.to(self.language_model.device)
        embeds = self.language_model.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            embeds = splice_image_embeddings(embeds, input_ids, self.vision.encode(pixel_values), self.img_context_id)
        output = self.language_model.generate(
            inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids), eos_token_id=self.stop_id,
            pad_token_id=self.tokenizer.pad_token_id, **params.as_kwargs())
        return output[0].tolist()

    def chat(self, pixel_values: torch.Tensor | None, question: str,
             params: GenerationParams | None = None, history: list[tuple[str, str]] | None = None,
             num_patches_list: Sequence[int] | None = None) -> tuple[str, list[tuple[str, str]]]:
        """Like the original `chat(..., return_history=True)`: (answer, history with this turn appended).

        pixel_values [tiles, 3, 448, 448] holds the tiles of every image in the conversation, history's included,
        in placeholder order; `num_patches_list` gives each image's tile count (default: one image of all tiles).
        """
        if num_patches_list is None:
            num_patches_list = [pixel_values.shape[0]] if pixel_values is not None else []
        if pixel_values is not None and sum(num_patches_list) != pixel_values.shape[0]:
            raise ValueError(f"num_patches_list sums to {sum(num_patches_list)}, pixel_values has "
                             f"{pixel_values.shape[0]} tiles")
        stored_question, prompt = self.build_prompt(question, history, num_patches_list)
        ids = self.generate_ids(prompt, pixel_values, params or GenerationParams())
        answer = template.clean_response(self.tokenizer.decode(ids, skip_special_tokens=True))
        return answer, [*(history or []), (stored_question, answer)]
