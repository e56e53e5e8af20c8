"""`internvl-serve bench-lora --quick` end to end: the tiny model, random adapters batched with the base.

No thresholds (the numbers are for people): the run must succeed, write the JSON and the markdown table, give both
sides of each measure samples, and show that the adapter rows ran the LoRA path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from procs import REPO

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(300)]


def test_quick_run_measures_both_sides(tmp_path):
    out = tmp_path / "results"
    run = subprocess.run(
        [sys.executable, "-m", "tools.cli", "bench-lora", "--quick", "--out", str(out), "--name", "smoke"],
        check=False, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]

    doc = json.loads((out / "smoke.json").read_text())
    cfg = doc["config"]
    assert cfg["quick"] is True and cfg["preset"] == "tiny" and cfg["adapters"]["count"] == 2
    decode, ttft = doc["samples"]["decode_step"], doc["samples"]["ttft"]
    assert set(decode) == {"plain", "base", "adapters"} and set(ttft) == {"base", "adapters"}
    for side, runs in decode.items():
        assert len(runs) == cfg["decode"]["repeats"], side
        for r in runs:
            assert r["step_s"] > 0 and r["intervals_s"] and all(t > 0 for t in r["intervals_s"]), side
            assert r["finish_reasons"] == ["length"] * cfg["decode"]["requests"], side
    for side, runs in ttft.items():
        assert len(runs) == cfg["ttft"]["repeats"], side
        assert all(r["ttft_s"] > 0 and r["wall_to_first_delta_s"] > 0 for r in runs), side
    assert all(r["adapter"] for r in ttft["adapters"]) and not any(r["adapter"] for r in ttft["base"])
    for measure, sides in doc["medians"].items():
        assert all(v > 0 for v in sides.values()), measure
    for key in ("decode_step_adapters_over_base", "ttft_adapters_over_base", "decode_step_base_over_plain"):
        assert doc["ratios"][key] > 0, key
    for key, target in doc["targets"].items():
        assert target["ratio"] == doc["ratios"][key] and isinstance(target["met"], bool), key

    # The adapter rows ran the LoRA path; the base rows the fast path, equal to the model without adapters.
    v = doc["verification"]
    assert all(change > 0 for change in v["max_abs_logit_change_by_adapter"].values())
    assert v["adapter_forwards_with_slots"] > 0 and v["base_forwards_on_fast_path"] > 0
    assert v["base_rows_equal_model_without_adapters"] is True

    table = (out / "smoke.md").read_text()
    assert "| decode step, 8 rows |" in table and "| time to first token, 1 request |" in table
    assert doc["machine"]["cpu_model"] in table and doc["machine"]["torch"] in table
    assert "| decode step, 8 rows |" in run.stdout
