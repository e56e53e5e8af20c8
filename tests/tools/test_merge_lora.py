"""`internvl-serve merge-lora`: the merged checkpoint is the base in its original format (names, dtypes, shards,
index, every other file) with exactly `W + scale * (B @ A)` for each adapted module, and bad inputs are refused
with one line before anything is written.

The expected weights are computed here straight from the files (safe_open on the base shards and on the adapter),
not through the project's readers, so that a reading bug cannot hide in both sides.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from services.contract.errors import CheckpointError
from services.model.checkpoint import INDEX_FILE, open_checkpoint, safetensors_header
from tools import merge_lora as merge_lora_module
from tools.cli import main
from tools.merge_lora import merge_lora

INTERNLM2_TARGETS = r"^(language_model(?=\.).*\.(wqkv|wo|w1|w2|w3|output))$"
QWEN2_TARGETS = r"^(language_model(?=\.).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj))$"
VISION_TARGETS = (r"^(vision_model\.encoder\.layers\.0\.attn\.qkv|mlp1\.1"
                  r"|language_model(?=\.).*\.(wqkv|wo|w1|w2|w3|output))$")
RANK, ALPHA = 4, 8


def _shards(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.safetensors"))


def _read_all(directory: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{shard: {name: tensor}} of a (tiny) checkpoint, read with safe_open."""
    out = {}
    for shard in _shards(directory):
        with safe_open(directory / shard, framework="pt") as reader:
            out[shard] = {key: reader.get_tensor(key) for key in reader.keys()}  # noqa: SIM118
    return out


