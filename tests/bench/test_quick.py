"""`internvl-serve bench --quick` end to end: the tiny model through every scenario, baseline and stack.

No thresholds (the numbers are for people): the run must succeed, write the JSON, the markdown table and the plots,
and give every scenario numbers on both sides.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from procs import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_quick_run_writes_every_scenario(tiny_checkpoint, tmp_path):
    out = tmp_path / "results"
    run = subprocess.run(
        [sys.executable, "-m", "services.cli", "bench", "--quick", "--out", str(out), "--name", "smoke",
         "--model", str(tiny_checkpoint())],
        check=False, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=540)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]

    doc = json.loads((out / "smoke.json").read_text())
    assert [s["number"] for s in doc["scenarios"]] == [1, 2, 3, 4, 5, 6, 7]
    for scenario in doc["scenarios"]:
        assert scenario["comparisons"], scenario["title"]
        for c in scenario["comparisons"]:
            where = f"scenario {scenario['number']}: {c['name']}"
            assert c["ours"]["n"] >= 1 and c["baseline"]["n"] >= 1, where
            assert c["ours"]["median"] is not None and c["ours"]["median"] > 0, where
            assert c["baseline"]["median"] is not None and c["baseline"]["median"] > 0, where
            assert c["ratio_ours_over_baseline"] is not None, where
    machine = doc["machine"]
    for key in ("cpu_model", "logical_cpus", "torch", "dtype"):
        assert machine[key], key
    assert doc["config"]["quick"] is True and doc["config"]["repeats"] == 1

    table = (out / "smoke.md").read_text()
    for number in range(1, 8):
        assert f"\n| {number} | " in table, number
    assert machine["cpu_model"] in table and machine["torch"] in table
    for name in ("smoke-overview.png", "smoke-scenarios.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in table
