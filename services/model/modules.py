"""Building transformers' modules for an InternVL 2.5 checkpoint and loading the original weights into them.

The vision service needs only the vision tower and projector, the LLM service only the language model, so each is
built and loaded on its own: a 78B LLM is never materialised in a vision replica.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from transformers import (
    AutoTokenizer,
    InternVLConfig,
    InternVLModel,
    LlamaForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2ForCausalLM,
)
from transformers.initialization import no_init_weights
from transformers.models.internvl.modeling_internvl import (
    InternVLMultiModalProjector,
    InternVLPreTrainedModel,
    InternVLVisionModel,
)

from services.contract.errors import CheckpointError
from services.model.adapters import LANGUAGE_PREFIXES, Adapter, mapped
from services.model.checkpoint import Checkpoint
from services.model.keymap import (
    LANGUAGE_PREFIX,
    VISION_PREFIXES,
    internlm2_mapper,
    map_qwen2,
    map_vision,
)
from services.model.lora import AdapterSlots
from services.model.torch_dtypes import TORCH_DTYPES

Mapper = Callable[[str, torch.Tensor], Iterator[tuple[str, torch.Tensor]]]


def resolve_dtype(name: str | None, device: torch.device | str) -> torch.dtype:
    """`None` means the platform default: float32 on CPU (bf16 matmuls are slow there), bfloat16 on a GPU."""
    if name is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; choose one of {', '.join(TORCH_DTYPES)}") from None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class InternVLVisionPath(InternVLModel):
    """InternViT -> pixel shuffle (0.5, v2) -> mlp1, without the language model.

    Reuses `InternVLModel.get_image_features` and `pixel_shuffle` unchanged; only the constructor differs, so the
    LLM's weights are never allocated in the vision service.
    """

    def __init__(self, config: InternVLConfig):
        InternVLPreTrainedModel.__init__(self, config)
        self.vision_tower = InternVLVisionModel(config.vision_config)
        self.multi_modal_projector = InternVLMultiModalProjector(config)
        self.post_init()

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [tiles, 3, 448, 448] (any float dtype) -> embeddings [tiles, 256, llm_hidden] in model dtype."""
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        return self.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output


def _build(factory: Callable[[], nn.Module], dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Constructs a module with uninitialised parameters of `dtype` on `device` (loading overwrites all of them)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights(), torch.device(device):
            module = factory()
    finally:
        torch.set_default_dtype(previous)
    return module.eval()


def _load(module: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], mapper: Mapper, what: str) -> None:
    """Streams mapped weights into `module`, then insists every parameter was loaded exactly once."""
    params = dict(module.named_parameters())
    loaded: set[str] = set()
    for original, tensor in tensors:
        for target, value in mapper(original, tensor):
            param = params.get(target)
            if param is None:
                raise CheckpointError(f"{what}: weight {original!r} maps to {target!r}, which the model lacks")
            if param.shape != value.shape:
                raise CheckpointError(
                    f"{what}: weight {original!r} has shape {tuple(value.shape)}, config implies {tuple(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(value)  # upcasts bf16 on disk to the compute dtype
            loaded.add(target)
    missing = sorted(set(params) - loaded)
    if missing:
        raise CheckpointError(f"{what}: {len(missing)} weights missing from the checkpoint, e.g. {missing[0]!r}")


def load_vision(checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device | str) -> InternVLVisionPath:
    if checkpoint.spec.select_layer != -1:
        # get_image_features would read hidden_states[select_layer]; the 2.5 family always uses the last layer.
        raise CheckpointError(f"{checkpoint.path}/config.json: select_layer {checkpoint.spec.select_layer} unsupported")
    config = checkpoint.spec.internvl_hf_config()
    model = _build(lambda: InternVLVisionPath(config), dtype, torch.device(device))
    _load(model, checkpoint.tensors(VISION_PREFIXES), map_vision, f"{checkpoint.path} (vision)")
    return model


def _language_classes(checkpoint: Checkpoint) -> tuple[type[PreTrainedModel], Mapper]:
    config = checkpoint.spec.text_hf_config()
    if checkpoint.spec.llm_architecture == "Qwen2ForCausalLM":
        return Qwen2ForCausalLM, map_qwen2
    return LlamaForCausalLM, internlm2_mapper(config.num_attention_heads, config.num_key_value_heads)


def load_language_model(checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device | str) -> PreTrainedModel:
    config = checkpoint.spec.text_hf_config()
    cls, mapper = _language_classes(checkpoint)
    model = _build(lambda: cls(config), dtype, torch.device(device))
    _load(model, checkpoint.tensors((LANGUAGE_PREFIX,)), mapper, f"{checkpoint.path} (language model)")
    return model


def install_language_adapters(model: PreTrainedModel, checkpoint: Checkpoint,
                              adapters: Sequence[Adapter]) -> AdapterSlots:
    """Every adapter's language-model layers in `model`, one slot each (an adapter without any keeps a slot that
    computes the base)."""
    return _install(model, adapters, LANGUAGE_PREFIXES, _language_classes(checkpoint)[1])


def install_vision_adapters(model: InternVLVisionPath, adapters: Sequence[Adapter]) -> AdapterSlots:
    """Every adapter's vision tower and projector layers in `model`, one slot each."""
    return _install(model, adapters, VISION_PREFIXES, map_vision)


def _install(model: nn.Module, adapters: Sequence[Adapter], prefixes: tuple[str, ...], mapper: Mapper
             ) -> AdapterSlots:
    slots = AdapterSlots([adapter.name for adapter in adapters])
    slots.install(model, [mapped(adapter.part(prefixes), mapper) for adapter in adapters],
                  [adapter.scale for adapter in adapters])
    return slots


def load_tokenizer(checkpoint: Checkpoint) -> PreTrainedTokenizerBase:
    """The checkpoint's own tokenizer. InternLM2 sizes ship a sentencepiece tokenizer as remote code."""
    trust = checkpoint.spec.llm_architecture == "InternLM2ForCausalLM"
    try:
        # An empty model config: without one AutoTokenizer reads config.json through AutoConfig, which with
        # trust_remote_code imports the checkpoint's configuration_internvl_chat.py (and what that imports) when the
        # directory holds it, as a clone of a published checkpoint does. The tokenizer needs nothing from the model
        # config, and of the checkpoint's code only the tokenizer's may run.
        return AutoTokenizer.from_pretrained(checkpoint.path, trust_remote_code=trust, config=PreTrainedConfig())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{checkpoint.path}: cannot load the tokenizer ({exc})") from None
