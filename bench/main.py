"""`internvl-serve bench`: the stack against transformers' InternVL path on the same weights, in one run.

Writes a random checkpoint of InternVL2_5-1B's real shape (or the tiny one with --quick; or benchmarks --model),
measures the machine's limits, runs the repeats (the baseline in this process and the stack with one vision and one
LLM replica, both up, each scenario's two sides taken in turn), the scaled pool in that stack, then the stack with
two vision replicas and three LLM replicas, then three LLM replicas under round_robin routing on a Redis Cluster,
and writes `<out>/<date>.json`, `<out>/<date>.md` and PNG plots. `--scenarios` measures some scenarios only,
skipping the phases none of them needs.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

from bench import phases, pool, report, scenarios
from bench.machine import machine_info, measure_limits, vision_flops_per_tile
from bench.peer import phases as peer_phases
from bench.settings import SCENARIOS, BenchSettings
from services.model.checkpoint import open_checkpoint
from services.model.torch_dtypes import TORCH_DTYPES

log = logging.getLogger("bench")

MODEL_DESCRIPTIONS = {
    "1b-shape": "random weights with InternVL2_5-1B's real dimensions (InternViT-300M + pixel shuffle + MLP "
                "projector, Qwen2.5-0.5B; written by `internvl-serve make-tiny --preset 1b-shape`)",
    "tiny": "the tiny random checkpoint (`make-tiny --preset tiny`; a smoke test, not a performance figure)",
    "small": "the small random checkpoint (`make-tiny --preset small`, an LLM head size of 32, the least vLLM's CPU "
             "attention runs; a smoke test, not a performance figure)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="tiny model, 1 repeat, few tokens: a smoke run of every scenario in about a minute")
    parser.add_argument("--out", default="bench/results", help="directory for the JSON, markdown and plots")
    parser.add_argument("--repeats", type=int, default=None,
                        help="repeats per scenario (default 2, about an hour on 2 CPU cores; 1 with --quick; scenario 9 "
                             "runs in the first only)")
    parser.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default=None,
                        help="benchmark dtype (default: bfloat16 on a GPU or a CPU with AMX/AVX512-BF16, else float32)")
    parser.add_argument("--model", default=None,
                        help="benchmark this checkpoint instead of writing a random one of the 1B shape")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="where the random checkpoint is written (default checkpoints/bench-<preset>; reused)")
    parser.add_argument("--name", default=None, help="file stem of the results (default: today's date)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run of the same --name/date after its last completed phase")
    parser.add_argument("--scenarios", type=_scenario_list, default=None, metavar="N[,N...]",
                        help=f"measure only these scenarios ({SCENARIOS[0]}-{SCENARIOS[-1]}; e.g. 8 for the scaled "
                             "pool alone); phases none of them needs are skipped (default: all)")


def _scenario_list(text: str) -> frozenset[int]:
    try:
        return frozenset(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of scenario numbers: {text!r}") from None


# The scenarios each phase measures a part of: a phase runs when one of them is selected. "repeat" is one phase per
# repeat (repeat-1, repeat-2, ...): the baseline and the stack with one vision replica, interleaved (`phases`).
PHASE_SCENARIOS = {
    "limits": {7},
    "repeat": {1, 2, 3, 4, 5, 6, 7, 9},
    "stack-1": {8},
    "stack-2": {5, 8},
    "stack-round-robin": {8},
    "peer-repeat": {10, 11, 12, 14},
    "peer-pool": {12, 13},
    "limits-end": {7},
}


def _checkpoint(s: BenchSettings) -> str:
    if s.model:
        return s.model
    if not (s.checkpoint_dir / "config.json").exists():
        from services.model.tiny import make_tiny

        log.info("writing a random %s checkpoint to %s", s.preset, s.checkpoint_dir)
        make_tiny(s.checkpoint_dir, preset=s.preset)
    return str(s.checkpoint_dir)


def _limits(settings: BenchSettings, rec: phases.Recorder, when: str) -> None:
    """Measured at the start and at the end; the machine's limit is the better of the two (other work on a shared
    machine can only make a measurement lower)."""
    log.info("measuring read bandwidth and matrix throughput (%s, %s)", settings.dtype, when)
    limits = measure_limits(TORCH_DTYPES[settings.dtype], settings.device, settings.workload.bandwidth_mib,
                            settings.workload.matmul_sizes)
    log.info("  %.1f GB/s read, %.0f GFLOP/s", limits["read_bandwidth_bytes_per_s"] / 1e9,
             limits["matmul_flops_per_s"] / 1e9)
    rec.extra[f"limits_{when}"] = limits
    best = dict(rec.extra.get("limits") or limits)
    for key in ("read_bandwidth_bytes_per_s", "matmul_flops_per_s"):
        best[key] = max(best[key], limits[key])
    rec.extra["limits"] = best


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO)
    logging.getLogger("bench").setLevel(logging.INFO)
    settings = BenchSettings.from_args(args)
    # SIGTERM unwinds like Ctrl-C, so the stack under test is stopped and the phases done so far stay saved.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        import matplotlib  # noqa: F401 - checked now, not after an hour of measuring
    except ImportError:
        print("internvl-serve bench: error: matplotlib is not installed (pip install -e '.[dev]')", file=sys.stderr)
        return 2
    machine = machine_info(settings.dtype, settings.device)
    log.info("bench: %s, %s logical CPUs, torch %s, dtype %s (%s)", machine["cpu_model"], machine["logical_cpus"],
             machine["torch"], settings.dtype, settings.dtype_reason)
    model = _checkpoint(settings)
    spec = open_checkpoint(model).spec

    # Everything recorded is saved after each phase; --resume skips the phases an interrupted run completed.
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    partial = settings.out_dir / f"{settings.stamp}.json.tmp"
    rec = phases.Recorder.restore(partial) if args.resume and partial.exists() else phases.Recorder()
    done = rec.extra.setdefault("phases_done", [])
    if done:
        log.info("resuming %s: phases %s already done", partial, ", ".join(done))
    # The scaled pool's session images are encoded in the first stack; later stacks get their cache values copied.
    cached = pool.CachedValues()
    # The repeats' baseline and stack, started on first use and kept up through the repeats.
    subjects = phases.Subjects(settings, model, rec)
    peers = peer_phases.PeerSides(settings, model, rec)
    steps = [
        ("limits", "limits", lambda: _limits(settings, rec, "start")),
        *((f"repeat-{r + 1}", "repeat", lambda r=r: phases.run_repeat(settings, subjects, rec, r))
          for r in range(settings.repeats)),
        ("stack-1", "stack-1", lambda: phases.run_one_replica(settings, subjects, rec, cached)),
        ("stack-2", "stack-2", lambda: phases.run_stack(settings, model, rec, replicas=2, cached=cached)),
        ("stack-round-robin", "stack-round-robin", lambda: phases.run_round_robin(settings, model, rec,
                                                                                   cached=cached)),
        *((f"peer-1-repeat-{r + 1}", "peer-repeat", lambda r=r: peer_phases.run_repeat(settings, peers, rec, r))
          for r in range(settings.repeats)),
        ("peer-3", "peer-pool", lambda: peer_phases.run_pool(settings, model, rec)),
        ("limits-end", "limits-end", lambda: _limits(settings, rec, "end")),
    ]
    unknown = sorted(set(done) - {name for name, _, _ in steps})
    if unknown:
        # E.g. "baseline" of a run before the repeats were interleaved, or a repeat beyond this --repeats.
        print(f"internvl-serve bench: error: {partial} has phases {unknown} that this run does not have; resume with "
              "the same --repeats, or start again without --resume", file=sys.stderr)
        return 2
    steps = [(name, step) for name, kind, step in steps if not settings.scenarios.isdisjoint(PHASE_SCENARIOS[kind])]
    rec.extra["vision_flops_per_tile"] = vision_flops_per_tile(spec)
    rec.extra["machine_cpus"] = machine["usable_cpus"]
    rec.extra["resumed"] = bool(done)
    seconds = rec.extra.setdefault("phase_seconds", {})
    try:
        for name, step in steps:
            if name not in done:
                phase_started = time.perf_counter()
                step()
                seconds[name] = time.perf_counter() - phase_started
                done.append(name)
                rec.save(partial)
    finally:
        # An interrupted repeat leaves its stack up and its baseline loaded (a peer repeat, its sides up).
        subjects.close()
        peers.close()
    limits = rec.extra.get("limits")

    machine["load_average_at_end"] = list(os.getloadavg())
    built = scenarios.build(settings, rec, limits)
    doc = {
        "stamp": settings.stamp,
        "machine": machine,
        "config": {
            "quick": settings.quick, "repeats": settings.repeats, "preset": settings.preset, "model": model,
            "model_description": (f"the checkpoint at {settings.model}" if settings.model
                                  else MODEL_DESCRIPTIONS[settings.preset]),
            "dtype_reason": settings.dtype_reason, "workload": settings.workload.__dict__,
            "scenarios": sorted(settings.scenarios),
        },
        # Across a --resume, the phases' own durations add up to the run's.
        "wall_s": sum(seconds.values()),
        "extra": rec.extra,
    }
    paths = report.write(doc, settings.out_dir, settings.stamp, built)
    partial.unlink(missing_ok=True)
    missing = [s.number for s in built if not s.has_numbers()]
    for path in paths.values():
        print(path)
    if missing:
        print(f"scenarios without numbers: {missing}", file=sys.stderr)
        return 1
    return 0


def main() -> int:  # pragma: no cover - `python -m bench.main`
    parser = argparse.ArgumentParser(prog="internvl-serve bench")
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

