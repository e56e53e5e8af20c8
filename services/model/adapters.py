"""Reading LoRA adapters as PEFT and ms-swift write them, checked against the base checkpoint they adapt.

An adapter directory (ms-swift's `.../vN-DATE/checkpoint-STEP/`) holds PEFT's `adapter_config.json` and
`adapter_model.safetensors`, whose keys use the ORIGINAL module names of the base checkpoint:
`base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r] for each adapted linear layer
`<module>` (e.g. `language_model.model.layers.0.attention.wqkv`). The adapted layer computes
`W x + scale * B (A x)` with `scale = lora_alpha / r`, or `lora_alpha / sqrt(r)` under `use_rslora`.

Everything the stack cannot apply exactly is refused here, at start-up, with one line naming the file and the problem:
pickle weights, DoRA, `modules_to_save`, per-module rank or alpha patterns, LoRA biases, embedding LoRA, a target the
model lacks, a shape that contradicts the base weight, a rank over the configured maximum.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from services.contract.errors import CheckpointError
from services.contract.model_info import AdapterInfo
from services.model.adapter_options import AdapterOptions
from services.model.checkpoint import Checkpoint, read_json
from services.model.keymap import LANGUAGE_PREFIX, VISION_PREFIXES

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"

# Each service's side of an adapter: the weights the loader gives it.
LANGUAGE_PREFIXES = (LANGUAGE_PREFIX,)

_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<side>[AB])\.weight$")
# adapter_config.json fields that change the computation and that this stack does not implement: refused when set.
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora) is not supported: its magnitude vector is not a low-rank sum; merge it with "
                "`swift export --merge_lora true` and serve the merged checkpoint",
    "modules_to_save": "modules_to_save (fully trained copies of layers) is not supported; serve a merged checkpoint",
    "rank_pattern": "per-module ranks (rank_pattern) are not supported",
    "alpha_pattern": "per-module alphas (alpha_pattern) are not supported",
    "lora_bias": "LoRA biases (lora_bias) are not supported",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers) does not apply to InternVL's linear layers",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported: it acts only from its "
                               "invocation tokens on, and this stack applies an adapter to every position",
    "layer_replication": "layer_replication (a layer stack rebuilt from repeated base layers) is not supported",
    "trainable_token_indices": "trainable_token_indices (trained embedding rows) is not supported; serve a merged "
                               "checkpoint",
    "target_parameters": "LoRA on parameters (target_parameters) is not supported, only on linear layers",
    "use_qalora": "QA-LoRA (use_qalora) is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported",
    "arrow_config": "Arrow routing (arrow_config) is not supported",
    "kasa_config": "KaSA (kasa_config) is not supported",
}
# Initialisations that move part of the base weights into the adapter: such an adapter adds to a residual base, not to
# the published one, unless PEFT converted it when saving (`path_initial_model_for_weight_conversion`), which records
# `init_lora_weights: true`.
_RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass(frozen=True)
class Adapter:
    """One LoRA adapter: its name (the model id it is served under), where it was read from, and its weights.

    `modules` maps each adapted module's original name to (A [rank, in], B [out, rank]) as stored; `scale` multiplies
    B A. `digest` names the adapter's content (weights and the config fields that change the computation): it is part
    of the embedding cache key when the adapter touches the vision side, and of the prefix KV cache's keys.
    """

    name: str
    path: Path
    rank: int
    alpha: float
    use_rslora: bool
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    digest: str

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank

    @property
    def touches_vision(self) -> bool:
        return any(module.startswith(VISION_PREFIXES) for module in self.modules)

    def info(self) -> AdapterInfo:
        return AdapterInfo(self.name, self.digest, self.touches_vision, self.rank)

    def part(self, prefixes: tuple[str, ...]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The modules under `prefixes` (a service applies only its side of an adapter)."""
        return {module: ab for module, ab in self.modules.items() if module.startswith(prefixes)}


