"""The layering of the code, as `ls` shows it, held by the imports.

    services/contract/   the torch-free, gRPC-free contract every process shares
    services/model/      the InternVL model code (torch, transformers); no transport
    services/runtime/    the plumbing of every process (gRPC servers, errors, Redis, tracing, logs, TLS)
    services/vision/     the vision service        } neither imports the other
    services/llm/        the LLM service           }
    gateway/             the public APIs: the contract and the runtime only, never torch
    tools/, bench/       the command line, the launcher, the benchmark: above everything, imported by nothing
    tests/               test modules import helper modules, never another test module or a conftest

Each rule is checked over the real tree, and over a planted violation of its own so a rule that cannot fail fails.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SERVICE_PACKAGES = ("services.vision", "services.llm")


@dataclass(frozen=True)
class Rule:
    """Modules under `folder` import none of `forbidden` (module names or their prefixes), except `allowed`."""

    name: str
    folder: str
    forbidden: tuple[str, ...]
    allowed: tuple[str, ...] = ()

    def offences(self, root: Path) -> list[str]:
        found = []
        for path in sorted((root / self.folder).rglob("*.py")):
            for module in imported_modules(path):
                if _under(module, self.forbidden) and not _under(module, self.allowed):
                    found.append(f"{path.relative_to(root)} imports {module}")
        return found


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


RULES = (
    Rule("the contract imports neither torch nor gRPC nor anything above it", "services/contract",
         ("torch", "transformers", "safetensors", "grpc", "grpc_status", "redis", "services", "gateway", "tools",
          "bench"), allowed=("services.contract",)),
    Rule("the model code imports no transport and nothing above it", "services/model",
         ("grpc", "grpc_status", "internvl", "redis", "aiohttp", "services", "gateway", "tools", "bench"),
         allowed=("services.contract", "services.model")),
    Rule("the runtime imports no service", "services/runtime",
         ("services.vision", "services.llm", "gateway", "tools", "bench")),
    Rule("the vision service does not import the LLM service", "services/vision",
         ("services.llm", "gateway", "tools", "bench")),
    Rule("the LLM service does not import the vision service", "services/llm",
         ("services.vision", "gateway", "tools", "bench")),
    Rule("the gateway imports no service and no model code", "gateway",
         ("services.vision", "services.llm", "services.model", "torch", "transformers", "tools", "bench")),
)


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from services import llm` imports services.llm.
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.folder)
def test_the_tree_keeps_the_rule(rule):
    assert rule.offences(REPO) == []


# A planted import each rule must catch: the module it is planted in, and the import.
PLANTED = {
    "services/contract": "import torch",
    "services/model": "from services.runtime import tracing",
    "services/runtime": "from services.llm.engine import api",
    "services/vision": "from services import llm",
    "services/llm": "import services.vision.preprocess",
    "gateway": "from services.model.checkpoint import Checkpoint",
}


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.folder)
def test_a_planted_violation_is_caught(rule, tmp_path):
    planted = tmp_path / rule.folder / "planted.py"
    planted.parent.mkdir(parents=True)
    planted.write_text(f"{PLANTED[rule.folder]}\n")
    (tmp_path / rule.folder / "fine.py").write_text("import json\n")
    offences = rule.offences(tmp_path)
    assert offences and all(o.startswith(f"{rule.folder}/planted.py imports ") for o in offences), offences


def test_nothing_imports_the_tools_or_the_benchmark_but_themselves():
    offenders = [f"{path.relative_to(REPO)} imports {module}"
                 for folder in ("services", "gateway") for path in sorted((REPO / folder).rglob("*.py"))
                 for module in imported_modules(path) if _under(module, ("tools", "bench"))]
    assert offenders == []


@pytest.mark.parametrize("modules", [
    ", ".join(["gateway.server", *(f"gateway.openai.{path.stem}"
                                   for path in sorted((REPO / "gateway/openai").glob("[!_]*.py")))]),
    "gateway.chat_cli",
    ", ".join(f"services.contract.{path.stem}" for path in sorted((REPO / "services/contract").glob("*.py"))),
])
def test_importing_does_not_load_torch(modules):
    # A fresh interpreter: this test process has torch loaded already.
    code = f"import sys\nimport {modules}\nloaded = [m for m in ('torch', 'transformers') if m in sys.modules]\n" \
           "assert not loaded, loaded"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]


def imports_of_test_modules(root: Path) -> list[str]:
    """Imports of a test module or a conftest by any module under `root`/tests: what tests share lives in helper
    modules (tests/helpers/, tests/stack.py, ...); fixtures reach test modules through pytest, not imports."""
    tests = root / "tests"
    # A module of the tests' own: under `tests.`, or named like something in tests/ (which is on sys.path).
    local = {"tests", *(p.stem for p in tests.iterdir())}
    return [f"{path.relative_to(root)} imports {module}" for path in sorted(tests.rglob("*.py"))
            for module in imported_modules(path) if module.split(".")[0] in local
            and (module.rsplit(".", 1)[-1].startswith("test_") or module.rsplit(".", 1)[-1] == "conftest")]


def test_no_test_module_imports_another_or_a_conftest():
    assert imports_of_test_modules(REPO) == []


def test_a_planted_test_module_import_is_caught(tmp_path):
    (tmp_path / "tests/llm").mkdir(parents=True)
    (tmp_path / "tests/llm/test_planted.py").write_text("from tests.llm.engine.test_engine import Recorder\n")
    (tmp_path / "tests/llm/test_also.py").write_text("from reliability.conftest import LIMIT\n")
    (tmp_path / "tests/reliability").mkdir()
    (tmp_path / "tests/llm/test_fine.py").write_text("from helpers.engine import Recorder\nimport aiohttp.test_utils\n")
    assert imports_of_test_modules(tmp_path) == [
        "tests/llm/test_also.py imports reliability.conftest",
        "tests/llm/test_planted.py imports tests.llm.engine.test_engine"]
