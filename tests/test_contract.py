"""The shared contract is free of torch, and the gateway reaches no service internals: its process (and so its
image) never loads torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("modules", [
    "gateway.server, gateway.openai_http",
    "gateway.chat_cli",
    ", ".join(f"services.common.contract.{name}" for name in (
        "template", "tiling", "cache_keys", "encoding", "sampling", "dtypes", "model_info", "errors", "finish",
        "image_formats")),
])
def test_importing_does_not_load_torch(modules):
    # A fresh interpreter: this test process has torch loaded already.
    code = f"import sys\nimport {modules}\nloaded = [m for m in ('torch', 'transformers') if m in sys.modules]\n" \
           "assert not loaded, loaded"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_gateway_imports_nothing_of_the_services_internals():
    offenders = {str(path.relative_to(REPO)): sorted(m for m in _imported_modules(path)
                                                     if m.startswith(("services.llm", "services.vision")))
                 for path in (REPO / "gateway").glob("*.py")}
    assert {path: mods for path, mods in offenders.items() if mods} == {}


def test_the_services_reach_each_other_only_through_common():
    for service, other in (("llm", "vision"), ("vision", "llm")):
        for path in (REPO / "services" / service).glob("*.py"):
            assert not any(m.startswith(f"services.{other}") for m in _imported_modules(path)), path
