"""Fixtures shared by the whole test suite."""

import contextlib

import pytest

# tests/ is on sys.path here (pytest's rootdir conftest, no tests/__init__.py).
from procs import redis_server

from tools.launcher import LaunchError

# Fixtures that start a process: a test that needs one, even through another fixture, is marked e2e.
PROCESS_FIXTURES = {"redis_url"}


def pytest_addoption(parser):
    # The vLLM engine's tests (tests/llm/engine/vllm) on another device and dtype: bench/gpu_check.py runs them on a
    # CUDA GPU in bfloat16 and float32. The suite itself runs them on the CPU in float32.
    parser.addoption("--vllm-device", default="cpu", help="device of the vLLM engine tests (default cpu)")
    parser.addoption("--vllm-dtype", default="float32", choices=("float32", "bfloat16"),
                     help="dtype of the vLLM engine tests (default float32)")


def pytest_collection_modifyitems(items):
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def redis_url():
    """URL of a private redis-server for the session (``allkeys-lru``, 256 MiB, no persistence).

    Tests share the server: use keys unique to the test (e.g. a uuid namespace). Fails, never skips,
    when redis-server is missing, so the integration tests cannot silently stop running.
    """
    with contextlib.ExitStack() as stack:
        error = None
        try:
            server = stack.enter_context(redis_server())
        except LaunchError as exc:
            error = str(exc)
        if error is not None:
            pytest.fail(error, pytrace=False)
        yield server.url


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: tiny_checkpoint(llm="qwen2"|"internlm2", vision="300m"|"6b", seed=0, shards=1) -> directory.

    Random checkpoints in the original OpenGVLab format, written once per session and parameter set.
    """
    from services.model.tiny import make_tiny

    made: dict[tuple, object] = {}

    def make(llm: str = "qwen2", vision: str = "300m", seed: int = 0, shards: int = 1):
        key = (llm, vision, seed, shards)
        if key not in made:
            out = tmp_path_factory.mktemp(f"ckpt-{llm}-{vision}-s{seed}-x{shards}")
            made[key] = make_tiny(out, llm=llm, vision=vision, seed=seed, shards=shards)
        return made[key]

    return make


@pytest.fixture(scope="session")
def golden_dir():
    """The preprocessing golden files and their images (see `golden`)."""
    from golden import GOLDEN

    if not GOLDEN.is_dir():
        pytest.fail(f"golden data not found at {GOLDEN}", pytrace=False)
    return GOLDEN