def _write_adapter(directory: Path, base: Path, targets: str, *, use_rslora: bool = False,
                   dtype: torch.dtype = torch.float32, seed: int = 0) -> list[str]:
    """An ms-swift style adapter for every 2-D weight of `base` that `targets` full-matches, as PEFT would inject;
    returns the adapted module names."""
    directory.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    weights, modules = {}, []
    for shard in _shards(base):
        for key, entry in sorted(safetensors_header(base / shard).items()):
            module = key.removesuffix(".weight")
            if key.endswith(".weight") and len(entry["shape"]) == 2 and re.fullmatch(targets, module):
                out_features, in_features = entry["shape"]
                # Large enough that the delta survives the cast back to bf16 in every element tested.
                weights[f"base_model.model.{module}.lora_A.weight"] = \
                    torch.randn(RANK, in_features, generator=generator).to(dtype)
                weights[f"base_model.model.{module}.lora_B.weight"] = \
                    torch.randn(out_features, RANK, generator=generator).to(dtype)
                modules.append(module)
    assert modules, targets
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": targets,
              "use_rslora": use_rslora, "task_type": "CAUSAL_LM"}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    save_file(weights, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    return modules


def _expected(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """{weight name: merged weight} from the files: W + scale * (B @ A) in float32, cast to W's dtype."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    r = config["r"]
    scale = config["lora_alpha"] / (math.sqrt(r) if config["use_rslora"] else r)
    with safe_open(adapter / "adapter_model.safetensors", framework="pt") as reader:
        lora = {key: reader.get_tensor(key) for key in reader.keys()}  # noqa: SIM118
    base_weights = {name: t for tensors in _read_all(base).values() for name, t in tensors.items()}
    expected = {}
    for key, a in lora.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            a, b = a.float(), lora[f"base_model.model.{module}.lora_B.weight"].float()
            weight = base_weights[f"{module}.weight"]
            expected[f"{module}.weight"] = (weight.float() + scale * (b @ a)).to(weight.dtype)
    return expected


def _assert_merged(base: Path, adapter: Path, out: Path) -> None:
    """The merged checkpoint in `out` is `base` with exactly the adapter's weights merged and nothing else changed."""
    expected = _expected(base, adapter)
    base_tensors, out_tensors = _read_all(base), _read_all(out)
    assert list(out_tensors) == list(base_tensors)  # same shard files
    merged = 0
    for shard, tensors in base_tensors.items():
        assert sorted(out_tensors[shard]) == sorted(tensors), shard  # same names in the same shard
        assert safetensors_header(out / shard).keys() == safetensors_header(base / shard).keys()
        for name, weight in tensors.items():
            got = out_tensors[shard][name]
            assert got.dtype == weight.dtype and got.shape == weight.shape, name
            if name in expected:
                assert torch.equal(got, expected[name]), name
                assert not torch.equal(got, weight), f"{name}: the adapter changed nothing"
                merged += 1
            else:
                assert torch.equal(got, weight), f"{name} is not adapted but changed"
    assert merged == len(expected)
    with safe_open(out / _shards(out)[0], framework="pt") as reader:
        assert reader.metadata() == {"format": "pt"}
    # The index: same weight map, total_size recomputed (the same here, as names, shapes and dtypes are the same).
    if (base / INDEX_FILE).is_file():
        base_index, out_index = (json.loads((d / INDEX_FILE).read_text()) for d in (base, out))
        assert out_index["weight_map"] == base_index["weight_map"]
        total = sum(t.numel() * t.element_size() for ts in out_tensors.values() for t in ts.values())
        assert out_index["metadata"]["total_size"] == total == base_index["metadata"]["total_size"]
    else:
        assert not (out / INDEX_FILE).exists()
    # Every other file is copied byte for byte, and nothing else is written.
    def others(d):
        return sorted(p.relative_to(d).as_posix() for p in d.rglob("*")
                      if p.is_file() and p.suffix != ".safetensors" and p.name != INDEX_FILE)
    assert others(out) == others(base) and "config.json" in others(base)
    for name in others(base):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    # The merged directory is a checkpoint the services open, and it is told apart from the base.
    merged_checkpoint, base_checkpoint = open_checkpoint(out), open_checkpoint(base)
    assert merged_checkpoint.weight_map == base_checkpoint.weight_map
    assert merged_checkpoint.fingerprint != base_checkpoint.fingerprint


@pytest.mark.parametrize(("llm", "targets", "use_rslora", "shards", "dtype"), [
    ("internlm2", INTERNLM2_TARGETS, False, 1, torch.float32),
    ("qwen2", QWEN2_TARGETS, True, 2, torch.bfloat16),
    ("internlm2", VISION_TARGETS, False, 2, torch.float32),
], ids=["internlm2", "qwen2-rslora-sharded", "internlm2-vision-sharded"])
def test_merged_checkpoint_is_the_base_plus_scale_b_a(tiny_checkpoint, tmp_path, llm, targets, use_rslora, shards,
                                                       dtype):
    base = tiny_checkpoint(llm=llm, shards=shards)
    modules = _write_adapter(tmp_path / "adapter", base, targets, use_rslora=use_rslora, dtype=dtype)
    if llm == "internlm2":
        assert "language_model.output" in modules and "language_model.model.layers.0.attention.wqkv" in modules
    if targets == VISION_TARGETS:
        assert {"vision_model.encoder.layers.0.attn.qkv", "mlp1.1"} <= set(modules)
    out = merge_lora(str(base), tmp_path / "adapter", tmp_path / "merged")
    assert out == (tmp_path / "merged").resolve()
    _assert_merged(base, tmp_path / "adapter", out)
    assert not list(tmp_path.glob(".merged.partial-*"))


def test_each_weight_keeps_its_stored_dtype(tiny_checkpoint, tmp_path):
    """A base mixing dtypes (an fp32 adapted weight, an fp16 norm) comes back with the same dtype per weight."""
    base = tmp_path / "base"
    shutil.copytree(tiny_checkpoint(llm="qwen2"), base)
    with safe_open(base / "model.safetensors", framework="pt") as reader:
        weights = {key: reader.get_tensor(key) for key in reader.keys()}  # noqa: SIM118
    adapted_fp32 = "language_model.model.layers.0.self_attn.q_proj.weight"
    weights[adapted_fp32] = weights[adapted_fp32].float()
    weights["language_model.model.norm.weight"] = weights["language_model.model.norm.weight"].half()
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    _write_adapter(tmp_path / "adapter", base, QWEN2_TARGETS)
    out = merge_lora(str(base), tmp_path / "adapter", tmp_path / "merged")
    header = safetensors_header(out / "model.safetensors")
    assert header[adapted_fp32]["dtype"] == "F32" and header["language_model.model.norm.weight"]["dtype"] == "F16"
    assert header["language_model.model.layers.0.self_attn.k_proj.weight"]["dtype"] == "BF16"
    _assert_merged(base, tmp_path / "adapter", out)


def test_refuses_a_non_empty_out_or_the_base_directory(tiny_checkpoint, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_checkpoint(llm="internlm2"), base)
    _write_adapter(tmp_path / "adapter", base, INTERNLM2_TARGETS)
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    with pytest.raises(CheckpointError, match=r"occupied exists and is not empty"):
        merge_lora(str(base), tmp_path / "adapter", occupied)
    with pytest.raises(CheckpointError, match=r"a-file exists and is not empty"):
        merge_lora(str(base), tmp_path / "adapter", a_file)
    for out in (base, base / "merged", tmp_path / "." / "base"):
        with pytest.raises(CheckpointError, match=r"is the base checkpoint directory or inside it"):
            merge_lora(str(base), tmp_path / "adapter", out)
    # Nothing was written anywhere: the base, the occupied directory and the file are as they were.
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"] and a_file.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "adapter", "base", "occupied"]


def test_a_failed_write_leaves_nothing_behind(tiny_checkpoint, tmp_path, monkeypatch):
    """The checkpoint is built aside and renamed in at the end: a failure mid-way leaves no half checkpoint."""
    base = tiny_checkpoint(llm="qwen2", shards=2)
    _write_adapter(tmp_path / "adapter", base, QWEN2_TARGETS)
    calls = []

    def failing_save(tensors, file, metadata=None):
        calls.append(file)
        if len(calls) == 2:
            raise OSError("disk full")
        save_file(tensors, file, metadata=metadata)

    monkeypatch.setattr(merge_lora_module, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        merge_lora(str(base), tmp_path / "adapter", tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_cli_writes_into_an_empty_out_and_prints_it(tiny_checkpoint, tmp_path, capsys):
    base = tiny_checkpoint(llm="internlm2", shards=2)
    _write_adapter(tmp_path / "adapter", base, VISION_TARGETS, seed=1)
    out = tmp_path / "merged"
    out.mkdir()  # an existing empty directory is accepted
    code = main(["merge-lora", "--model", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(out)])
    assert code == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out.resolve())
    _assert_merged(base, tmp_path / "adapter", out)


def test_cli_refuses_a_rank_over_the_limit_in_one_line(tiny_checkpoint, tmp_path, capsys):
    base = tiny_checkpoint(llm="qwen2")
    _write_adapter(tmp_path / "adapter", base, QWEN2_TARGETS)
    code = main(["merge-lora", "--model", str(base), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged"), "--max-lora-rank", str(RANK - 1)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and f"rank {RANK} is over --max-lora-rank" in err
    assert not (tmp_path / "merged").exists()


def test_missing_adapter_is_one_line_and_exit_2_from_the_installed_command(tiny_checkpoint, tmp_path):
    base = tiny_checkpoint(llm="qwen2")
    missing = tmp_path / "no-such-adapter"
    command = Path(sys.executable).parent / "internvl-serve"
    done = subprocess.run([str(command), "merge-lora", "--model", str(base), "--adapter", str(missing),
                           "--out", str(tmp_path / "merged")], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("internvl-serve merge-lora: error: ") and str(missing) in lines[0]
    assert not (tmp_path / "merged").exists()
