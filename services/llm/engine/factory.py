"""Which engine computes the LLM service's tokens: `build_engine` makes the one `LLMConfig.engine` names.

`LLMService` depends on the engine interface (services.llm.engine.api, events) and on this function, never on a
concrete engine. `ENGINES` maps each engine's name to its builder, which takes what the service has (`EngineInputs`)
and returns a ready-to-start `Engine`; a builder imports its engine only when called, so a server pays only for the
engine it runs: `transformers` (services.llm.engine.transformers_engine) and `vllm` (vLLM's AsyncLLM in process,
services.llm.engine.vllm); tests register fakes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from services.contract import template
from services.contract.errors import CheckpointError, InvalidArgumentError
from services.llm.config import LLMConfig
from services.llm.engine.api import Engine
from services.llm.prompt import PromptBuilder
from services.model.adapters import Adapter
from services.model.checkpoint import Checkpoint
from services.model.modules import (
    default_device,
    install_language_adapters,
    load_language_model,
    resolve_dtype,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineInputs:
    """What the LLM service gives an engine builder."""

    config: LLMConfig
    checkpoint: Checkpoint
    tokenizer: PreTrainedTokenizerBase
    prompts: PromptBuilder  # the service's prompt builder: prompts reach the engine as its token ids
    max_context_tokens: int  # prompt + answer limit, already resolved against the model's positions
    adapters: tuple[Adapter, ...] = ()  # LoRA adapters the engine computes with beside the base
    # A language model already loaded, to compute with instead of loading one (tests share one model among many
    # services); None: the builder loads what `config` says. Engine-specific (the transformers engine's
    # PreTrainedModel); an engine that loads its own weights refuses one.
    model: object | None = None


EngineBuilder = Callable[[EngineInputs], Engine]


def build_engine(config: LLMConfig, checkpoint: Checkpoint, tokenizer: PreTrainedTokenizerBase,
                 prompts: PromptBuilder, max_context_tokens: int, *, adapters: Sequence[Adapter] = (),
                 model: object | None = None) -> Engine:
    """The engine `config.engine` names, built (blocking: it may load weights; call it off the event loop)."""
    builder = ENGINES.get(config.engine)
    if builder is None:
        raise InvalidArgumentError(f"engine {config.engine!r} is not one of this server's engines "
                                   f"({', '.join(sorted(ENGINES))})")
    return builder(EngineInputs(config, checkpoint, tokenizer, prompts, max_context_tokens, tuple(adapters), model))


def _transformers(inputs: EngineInputs) -> Engine:
    """services.llm.engine.transformers_engine on the checkpoint's language model, adapters installed in it."""
    from services.llm.engine.transformers_engine import TransformersEngine

    config, checkpoint, tokenizer = inputs.config, inputs.checkpoint, inputs.tokenizer
    model = inputs.model if inputs.model is not None else _load_language_model(config, checkpoint)
    slots = install_language_adapters(model, checkpoint, inputs.adapters) if inputs.adapters else None
    return TransformersEngine(
        model, tokenizer, stop_token_id=tokenizer.convert_tokens_to_ids(template.STOP_TOKEN),
        img_context_id=inputs.prompts.img_context_id, max_context_tokens=inputs.max_context_tokens,
        max_batch_size=config.max_batch_size, max_step_tokens=config.max_step_tokens,
        prefix_cache_budget_bytes=config.kv_cache_budget_bytes, kv_budget_bytes=config.kv_budget_bytes,
        adapters=slots)


def _vllm(inputs: EngineInputs) -> Engine:
    """services.llm.engine.vllm: vLLM loads the checkpoint in the processes it starts."""
    from services.llm.engine.vllm.build import build_vllm_engine

    return build_vllm_engine(inputs.config, inputs.checkpoint, inputs.tokenizer, inputs.prompts,
                             inputs.max_context_tokens, adapters=inputs.adapters, model=inputs.model)


def _load_language_model(config: LLMConfig, checkpoint: Checkpoint):
    """The checkpoint's language model on `config.device` in `config.dtype`; one with sliding-window attention is
    refused (the engine's KV batch keeps every position)."""
    device = torch.device(config.device) if config.device else default_device()
    model = load_language_model(checkpoint, resolve_dtype(config.dtype, device), device)
    if any(kind != "full_attention" for kind in getattr(model.config, "layer_types", None) or ()):
        raise CheckpointError(f"{checkpoint.path}: sliding-window attention is not supported by the LLM service")
    log.info("loaded %s (%s, %s on %s)", checkpoint.name, checkpoint.spec.llm_architecture, model.dtype, device)
    return model


# Engine name (LLMConfig.engine) -> builder.
ENGINES: dict[str, EngineBuilder] = {"transformers": _transformers, "vllm": _vllm}
