"""Locating and reading an original OpenGVLab InternVL 2.5 checkpoint directory.

A checkpoint is `config.json` (model_type `internvl_chat`), weights in `model.safetensors` or in shards listed by
`model.safetensors.index.json`, and tokenizer files. This module validates the directory, exposes the weights
lazily (one shard open at a time), and computes the model fingerprint that all services share.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from services.contract.dtypes import dtype_name
from services.contract.errors import CheckpointError
from services.contract.model_info import AdapterInfo, ModelInfo
from services.model.spec import ModelSpec

CONFIG_FILE = "config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Bytes hashed from each end of every shard's data: enough to tell two checkpoints with the same shapes apart (a
# fine-tune, another random seed) without reading tens of gigabytes at start-up.
_FINGERPRINT_SAMPLE_BYTES = 1 << 20


# Weights, config and tokenizer only; of the remote code, only InternLM2's tokenizer is ever used. Both hubs fetch the
# same files.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenization_*.py"]

MODELSCOPE_PREFIX = "modelscope:"
MODELSCOPE_INSTALL_HINT = "pip install 'internvl-serve[modelscope]'"


@dataclass(frozen=True)
class ModelLocation:
    """Where a `--model` value resolved to: the checkpoint directory and the name the services report."""

    path: Path
    name: str


def locate_model(model: str, cache_dir: str | None = None) -> ModelLocation:
    """Resolves `--model`: a local directory, a Hugging Face hub id, or a ModelScope id.

    - a local directory is used as is; its name is the directory's name;
    - `ORG/NAME` (e.g. `OpenGVLab/InternVL2_5-1B`) is a Hugging Face hub id, fetched into or found in the hub cache;
    - `modelscope:ORG/NAME` (e.g. `modelscope:OpenGVLab/InternVL2_5-4B`) is a ModelScope id, fetched with
      `modelscope.snapshot_download` into or found in ModelScope's own cache (`MODELSCOPE_CACHE`, by default
      `~/.cache/modelscope`). The prefix always wins over a local directory of the same name. Needs the
      `modelscope` extra.

    A hub or ModelScope model is named by its id's last part (`InternVL2_5-1B`), not by the snapshot directory (a
    commit hash or revision). `cache_dir` overrides the cache root of whichever hub is used. Offline
    (`HF_HUB_OFFLINE=1`, the one switch for both hubs) or with the hub unreachable, only a cached copy is used; with
    none, a one-line CheckpointError names the directory it looked in.
    """
    if model.startswith(MODELSCOPE_PREFIX):
        model_id = _modelscope_id(model)
        return ModelLocation(_modelscope_snapshot(model, model_id, cache_dir), model_id.split("/")[1])
    path = Path(model).expanduser()
    if path.is_dir():
        path = path.resolve()
        return ModelLocation(path, path.name)
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise CheckpointError(f"model directory {path} does not exist (and {model!r} is not a hub id)")
    return ModelLocation(_hub_snapshot(model, cache_dir), model.split("/")[1])


def resolve_model_path(model: str, cache_dir: str | None = None) -> Path:
    """The checkpoint directory `model` resolves to (see `locate_model`)."""
    return locate_model(model, cache_dir).path


def _modelscope_id(model: str) -> str:
    """The `ORG/NAME` after the prefix; anything else (empty, no slash, two slashes, blanks) is a CheckpointError."""
    model_id = model[len(MODELSCOPE_PREFIX):]
    parts = model_id.split("/")
    if len(parts) != 2 or not all(parts) or any(char.isspace() for char in model_id):
        raise CheckpointError(f"{model!r} is not a ModelScope model id: expected {MODELSCOPE_PREFIX}ORG/NAME, "
                              f"e.g. {MODELSCOPE_PREFIX}OpenGVLab/InternVL2_5-4B")
    return model_id


def _hub_snapshot(model: str, cache_dir: str | None) -> Path:
    """A Hugging Face hub snapshot: huggingface_hub itself falls back to its cache when offline or unreachable."""
    from huggingface_hub import constants, snapshot_download

    looked_in = Path(cache_dir or constants.HF_HUB_CACHE)
    try:
        return Path(snapshot_download(model, cache_dir=cache_dir, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - the hub client raises many types for offline, not found, gated
        raise CheckpointError(
            f"cannot fetch {model!r} from the hub and no local copy was found in {looked_in} "
            f"({type(exc).__name__}); pass a local checkpoint directory with --model"
        ) from None


def _modelscope_snapshot(model: str, model_id: str, cache_dir: str | None) -> Path:
    """A ModelScope snapshot: downloaded when online, else (or when that fails) the copy in ModelScope's cache.

    Unlike huggingface_hub, modelscope neither has an offline switch nor falls back to its cache when the network
    fails, so both are done here: `local_files_only=True` is modelscope's own cache lookup, which never connects.
    """
    snapshot_download = _import_modelscope(model)
    if _offline():
        reason = "offline: HF_HUB_OFFLINE is set"
    else:
        try:
            return Path(snapshot_download(model_id, cache_dir=cache_dir, allow_patterns=HUB_PATTERNS))
        except Exception as exc:  # noqa: BLE001 - network, not found and auth errors have many types
            reason = type(exc).__name__
    try:
        return Path(snapshot_download(model_id, cache_dir=cache_dir, allow_patterns=HUB_PATTERNS,
                                      local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - modelscope 1.38+ raises CacheNotFound, older versions ValueError
        # CacheNotFound carries the directory modelscope looked in; older versions say nothing, so name the root.
        looked_in = getattr(exc, "cache_dir", None) or cache_dir or os.environ.get("MODELSCOPE_CACHE") \
            or "~/.cache/modelscope"
        raise CheckpointError(
            f"cannot fetch {model!r} from ModelScope ({reason}) and no local copy was found in {looked_in}; "
            "pass a local checkpoint directory with --model"
        ) from None


def _import_modelscope(model: str):
    """`modelscope.snapshot_download`, imported only for a ModelScope id: it is an optional extra."""
    try:
        from modelscope import snapshot_download
    except Exception as exc:  # noqa: BLE001 - not installed (ImportError), or a broken install failing on import
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{model!r} needs the modelscope package, which cannot be imported ({detail}); "
            f"{MODELSCOPE_INSTALL_HINT}"
        ) from None
    return snapshot_download


def _offline() -> bool:
    """Whether huggingface_hub would be offline now; read at call time, as the variables may change after import."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class Checkpoint:
    """A validated checkpoint directory. `weight_map` maps every original weight name to its shard file."""

    path: Path
    config: dict
    spec: ModelSpec
    weight_map: dict[str, str]
    fingerprint: str
    # The name resolution gave (a hub id's last part); empty for a Checkpoint built without one.
    model_name: str = ""

    @property
    def name(self) -> str:
        """What GetModelInfo and /v1/models call the model: the id's last part, or the directory's name."""
        return self.model_name or self.path.name

    def model_info(self, dtype: torch.dtype, adapters: tuple[AdapterInfo, ...] = ()) -> ModelInfo:
        """What GetModelInfo reports for this checkpoint computing in `dtype` with `adapters` beside it."""
        vision_archs = self.config.get("vision_config", {}).get("architectures") or ["InternVisionModel"]
        return ModelInfo(fingerprint=self.fingerprint, model_name=self.name,
                         llm_hidden_size=self.spec.llm_hidden_size, dtype=dtype_name(dtype),
                         tokens_per_tile=self.spec.tokens_per_tile, image_size=self.spec.image_size,
                         llm_architecture=self.spec.llm_architecture, vision_architecture=vision_archs[0],
                         adapters=adapters)

    @functools.cached_property
    def weight_shapes(self) -> dict[str, list[int]]:
        """Every weight's shape by original name, from the shards' headers (no tensor is read; read once)."""
        return {key: entry["shape"] for shard in sorted(set(self.weight_map.values()))
                for key, entry in safetensors_header(self.path / shard).items()}

    def shards_for(self, prefixes: tuple[str, ...]) -> list[str]:
        """Shard files holding any weight under one of `prefixes`, in a stable order."""
        return sorted({shard for key, shard in self.weight_map.items() if key.startswith(prefixes)})

    def tensors(self, prefixes: tuple[str, ...]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yields (original name, tensor as stored) for weights under `prefixes`, one shard open at a time."""
        for shard in self.shards_for(prefixes):
            with safe_open(self.path / shard, framework="pt") as reader:
                for key in reader.keys():  # noqa: SIM118 - safe_open is not iterable
                    if key.startswith(prefixes):
                        yield key, reader.get_tensor(key)


def open_checkpoint(model: str | os.PathLike, *, cache_dir: str | None = None) -> Checkpoint:
    """Resolves `model` (see `locate_model`), validates the directory (config, index, every shard present and
    readable) and fingerprints it."""
    location = locate_model(str(model), cache_dir)
    path = location.path
    config = read_json(path / CONFIG_FILE)
    spec = ModelSpec.from_config(config, source=str(path / CONFIG_FILE))
    weight_map = _read_weight_map(path)
    return Checkpoint(path=path, config=config, spec=spec, weight_map=weight_map,
                      fingerprint=_fingerprint(path, config, weight_map), model_name=location.name)


def read_json(file: Path) -> dict:
    if not file.is_file():
        raise CheckpointError(f"{file}: file not found")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return data


def _read_weight_map(path: Path) -> dict[str, str]:
    index_file = path / INDEX_FILE
    if index_file.is_file():
        weight_map = read_json(index_file).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_file}: missing or empty 'weight_map'")
    elif (path / SINGLE_WEIGHTS_FILE).is_file():
        weight_map = {key: SINGLE_WEIGHTS_FILE for key in safetensors_header(path / SINGLE_WEIGHTS_FILE)}
    else:
        raise CheckpointError(f"{path}: no {SINGLE_WEIGHTS_FILE} and no {INDEX_FILE}")
    for shard in sorted(set(weight_map.values())):
        shard_file = path / shard
        if not shard_file.is_file():
            raise CheckpointError(f"{shard_file}: shard listed in {INDEX_FILE} is missing")
        missing = [k for k, s in weight_map.items() if s == shard and k not in safetensors_header(shard_file)]
        if missing:
            raise CheckpointError(f"{shard_file}: lacks {len(missing)} weights its index lists, e.g. {missing[0]}")
    return dict(weight_map)


def safetensors_header(file: Path) -> dict:
    """The JSON header of a safetensors file (names, dtypes, shapes, offsets) without reading the tensors."""
    try:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 * 1024 * 1024:
                raise ValueError(f"header length {length} is implausible")
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError) as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from None
    header.pop("__metadata__", None)
    return header


def _fingerprint(path: Path, config: dict, weight_map: dict[str, str]) -> str:
    """sha256 over the canonical config, every shard's header and a sample of each shard's bytes.

    Stable across machines and copies of the same weights; different for another model, another size, or the same
    architecture with other weights. 16 hex digits are plenty to name a model inside one deployment.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    for shard in sorted(set(weight_map.values())):
        file = path / shard
        header = safetensors_header(file)
        digest.update(shard.encode())
        digest.update(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
        size = file.stat().st_size
        with open(file, "rb") as f:
            digest.update(f.read(_FINGERPRINT_SAMPLE_BYTES))
            f.seek(max(0, size - _FINGERPRINT_SAMPLE_BYTES))
            digest.update(f.read(_FINGERPRINT_SAMPLE_BYTES))
    return digest.hexdigest()[:16]
