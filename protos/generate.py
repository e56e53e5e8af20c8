#!/usr/bin/env python3
"""Regenerate, or check, the Python stubs of every .proto under protos/.

Policy: the generated modules (``*_pb2.py``, ``*_pb2.pyi``, ``*_pb2_grpc.py``) are checked in next to
their .proto files, so the ``internvl`` package imports without grpcio-tools installed. After editing a
.proto, run::

    python protos/generate.py            # rewrite the stubs in place
    python protos/generate.py --check    # exit 1 if any checked-in stub is stale (tests/test_protos.py)

The stubs depend on the grpcio-tools version (it bundles protoc); regenerate after upgrading it.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
# Every package under this folder is importable as ``internvl.*`` (pyproject maps it).
PACKAGE_ROOT = PROTO_ROOT / "internvl"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    return sorted(PACKAGE_ROOT.rglob("*.proto"))


def is_generated(path: Path) -> bool:
    return path.name.endswith(GENERATED_SUFFIXES)


def expected_init_files(protos: list[Path]) -> list[Path]:
    """``__init__.py`` for every folder from ``internvl/`` down to each .proto's folder."""
    dirs: set[Path] = set()
    for proto in protos:
        folder = proto.parent
        while folder != PROTO_ROOT:
            dirs.add(folder)
            folder = folder.parent
    return sorted(d / "__init__.py" for d in dirs)


def run_protoc(protos: list[Path], out_dir: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p) for p in protos),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"protoc failed (exit {result.returncode}): {' '.join(cmd)}")


def generated_in(root: Path) -> set[Path]:
    """Generated files under ``root/internvl``, relative to ``root``."""
    base = root / "internvl"
    if not base.exists():
        return set()
    return {p.relative_to(root) for p in base.rglob("*") if p.is_file() and is_generated(p)}


def compare(fresh_root: Path) -> list[str]:
    """Problems of the checked-in tree against freshly generated stubs, one line each."""
    problems = []
    fresh = generated_in(fresh_root)
    current = generated_in(PROTO_ROOT)
    for rel in sorted(fresh - current):
        problems.append(f"missing:  protos/{rel}")
    for rel in sorted(fresh & current):
        if not filecmp.cmp(fresh_root / rel, PROTO_ROOT / rel, shallow=False):
            problems.append(f"stale:    protos/{rel}")
    for rel in sorted(current - fresh):
        problems.append(f"orphaned: protos/{rel} (its .proto is gone)")
    for init in expected_init_files(proto_files()):
        if not init.exists():
            problems.append(f"missing:  {init.relative_to(PROTO_ROOT.parent)}")
    return problems


def write(fresh_root: Path) -> list[str]:
    """Copy freshly generated stubs into the tree; drop orphans; add missing ``__init__.py``."""
    changed = []
    fresh = generated_in(fresh_root)
    for rel in sorted(fresh):
        dst = PROTO_ROOT / rel
        if not dst.exists() or not filecmp.cmp(fresh_root / rel, dst, shallow=False):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(fresh_root / rel, dst)
            changed.append(f"wrote    protos/{rel}")
    for rel in sorted(generated_in(PROTO_ROOT) - fresh):
        (PROTO_ROOT / rel).unlink()
        changed.append(f"removed  protos/{rel}")
    for init in expected_init_files(proto_files()):
        if not init.exists():
            init.touch()
            changed.append(f"created  {init.relative_to(PROTO_ROOT.parent)}")
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check", action="store_true", help="do not write; exit 1 if the checked-in stubs are out of date"
    )
    args = parser.parse_args(argv)

    protos = proto_files()
    if not protos:
        print(f"no .proto files under {PACKAGE_ROOT}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="internvl-protos-") as tmp:
        fresh_root = Path(tmp)
        run_protoc(protos, fresh_root)
        if args.check:
            problems = compare(fresh_root)
            if problems:
                print(
                    "Generated protobuf stubs are out of date with the .proto files:\n  "
                    + "\n  ".join(problems)
                    + "\nRegenerate them with: python protos/generate.py",
                    file=sys.stderr,
                )
                return 1
            print(f"protobuf stubs up to date ({len(protos)} .proto files)")
            return 0
        changes = write(fresh_root)
    print("\n".join(changes) if changes else "protobuf stubs already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
