"""Where `--model` comes from: a local directory, a Hugging Face hub id or a `modelscope:` id, each named by the id's
last part; offline, a hub or ModelScope id resolves from that hub's own cache layout or fails with one line naming
the directory it looked in. Nothing here reaches the network: ModelScope's endpoint is a refused local port."""

import shutil
import sys
import time

import pytest
import torch

from services.contract.errors import CheckpointError
from services.model.checkpoint import MODELSCOPE_INSTALL_HINT, open_checkpoint
from tools.cli import main

MODEL_ID = "OpenGVLab/InternVL2_5-Tiny"
# Port 9 (discard) on loopback: nothing listens, so a connection is refused at once instead of timing out.
REFUSED_ENDPOINT = "http://127.0.0.1:9"
# Well above a refused connection, well below any network retry with back-off.
QUICK_S = 10

# Where modelscope writes a snapshot under MODELSCOPE_CACHE: 1.38 and later (default revision `master`), and the
# layout of 1.37 and earlier, which newer versions still read.
MODELSCOPE_LAYOUTS = {
    "snapshots": "models/OpenGVLab--InternVL2_5-Tiny/snapshots/master",
    "legacy": "models/OpenGVLab/InternVL2_5-Tiny",
}


@pytest.fixture
def modelscope_cache(tmp_path, monkeypatch):
    """An empty ModelScope cache in tmp_path, a refused endpoint, and no user credentials or config.

    modelscope reads its environment once per process into a default config, so that is cleared before and after.
    It is imported first, so the timings below measure the lookup, not the import (seconds on a busy host).
    """
    from modelscope import snapshot_download  # noqa: F401
    from modelscope_hub.config import set_default_config

    cache = tmp_path / "modelscope"
    monkeypatch.setenv("MODELSCOPE_CACHE", str(cache))
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", REFUSED_ENDPOINT)
    monkeypatch.delenv("MODELSCOPE_DOMAIN", raising=False)
    monkeypatch.setenv("MODELSCOPE_HOME", str(tmp_path / "modelscope-home"))
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", "")  # explicitly no token: never read a stored credential
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    # modelscope retries a failed file listing with back-off (1 + 2 + 4 s by default); one attempt is enough to
    # see the endpoint refuse. Its env knob is read on import, so set the value it was read into as well.
    monkeypatch.setenv("MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS", "1")
    monkeypatch.setattr("modelscope_hub._legacy_api.REPO_TREE_PAGE_MAX_ATTEMPTS", 1, raising=False)
    set_default_config(None)
    yield cache
    set_default_config(None)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _one_line_error(model, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(model, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("layout", MODELSCOPE_LAYOUTS)
def test_modelscope_id_resolves_from_its_cache_offline(layout, modelscope_cache, offline, tiny_checkpoint):
    snapshot = modelscope_cache / MODELSCOPE_LAYOUTS[layout]
    shutil.copytree(tiny_checkpoint(), snapshot)
    checkpoint = open_checkpoint(f"modelscope:{MODEL_ID}")
    assert checkpoint.path.resolve() == snapshot.resolve()
    assert checkpoint.name == "InternVL2_5-Tiny"
    assert checkpoint.model_info(torch.float32).model_name == "InternVL2_5-Tiny"  # what GetModelInfo reports


def test_modelscope_id_falls_back_to_its_cache_when_unreachable(modelscope_cache, tiny_checkpoint):
    snapshot = modelscope_cache / MODELSCOPE_LAYOUTS["snapshots"]
    shutil.copytree(tiny_checkpoint(), snapshot)
    started = time.monotonic()
    checkpoint = open_checkpoint(f"modelscope:{MODEL_ID}")
    assert time.monotonic() - started < QUICK_S
    assert checkpoint.path.resolve() == snapshot.resolve() and checkpoint.name == "InternVL2_5-Tiny"


def test_modelscope_cache_dir_argument_overrides_the_environment(modelscope_cache, offline, tiny_checkpoint,
                                                                 tmp_path):
    other = tmp_path / "other-cache"
    shutil.copytree(tiny_checkpoint(), other / MODELSCOPE_LAYOUTS["snapshots"])
    assert open_checkpoint(f"modelscope:{MODEL_ID}", cache_dir=str(other)).name == "InternVL2_5-Tiny"


@pytest.mark.parametrize("online", [False, True], ids=["offline", "unreachable"])
def test_modelscope_id_not_cached_names_the_cache_quickly(online, modelscope_cache, monkeypatch):
    if not online:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    message = _one_line_error("modelscope:Nope/Nope")
    assert time.monotonic() - started < QUICK_S
    assert str(modelscope_cache) in message
    assert "'modelscope:Nope/Nope'" in message and "--model" in message
    assert ("HF_HUB_OFFLINE" in message) is not online


@pytest.mark.parametrize("model", ["modelscope:", "modelscope:InternVL2_5-4B", "modelscope:OpenGVLab/x/y",
                                   "modelscope:/InternVL2_5-4B", "modelscope:OpenGVLab/", "modelscope:Open GVLab/x"])
def test_malformed_modelscope_ids_are_one_line(model, modelscope_cache):
    message = _one_line_error(model)
    assert f"{model!r} is not a ModelScope model id" in message and "modelscope:ORG/NAME" in message


def test_modelscope_not_installed_gives_the_pip_hint(modelscope_cache, monkeypatch):
    # None in sys.modules makes `import modelscope` raise ImportError, as if it were not installed.
    monkeypatch.setitem(sys.modules, "modelscope", None)
    message = _one_line_error(f"modelscope:{MODEL_ID}")
    assert message.endswith(MODELSCOPE_INSTALL_HINT) and "pip install 'internvl-serve[modelscope]'" in message


def test_hub_snapshot_is_named_by_the_id_not_the_commit(tmp_path, monkeypatch, tiny_checkpoint):
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE when first imported; set both so the order of imports cannot matter.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--OpenGVLab--InternVL2_5-Tiny"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(tiny_checkpoint(), snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    checkpoint = open_checkpoint(MODEL_ID, cache_dir=str(tmp_path / "hub"))
    assert checkpoint.path == snapshot and checkpoint.path.name == commit
    assert checkpoint.name == "InternVL2_5-Tiny"


def test_local_directory_keeps_its_own_name(tiny_checkpoint, tmp_path):
    directory = tmp_path / "my-finetune"
    shutil.copytree(tiny_checkpoint(), directory)
    assert open_checkpoint(directory).name == "my-finetune"
    assert open_checkpoint(str(directory / ".." / "my-finetune")).name == "my-finetune"


def test_cli_modelscope_id_not_cached_is_one_line_exit_2(modelscope_cache, offline, capsys):
    started = time.monotonic()
    # At the default INFO the llm server logs that it listens before it loads the model; the error must be alone.
    code = main(["--log-level", "WARNING", "llm", "--model", "modelscope:Nope/Nope", "--port", "0"])
    err = capsys.readouterr().err
    assert time.monotonic() - started < QUICK_S
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("internvl-serve llm: error: cannot fetch 'modelscope:Nope/Nope' from ModelScope")
    assert str(modelscope_cache) in lines[0]
