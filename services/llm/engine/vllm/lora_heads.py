"""InternVL's language models in vLLM with LoRA on their LM head (registered by the plugin, services.llm.engine.vllm.plugin).

vLLM applies LoRA to an LM head only when the module is named `lm_head` and the model lists it in
`embedding_modules` (its LoRA model manager then wraps the logits processor, which computes `W h + scale B (A h)`
over the vocabulary). vLLM's Qwen2 names its head `lm_head` but does not list it, and its InternLM2 names the head
`output`, as the checkpoint does; an ms-swift adapter for InternVL 2.5 adapts `output` by default (its target regex
ends in `wqkv|wo|w1|w2|w3|output`), and vLLM refused such an adapter ("expected target modules in {...} but received
['language_model.output', ...]"), killing its engine core.

So the architectures the checkpoints name (`Qwen2ForCausalLM`, `InternLM2ForCausalLM`) are registered as these
subclasses: the same layers and weights, the head listed and, for InternLM2, named `lm_head` (the checkpoint's
`output.weight` is loaded into it). An adapter's `language_model.output` is renamed to match when the engine writes
the copy it gives vLLM (services.llm.engine.vllm.adapters.VLLM_MODULE_NAMES).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.model_executor.models.internlm2 import InternLM2ForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

# What vLLM's LoRA model manager reads: the head's module name and its role.
_HEAD = {"lm_head": "output_embeddings"}


class Qwen2WithLoRAHead(Qwen2ForCausalLM):
    embedding_modules = _HEAD


class InternLM2WithLoRAHead(InternLM2ForCausalLM):
    """InternLM2 with its head `output` held as `lm_head`."""

    embedding_modules = _HEAD

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self.lm_head = self.output
        del self.output

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights((_renamed(name), weight) for name, weight in weights)


def _renamed(name: str) -> str:
    return "lm_head." + name.removeprefix("output.") if name.startswith("output.") else name
