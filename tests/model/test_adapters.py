"""Reading LoRA adapters (services.model.adapters): PEFT / ms-swift adapters read with the right rank, scale, modules
and digest; everything the stack cannot apply exactly refused with one line that names the file and the problem.

The adapters are written by PEFT itself (lora_reference.write_swift_adapter) and then broken one way at a time.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from lora_reference import (
    INTERNLM2_TARGETS,
    QWEN2_TARGETS,
    VISION_AND_LANGUAGE_TARGETS,
    OriginalInternVL,
    write_swift_adapter,
)
from safetensors.torch import load_file, save_file

from services.contract.errors import CheckpointError, InvalidArgumentError
from services.contract.model_info import AdapterInfo
from services.llm.config import LLMConfig
from services.model.adapter_options import AdapterOptions, parse_lora_flag
from services.model.adapters import (
    CONFIG_FILE,
    LANGUAGE_PREFIXES,
    PICKLE_WEIGHTS_FILE,
    VISION_PREFIXES,
    WEIGHTS_FILE,
    read_adapter,
    read_adapters,
)
from services.model.checkpoint import Checkpoint, open_checkpoint
from services.runtime import flags
from services.vision.config import VisionConfig

Q_PROJ = "language_model.model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def original(tiny_checkpoint):
    made: dict[str, OriginalInternVL] = {}

    def build(llm: str) -> OriginalInternVL:
        if llm not in made:
            made[llm] = OriginalInternVL(tiny_checkpoint(llm=llm))
        return made[llm]

    return build


@pytest.fixture(scope="module")
def qwen2(tiny_checkpoint) -> Checkpoint:
    return open_checkpoint(tiny_checkpoint(llm="qwen2"))


@pytest.fixture(scope="module")
def internlm2(tiny_checkpoint) -> Checkpoint:
    return open_checkpoint(tiny_checkpoint(llm="internlm2"))


@pytest.fixture(scope="module")
def written(original, tmp_path_factory):
    """The PEFT-written Qwen2 adapter (QWEN2_TARGETS, r 8, alpha 32) and its PEFT model, once per module."""
    return write_swift_adapter(original("qwen2"), tmp_path_factory.mktemp("qwen2-adapter"),
                               target_modules=QWEN2_TARGETS, seed=1)


@pytest.fixture
def adapter_dir(written, tmp_path) -> Path:
    """A private copy of the written adapter, for a test to break."""
    return Path(shutil.copytree(written[0], tmp_path / "adapter"))


def edit_config(directory: Path, **changes) -> Path:
    file = directory / CONFIG_FILE
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))
    return file


def edit_weights(directory: Path, edit) -> Path:
    file = directory / WEIGHTS_FILE
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)
    return file


def refusal(directory: Path, base: Checkpoint, max_rank: int = 64) -> str:
    with pytest.raises(CheckpointError) as failure:
        read_adapter("a", directory, base, max_rank=max_rank)
    message = str(failure.value)
    assert "\n" not in message
    return message


def assert_names(message: str, file: Path, *problem: str) -> None:
    assert message.startswith(f"{file}: "), message
    for words in problem:
        assert words in message, message


# -- the directory and its files ----------------------------------------------------------------------------------

def test_missing_directory(qwen2, tmp_path):
    missing = tmp_path / "no-such-adapter"
    assert_names(refusal(missing, qwen2), missing, "adapter directory not found")


def test_missing_config(qwen2, adapter_dir):
    (adapter_dir / CONFIG_FILE).unlink()
    assert_names(refusal(adapter_dir, qwen2), adapter_dir / CONFIG_FILE, "file not found")


def test_invalid_json(qwen2, adapter_dir):
    (adapter_dir / CONFIG_FILE).write_text('{"peft_type": "LORA", "r": 8,')
    assert_names(refusal(adapter_dir, qwen2), adapter_dir / CONFIG_FILE, "not valid JSON")


def test_pickle_weights_are_refused_and_never_loaded(qwen2, adapter_dir, tmp_path):
    (adapter_dir / WEIGHTS_FILE).unlink()
    marker = tmp_path / "unpickled"

    # A protocol-0 pickle written by hand (the tests import no pickle module): loading it calls open(marker, "w").
    payload = f"cbuiltins\nopen\n(V{marker}\nVw\ntR.".encode()
    (adapter_dir / PICKLE_WEIGHTS_FILE).write_bytes(payload)
    assert_names(refusal(adapter_dir, qwen2), adapter_dir / PICKLE_WEIGHTS_FILE, "pickle weights are never loaded",
                 "safetensors")
    assert not marker.exists()


def test_no_weights_file(qwen2, adapter_dir):
    (adapter_dir / WEIGHTS_FILE).unlink()
    assert_names(refusal(adapter_dir, qwen2), adapter_dir / WEIGHTS_FILE, "file not found")


def test_unreadable_weights_file(qwen2, adapter_dir):
    (adapter_dir / WEIGHTS_FILE).write_bytes(b"not a safetensors file at all")
    assert_names(refusal(adapter_dir, qwen2), adapter_dir / WEIGHTS_FILE, "not a readable safetensors file")


def test_empty_weights_file(qwen2, adapter_dir):
    save_file({}, adapter_dir / WEIGHTS_FILE)
    assert_names(refusal(adapter_dir, qwen2), adapter_dir / WEIGHTS_FILE, "holds no LoRA weights")


# -- adapter_config.json ----------------------------------------------------------------------------------------

def test_peft_type_not_lora(qwen2, adapter_dir):
    file = edit_config(adapter_dir, peft_type="IA3")
    assert_names(refusal(adapter_dir, qwen2), file, "peft_type 'IA3' is not supported", "only LORA")


@pytest.mark.parametrize(("field", "value", "problem"), [
    ("use_dora", True, "DoRA (use_dora) is not supported"),
    ("modules_to_save", ["lm_head"], "modules_to_save"),
    ("rank_pattern", {"q_proj": 4}, "per-module ranks (rank_pattern) are not supported"),
    ("alpha_pattern", {"q_proj": 8}, "per-module alphas (alpha_pattern) are not supported"),
    ("lora_bias", True, "LoRA biases (lora_bias) are not supported"),
    ("fan_in_fan_out", True, "fan_in_fan_out"),
])
def test_unsupported_config_fields(qwen2, adapter_dir, field, value, problem):
    file = edit_config(adapter_dir, **{field: value})
    assert_names(refusal(adapter_dir, qwen2), file, problem)


@pytest.mark.parametrize(("field", "value"), [
    # aLoRA: the adapter acts only from the invocation tokens on; applied everywhere it would answer otherwise.
    ("alora_invocation_tokens", [151644, 77091]),
    # A model rebuilt from repeated base layers: LoRA weights of `layers.1` then adapt a copy of layer 0.
    ("layer_replication", [[0, 1], [0, 1]]),
    ("trainable_token_indices", [151667]),
    ("target_parameters", ["mlp.experts.gate_up_proj"]),
    ("use_qalora", True),
    ("use_bdlora", {"nblocks": 2}),
    ("monteclora_config", {"n_experts": 2}),
    ("arrow_config", {"top_k": 2}),
    ("kasa_config", {"beta": 1.0}),
    # Trained biases of the base layers, and an initialisation that leaves the adapter relative to a residual base.
    ("bias", "all"),
    ("init_lora_weights", "pissa_niter_4"),
    ("init_lora_weights", "olora"),
])
def test_other_config_fields_that_change_the_computation_are_refused(qwen2, adapter_dir, field, value):
    """PEFT applies these differently from `W x + scale B A x` on every position; served as plain LoRA they would
    silently give other answers than PEFT, so they must be refused like DoRA."""
    file = edit_config(adapter_dir, **{field: value})
    assert_names(refusal(adapter_dir, qwen2), file, field)


@pytest.mark.parametrize("value", [True, False, "gaussian", "eva"])
def test_initialisations_that_leave_the_base_as_it_is_are_served(qwen2, adapter_dir, value):
    edit_config(adapter_dir, init_lora_weights=value)
    assert read_adapter("a", adapter_dir, qwen2, max_rank=8).rank == 8


def test_rank_over_the_maximum(qwen2, adapter_dir):
    message = refusal(adapter_dir, qwen2, max_rank=4)
    assert_names(message, adapter_dir / CONFIG_FILE, "rank 8 is over --max-lora-rank 4")
    assert read_adapter("a", adapter_dir, qwen2, max_rank=8).rank == 8  # the limit itself is allowed


@pytest.mark.parametrize(("changes", "problem"), [
    ({"r": 0}, "r must be a positive integer, got 0"),
    ({"r": "8"}, "r must be a positive integer, got '8'"),
    ({"r": True}, "r must be a positive integer, got True"),
    ({"lora_alpha": None}, "lora_alpha must be a number, got None"),
    ({"target_modules": []}, "target_modules must be a regex string or a list of module names"),
    ({"target_modules": "(unclosed"}, "target_modules is not a valid regex"),
])
def test_malformed_config_values(qwen2, adapter_dir, changes, problem):
    file = edit_config(adapter_dir, **changes)
    assert_names(refusal(adapter_dir, qwen2), file, problem)


# -- adapter_model.safetensors against the base --------------------------------------------------------------------

def test_embedding_lora_key(qwen2, adapter_dir):
    key = "base_model.model.language_model.model.embed_tokens.lora_embedding_A"

    def add(tensors):
        tensors[key] = torch.zeros(8, 64)

    file = edit_weights(adapter_dir, add)
    assert_names(refusal(adapter_dir, qwen2), file, repr(key), "is not a LoRA A or B of a linear layer")


def test_module_with_only_lora_a(qwen2, adapter_dir):
    file = edit_weights(adapter_dir, lambda tensors: tensors.pop(f"base_model.model.{Q_PROJ}.lora_B.weight"))
    assert_names(refusal(adapter_dir, qwen2), file, f"{Q_PROJ!r} has no lora_B")


def test_module_with_only_lora_b(qwen2, adapter_dir):
    file = edit_weights(adapter_dir, lambda tensors: tensors.pop(f"base_model.model.{Q_PROJ}.lora_A.weight"))
    assert_names(refusal(adapter_dir, qwen2), file, f"{Q_PROJ!r} has no lora_A")


def test_qwen2_adapter_on_an_internlm2_base(internlm2, adapter_dir):
    message = refusal(adapter_dir, internlm2)
    assert_names(message, adapter_dir / WEIGHTS_FILE, "which the model", str(internlm2.path),
                 "lacks as a linear layer")
    modules = {key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
               for key in load_file(adapter_dir / WEIGHTS_FILE)}
    assert any(f"adapts {module!r}," in message for module in modules), message


def test_target_modules_entry_matching_nothing(qwen2, adapter_dir):
    """A list entry matches a module named so or ending in `.entry` (PEFT's rule): 'wqkv' names no Qwen2 layer,
    while the seven Qwen2 projection names do."""
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    file = edit_config(adapter_dir, target_modules=[*names, "wqkv"])
    assert_names(refusal(adapter_dir, qwen2), file, "target_modules entry 'wqkv' matches no linear layer",
                 str(qwen2.path))
    edit_config(adapter_dir, target_modules=names)
    assert len(read_adapter("a", adapter_dir, qwen2, max_rank=64).modules) == 14


def test_wrong_in_features(qwen2, adapter_dir):
    key = f"base_model.model.{Q_PROJ}.lora_A.weight"

    def widen(tensors):
        tensors[key] = torch.zeros(8, 65)

    file = edit_weights(adapter_dir, widen)
    assert_names(refusal(adapter_dir, qwen2), file, repr(Q_PROJ), "lora_A (8, 65)", "(64, 64)", "(8, 64)")


def test_lora_b_of_another_rank(qwen2, adapter_dir):
    key = f"base_model.model.{Q_PROJ}.lora_B.weight"

    def narrow(tensors):
        tensors[key] = tensors[key][:, :4].contiguous()

    file = edit_weights(adapter_dir, narrow)
    assert_names(refusal(adapter_dir, qwen2), file, repr(Q_PROJ), "lora_B (64, 4)", "r = 8")


def test_weights_for_a_module_target_modules_does_not_name(qwen2, adapter_dir):
    only_q = r"^(language_model(?=\.).*\.q_proj)$"
    file = edit_config(adapter_dir, target_modules=only_q)
    message = refusal(adapter_dir, qwen2)
    assert_names(message, adapter_dir / WEIGHTS_FILE, "holds weights for", "which target_modules",
                 f"in {CONFIG_FILE} does not name")
    assert "q_proj'" not in message.split("which target_modules")[0]
    assert file.name in message


# -- what is read -------------------------------------------------------------------------------------------------

def peft_modules(peft_model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A, B)} as the PEFT model holds them."""
    params = dict(peft_model.named_parameters())
    out = {}
    for name, a in params.items():
        if name.endswith(".lora_A.default.weight"):
            module = name.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight")
            out[module] = (a, params[name.replace(".lora_A.", ".lora_B.")])
    return out


def test_a_peft_adapter_reads_with_its_modules_rank_and_scale(qwen2, written):
    directory, peft_model = written
    adapter = read_adapter("mine", directory, qwen2, max_rank=64)
    assert (adapter.name, adapter.path, adapter.rank, adapter.alpha, adapter.use_rslora) == (
        "mine", directory, 8, 32.0, False)
    assert adapter.scale == 32 / 8
    expected = peft_modules(peft_model)
    assert len(expected) == 2 * 7  # two layers of seven projections
    assert set(adapter.modules) == set(expected)
    for module, (a, b) in adapter.modules.items():
        assert torch.equal(a, expected[module][0]) and torch.equal(b, expected[module][1]), module
    assert not adapter.touches_vision
    assert adapter.part(LANGUAGE_PREFIXES).keys() == adapter.modules.keys() and not adapter.part(VISION_PREFIXES)
    assert adapter.info() == AdapterInfo("mine", adapter.digest, False, 8)


def test_rslora_scale(qwen2, original, tmp_path):
    directory, _ = write_swift_adapter(original("qwen2"), tmp_path, target_modules=QWEN2_TARGETS, r=4,
                                       lora_alpha=16, use_rslora=True)
    adapter = read_adapter("rs", directory, qwen2, max_rank=64)
    assert adapter.use_rslora and adapter.rank == 4
    assert adapter.scale == pytest.approx(16 / math.sqrt(4))
    assert adapter.scale != 16 / 4


def test_internlm2_adapter_reads(internlm2, original, tmp_path):
    directory, peft_model = write_swift_adapter(original("internlm2"), tmp_path, target_modules=INTERNLM2_TARGETS,
                                                r=16, lora_alpha=8)
    adapter = read_adapter("i", directory, internlm2, max_rank=16)
    assert set(adapter.modules) == set(peft_modules(peft_model))
    assert "language_model.output" in adapter.modules and adapter.scale == 0.5


def test_list_target_modules(qwen2, original, tmp_path):
    directory, peft_model = write_swift_adapter(original("qwen2"), tmp_path, target_modules=["q_proj", "v_proj"])
    adapter = read_adapter("l", directory, qwen2, max_rank=64)
    assert set(adapter.modules) == set(peft_modules(peft_model))
    assert {m.rsplit(".", 1)[1] for m in adapter.modules} == {"q_proj", "v_proj"}


def test_digest_names_the_content(qwen2, original, written, tmp_path):
    directory, _ = written
    first = read_adapter("a", directory, qwen2, max_rank=64)
    assert read_adapter("a", directory, qwen2, max_rank=64).digest == first.digest
    # The digest is the content's, not the path's or the name's.
    moved = Path(shutil.copytree(directory, tmp_path / "moved"))
    assert read_adapter("other-name", moved, qwen2, max_rank=64).digest == first.digest
    other_seed, _ = write_swift_adapter(original("qwen2"), tmp_path / "seed2", target_modules=QWEN2_TARGETS, seed=2)
    assert read_adapter("a", other_seed, qwen2, max_rank=64).digest != first.digest
    # Same weights, another alpha: another computation, another digest.
    edit_config(moved, lora_alpha=16)
    assert read_adapter("a", moved, qwen2, max_rank=64).digest != first.digest


def test_vision_and_language_targets_touch_vision(qwen2, original, tmp_path):
    directory, peft_model = write_swift_adapter(original("qwen2"), tmp_path, target_modules=VISION_AND_LANGUAGE_TARGETS)
    adapter = read_adapter("vl", directory, qwen2, max_rank=64)
    assert adapter.touches_vision and adapter.info().touches_vision
    assert set(adapter.modules) == set(peft_modules(peft_model))
    vision = adapter.part(VISION_PREFIXES)
    assert {"mlp1.1", "mlp1.3", "vision_model.encoder.layers.0.attn.qkv"} <= set(vision)
    assert set(vision) | set(adapter.part(LANGUAGE_PREFIXES)) == set(adapter.modules)


# -- the flags ----------------------------------------------------------------------------------------------------

def test_parse_lora_flag():
    assert parse_lora_flag("my-adapter.v2=/some/dir") == ("my-adapter.v2", Path("/some/dir"))
    assert parse_lora_flag("org/name:1=rel/dir=x") == ("org/name:1", Path("rel/dir=x"))


@pytest.mark.parametrize(("value", "problem"), [
    ("no-separator", "expects NAME=DIR"),
    ("=dir", "expects NAME=DIR"),
    ("name=", "expects NAME=DIR"),
    ("has space=dir", "name 'has space'"),
    ("-leading=dir", "name '-leading'"),
])
def test_parse_lora_flag_errors(value, problem):
    with pytest.raises(argparse.ArgumentTypeError, match=problem):
        parse_lora_flag(value)


def test_flags_parse_into_options():
    parser = argparse.ArgumentParser()
    flags.add_flags(parser, AdapterOptions)
    args = parser.parse_args(["--lora", "a=/x", "--lora", "b=/y", "--max-loras", "3", "--max-lora-rank", "16"])
    assert flags.from_args(AdapterOptions, args) == AdapterOptions(loras=(("a", "/x"), ("b", "/y")), max_loras=3,
                                                                   max_lora_rank=16)
    assert flags.from_args(AdapterOptions, parser.parse_args([])) == AdapterOptions()
    # A parsed --lora is written back as it was given (`up` passes it on so).
    assert [str(value) for value in args.lora] == ["a=/x", "b=/y"]


def test_option_problems():
    assert AdapterOptions(loras=(("a", "/x"), ("b", "/y")), max_loras=2).problems() == []
    [duplicate] = AdapterOptions(loras=(("a", "/x"), ("b", "/y"), ("a", "/z"))).problems()
    assert "--lora names must be unique" in duplicate and "a repeats" in duplicate
    [too_many] = AdapterOptions(loras=(("a", "/x"), ("b", "/y"), ("c", "/z")), max_loras=2).problems()
    assert too_many.startswith("--lora given 3 times but --max-loras is 2")
    assert AdapterOptions(max_loras=0).problems() == ["--max-loras must be >= 1, got 0"]
    assert AdapterOptions(max_lora_rank=0).problems() == ["--max-lora-rank must be >= 1, got 0"]


@pytest.mark.parametrize("config", [LLMConfig, VisionConfig])
def test_configs_refuse_option_problems(config):
    with pytest.raises(InvalidArgumentError, match="--lora names must be unique"):
        config(model="m", adapters=AdapterOptions(loras=(("a", "/x"), ("a", "/y"))))


def test_options_read_every_adapter_in_order(qwen2, original, written, tmp_path):
    other, _ = write_swift_adapter(original("qwen2"), tmp_path / "b", target_modules=QWEN2_TARGETS, r=4, seed=3)
    options = AdapterOptions(loras=(("b", str(other)), ("a", str(written[0]))), max_lora_rank=8)
    adapters = read_adapters(options, qwen2)
    assert [(a.name, a.rank) for a in adapters] == [("b", 4), ("a", 8)]
    # The rank limit applies to each.
    with pytest.raises(CheckpointError, match="rank 8 is over --max-lora-rank 4"):
        read_adapters(AdapterOptions(loras=options.loras, max_lora_rank=4), qwen2)


def test_options_refuse_the_base_models_name(qwen2, written):
    with pytest.raises(CheckpointError) as failure:
        read_adapters(AdapterOptions(loras=((qwen2.name, str(written[0])),)), qwen2)
    assert str(failure.value).startswith(f"--lora {qwen2.name}={written[0]}: the name is the base model's id")
