"""The soak (`python -m bench.soak`, `make soak`): its verdict on hand-made samples, and a short run end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from procs import REPO

from bench.soak import mix, report
from bench.soak.probe import Sample

LIMITS = report.Thresholds(rss_mib_per_1000=5.0, fds_per_1000=1.0)


def _samples(rss_step: float, fds_step: int, process: str = "llm") -> list[Sample]:
    """Samples every 100 requests from 0 to 500, `process` growing by the steps per sample, the gateway flat."""
    return [Sample(n, float(n), rss_mib={process: 500 + rss_step * n / 100, "gateway": 100.0},
                   fds={process: 20 + fds_step * n // 100, "gateway": 30 + n // 100},
                   redis_fds={process: 0, "gateway": n // 100}, redis_used_memory=(1 + n // 100) << 20)
            for n in range(0, 600, 100)]


def test_slope_is_per_thousand_requests():
    assert report.slope_per_1000([(0, 10.0), (500, 12.0), (1000, 14.0)]) == pytest.approx(4.0)
    assert report.slope_per_1000([(100, 1.0), (100, 2.0)]) is None  # one x: nothing to fit


def test_growth_fits_only_after_the_warmup():
    samples = _samples(0.0, 0)
    samples[0].rss_mib["llm"] = 100.0  # the warm-up's jump, before request 100: not in the fit
    g = report.growth(samples, warmup=100)
    assert g["fitted_samples"] == 5 and g["from_requests"] == 100
    assert g["processes"]["llm"]["rss_mib_per_1000"] == pytest.approx(0.0)
    # Redis grows 1 MiB per 100 requests in _samples.
    assert g["redis_used_memory_mib_per_1000"] == pytest.approx(10.0)


def test_a_leak_fails_the_run_and_names_the_process():
    g = report.growth(_samples(rss_step=1.0, fds_step=1), warmup=0)  # 10 MiB and 10 fds per 1000 requests
    found = report.failures(g, report.outcome_counts([]), {}, LIMITS)
    assert any(f.startswith("llm: RSS grows 10.00 MiB") for f in found), found
    assert any(f.startswith("llm: 10.00 more fds (besides Redis connections)") for f in found), found
    # The gateway's fds grow as fast, all of them connections to Redis (a pool's high-water mark): no failure.
    assert g["processes"]["gateway"]["fds_per_1000"] == pytest.approx(10.0)
    assert not any(f.startswith("gateway") for f in found), found


def test_redis_rss_is_a_cache_but_its_fds_are_held_to_the_limit():
    g = report.growth(_samples(rss_step=1.0, fds_step=1, process="redis"), warmup=0)
    found = report.failures(g, report.outcome_counts([]), {}, LIMITS)
    assert found == ["redis: 10.00 more fds (besides Redis connections) per 1000 requests (limit 1)"]


def test_unexpected_statuses_and_work_left_in_flight_fail_the_run():
    outcomes = [mix.Outcome("text_grpc", "grpc", "OK", True, 0.1),
                mix.Outcome("text_grpc", "grpc", "INTERNAL", False, 0.1),
                mix.Outcome("refused_bad_image", "grpc", "INVALID_ARGUMENT", True, 0.1)]
    counts = report.outcome_counts(outcomes)
    assert counts["unexpected"] == {"text_grpc grpc INTERNAL": 1}
    assert counts["by_code"] == {"INTERNAL": 1, "INVALID_ARGUMENT": 1, "OK": 1}
    found = report.failures(report.growth(_samples(0.0, 0), 0), counts, {"llm internvl_llm_running_sequences": 1.0},
                            LIMITS)
    assert found == ["1 unexpected: text_grpc grpc INTERNAL",
                     "llm internvl_llm_running_sequences = 1 after the run (must be 0)"]


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_short_soak_end_to_end(tiny_checkpoint, tmp_path):
    """150 requests against `up` (one replica of each, to stay short), sampled every 50: every kind sent, every
    status the expected one, every process and gauge sampled, the report written. The growth limits are lifted: 150
    requests are all warm-up, so their slopes say nothing (the committed run is the measurement)."""
    run = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--model", str(tiny_checkpoint()), "--requests", "150",
         "--sample-every", "50", "--warmup", "50", "--vision-replicas", "1", "--llm-replicas", "1",
         "--max-rss-mib-per-1000", "1e9", "--max-fds-per-1000", "1e9", "--out", str(tmp_path), "--name", "short",
         "--log-dir", str(tmp_path / "logs")],
        check=False, cwd=REPO, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "protos")])},
        capture_output=True, text=True, timeout=170)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    doc = json.loads((tmp_path / "short.json").read_text())

    assert doc["requests"] == 150 and doc["failures"] == []
    assert [s["requests"] for s in doc["samples"]] == [0, 50, 100, 150]
    processes = {"up", "redis", "gateway", "vision-0", "llm"}
    for sample in doc["samples"]:
        assert set(sample["rss_mib"]) == processes and set(sample["fds"]) == processes, sample
        assert all(v > 0 for v in sample["rss_mib"].values()) and all(v > 0 for v in sample["fds"].values())
        assert sample["redis_used_memory"] > 0
        assert not any(sample["gauges"].values()), sample["gauges"]
    # By the end every service but `up` has talked to Redis (the LLM only once it read embeddings); redis-server
    # holds the other ends.
    last = doc["samples"][-1]["redis_fds"]
    assert all(last[name] > 0 for name in processes - {"up"}) and last["up"] == 0, last
    assert {k.split()[0] for k in doc["final_gauges"]} == {"gateway", "vision-0", "llm"}
    assert "llm internvl_llm_running_sequences" in doc["final_gauges"]

    g = doc["growth"]
    assert g["fitted_samples"] == 3 and set(g["processes"]) == processes
    assert all(isinstance(p["rss_mib_per_1000"], float) for p in g["processes"].values())
    rows = doc["outcomes"]["rows"]
    assert {r["kind"] for r in rows} == set(mix.KIND_NAMES), rows
    assert doc["outcomes"]["unexpected"] == {} and all(r["expected"] for r in rows)
    codes = {(r["kind"], r["code"]) for r in rows}
    assert ("refused_bad_image", "INVALID_ARGUMENT") in codes and ("refused_unknown_session", "404") in codes
    assert {c for k, c in codes if k.startswith("cancel")} <= {"CANCELLED", "OK", "200"}
    assert sum(r["count"] for r in rows) == 150

    page = (tmp_path / "short.md").read_text()
    assert "**Verdict: PASS**" in page and doc["machine"]["cpu_model"] in page
    assert "| llm |" in page and "Redis used_memory:" in page
