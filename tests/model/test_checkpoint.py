"""Loading checkpoints: validation errors name the file and the problem; defaults are the original's; the
fingerprint tells models apart; sharded and single-file checkpoints load the same weights."""

import json
import shutil

import pytest
import torch

from services.contract.errors import CheckpointError
from services.model.checkpoint import open_checkpoint, resolve_model_path
from services.model.modules import load_language_model, load_vision, resolve_dtype
from services.model.spec import ModelSpec, VisionSpec, rope_parameters


@pytest.fixture
def copy_of(tiny_checkpoint, tmp_path):
    def make(**kwargs):
        target = tmp_path / "ckpt"
        shutil.copytree(tiny_checkpoint(**kwargs), target)
        return target

    return make


def _edit_config(directory, edit):
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))


def test_missing_shard_names_the_file(copy_of):
    directory = copy_of(llm="internlm2", vision="6b", shards=3)
    (directory / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00003\.safetensors.*missing"):
        open_checkpoint(directory)


def test_truncated_shard_names_the_file(copy_of):
    directory = copy_of()
    (directory / "model.safetensors").write_bytes(b"\x08\x00")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        open_checkpoint(directory)


def test_corrupt_config_names_the_file(copy_of):
    directory = copy_of()
    (directory / "config.json").write_text('{"model_type": "internvl_chat", ')
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        open_checkpoint(directory)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c["llm_config"].update(architectures=["Phi3ForCausalLM"]), "unsupported language model .*Phi3"),
    (lambda c: c.update(model_type="llava"), "model_type is 'llava'"),
    (lambda c: c.update(template="internlm2-chat"), "unsupported template"),
    (lambda c: c.pop("vision_config"), "missing or malformed 'vision_config'"),
], ids=["phi3", "not-internvl", "template", "no-vision-config"])
def test_unsupported_configs_are_refused(copy_of, edit, message):
    directory = copy_of()
    _edit_config(directory, edit)
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(directory)


def test_weight_shape_mismatch_is_reported(copy_of):
    directory = copy_of()
    _edit_config(directory, lambda c: c["llm_config"].update(intermediate_size=96))
    pattern = r"ckpt \(language model\): weight .language_model\.model\.layers\.0\.mlp\.\w+\.weight. has shape"
    with pytest.raises(CheckpointError, match=pattern):
        load_language_model(open_checkpoint(directory), torch.float32, "cpu")


def test_missing_directory_and_offline_hub_id(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as info:
        resolve_model_path("OpenGVLab/InternVL2_5-1B", cache_dir=str(tmp_path / "hub"))
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "hub") in message


def test_missing_vision_keys_take_original_defaults():
    spec = VisionSpec.from_dict({})
    assert (spec.norm_type, spec.qk_normalization, spec.qkv_bias) == ("rms_norm", True, False)
    assert (spec.hidden_size, spec.num_hidden_layers, spec.image_size) == (3200, 48, 224)
    assert VisionSpec.from_dict({"norm_type": None, "qkv_bias": True}).norm_type == "rms_norm"


def test_rope_keys_are_read_in_their_437_style():
    assert rope_parameters({"rope_theta": 1e6, "rope_scaling": None}) == {"rope_type": "default", "rope_theta": 1e6}
    assert rope_parameters({"rope_theta": 5e7, "rope_scaling": {"type": "dynamic", "factor": 2.5}}) == {
        "rope_type": "dynamic", "rope_theta": 5e7, "factor": 2.5}


def test_spec_of_tiny_checkpoint(tiny_checkpoint):
    checkpoint = open_checkpoint(tiny_checkpoint(llm="internlm2"))
    spec = checkpoint.spec
    assert isinstance(spec, ModelSpec)
    assert (spec.tokens_per_tile, spec.image_size, spec.llm_hidden_size) == (256, 448, 64)
    assert spec.system_message is None
    text = spec.text_hf_config()
    assert text.rope_parameters["rope_theta"] == 1e6 and text.rope_parameters["rope_type"] == "dynamic"
    assert text.tie_word_embeddings is False


def test_fingerprint_is_stable_and_distinguishes_weights(tiny_checkpoint, copy_of):
    first = open_checkpoint(tiny_checkpoint()).fingerprint
    assert first == open_checkpoint(copy_of()).fingerprint  # a copy elsewhere is the same model
    assert first != open_checkpoint(tiny_checkpoint(seed=1)).fingerprint  # same shapes, other weights
    assert first != open_checkpoint(tiny_checkpoint(vision="6b")).fingerprint


def test_sharded_checkpoint_loads_the_same_weights(tiny_checkpoint):
    single = load_vision(open_checkpoint(tiny_checkpoint(llm="internlm2", vision="6b")), torch.float32, "cpu")
    sharded = load_vision(open_checkpoint(tiny_checkpoint(llm="internlm2", vision="6b", shards=3)),
                          torch.float32, "cpu")
    for (name, a), (_, b) in zip(single.state_dict().items(), sharded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_dtype_resolution():
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype(None, "cuda") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        resolve_dtype("int8", "cpu")