def read_adapter(name: str, directory: Path, base: Checkpoint, *, max_rank: int) -> Adapter:
    """Reads and checks the adapter in `directory` against `base`; raises CheckpointError naming file and problem."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: adapter directory not found")
    config_file = directory / CONFIG_FILE
    config = read_json(config_file)
    rank, alpha, use_rslora = _check_config(config_file, config, max_rank)
    weights_file = directory / WEIGHTS_FILE
    if not weights_file.is_file():
        if (directory / PICKLE_WEIGHTS_FILE).is_file():
            raise CheckpointError(f"{directory / PICKLE_WEIGHTS_FILE}: pickle weights are never loaded; save the "
                                  "adapter as safetensors (PEFT's save_pretrained does by default)")
        raise CheckpointError(f"{weights_file}: file not found")
    modules = _read_weights(weights_file)
    shapes = base.weight_shapes
    targets = config.get("target_modules")
    for module, (a, b) in modules.items():
        base_shape = shapes.get(f"{module}.weight")
        if base_shape is None or len(base_shape) != 2:
            raise CheckpointError(f"{weights_file}: adapts {module!r}, which the model ({base.path}) lacks as a "
                                  "linear layer")
        if not _targeted(module, targets):
            raise CheckpointError(f"{weights_file}: holds weights for {module!r}, which target_modules "
                                  f"{targets!r} in {CONFIG_FILE} does not name")
        out_features, in_features = base_shape
        if tuple(a.shape) != (rank, in_features) or tuple(b.shape) != (out_features, rank):
            raise CheckpointError(
                f"{weights_file}: {module!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; the base weight "
                f"{tuple(base_shape)} and r = {rank} imply {(rank, in_features)} and {(out_features, rank)}")
    linear = [name.removesuffix(".weight") for name, shape in shapes.items()
              if name.endswith(".weight") and len(shape) == 2]
    _check_targets_exist(config_file, targets, linear, base)
    digest = hashlib.sha256()
    digest.update(json.dumps({"r": rank, "lora_alpha": alpha, "use_rslora": use_rslora}, sort_keys=True).encode())
    digest.update(weights_file.read_bytes())
    return Adapter(name=name, path=directory, rank=rank, alpha=alpha, use_rslora=use_rslora, modules=modules,
                   digest=digest.hexdigest()[:16])


def _check_config(file: Path, config: dict, max_rank: int) -> tuple[int, float, bool]:
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{file}: peft_type {config.get('peft_type')!r} is not supported; only LORA is")
    for key, problem in _UNSUPPORTED.items():
        if config.get(key):
            raise CheckpointError(f"{file}: {problem}")
    if config.get("bias", "none") != "none":
        raise CheckpointError(f"{file}: bias {config['bias']!r} (trained biases) is not supported; only 'none' is")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
        raise CheckpointError(f"{file}: init_lora_weights {init!r} makes an adapter of a residual base model; save it "
                              "converted to a plain LoRA (PEFT's path_initial_model_for_weight_conversion) and serve "
                              "that")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise CheckpointError(f"{file}: r must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise CheckpointError(f"{file}: rank {rank} is over --max-lora-rank {max_rank}; raise the limit to serve it")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise CheckpointError(f"{file}: lora_alpha must be a number, got {alpha!r}")
    targets = config.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and targets
                                         and all(isinstance(t, str) for t in targets))):
        raise CheckpointError(f"{file}: target_modules must be a regex string or a list of module names, got "
                              f"{targets!r}")
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as exc:
            raise CheckpointError(f"{file}: target_modules is not a valid regex ({exc})") from None
    return rank, float(alpha), bool(config.get("use_rslora"))


def _read_weights(file: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A, B)} from the weights file; every key must be a LoRA A or B of a linear layer."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(file, framework="pt") as reader:
            for key in reader.keys():  # noqa: SIM118 - safe_open is not iterable
                match = _KEY.match(key)
                if match is None:
                    raise CheckpointError(f"{file}: weight {key!r} is not a LoRA A or B of a linear layer "
                                          "(embedding LoRA and other PEFT methods are not supported)")
                halves.setdefault(match["module"], {})[match["side"]] = reader.get_tensor(key)
    except SafetensorError as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from None
    if not halves:
        raise CheckpointError(f"{file}: holds no LoRA weights")
    for module, sides in halves.items():
        if set(sides) != {"A", "B"}:
            missing = ({"A", "B"} - set(sides)).pop()
            raise CheckpointError(f"{file}: {module!r} has no lora_{missing}")
    return {module: (sides["A"], sides["B"]) for module, sides in sorted(halves.items())}


def _targeted(module: str, targets: str | list[str]) -> bool:
    """PEFT's rule: a regex string must match the whole module name; a list targets the modules its entries name."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(_named(module, entry) for entry in targets)


def _named(module: str, entry: str) -> bool:
    """A list entry of target_modules names the module itself or its last parts."""
    return module == entry or module.endswith(f".{entry}")


def _check_targets_exist(file: Path, targets: str | list[str], linear: list[str], base: Checkpoint) -> None:
    """PEFT refuses a target that matches no layer; so does the stack (it would be a silent no-op)."""
    entries, matches = ([targets], _targeted) if isinstance(targets, str) else (targets, _named)
    for entry in entries:
        if not any(matches(module, entry) for module in linear):
            raise CheckpointError(f"{file}: target_modules entry {entry!r} matches no linear layer of the model "
                                  f"({base.path})")


def mapped(modules: dict[str, tuple[torch.Tensor, torch.Tensor]],
           mapper: Callable[[str, torch.Tensor], Iterator[tuple[str, torch.Tensor]]]
           ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Original module names -> the built model's module paths, via the loader's weight mapper.

    B's rows are the output rows of the original weight, so the mapper splits them exactly as it splits the weight
    (InternLM2's grouped `wqkv`, InternViT's `qkv` into q, k, v); A is the same for every part, since the fused layer
    reads one input.
    """
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, (a, b) in modules.items():
        for target, b_part in mapper(f"{module}.weight", b):
            out[target.removesuffix(".weight")] = (a, b_part)
    return out



def read_adapters(options: AdapterOptions, base: Checkpoint) -> list[Adapter]:
    """Every --lora adapter, read and checked against `base` (CheckpointError on the first bad one)."""
    adapters = [read_adapter(name, Path(directory), base, max_rank=options.max_lora_rank)
                for name, directory in options.loras]
    for adapter in adapters:
        if adapter.name == base.name:
            raise CheckpointError(f"--lora {adapter.name}={adapter.path}: the name is the base model's id; "
                                  "choose another")
    return adapters
