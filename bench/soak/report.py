"""The soak's verdict and its write-up: growth per thousand requests (least-squares slopes over the samples taken
after the warm-up), outcome counts by kind and status, the checks that fail the run, and the markdown/JSON files."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.soak.mix import Outcome
from bench.soak.probe import Sample

MIB = 2**20
# Redis is the embedding cache: its memory grows with new images up to maxmemory by design, so its growth is
# reported and not held to the RSS threshold (its descriptors are).
CACHE_PROCESSES = ("redis",)


@dataclass(frozen=True)
class Thresholds:
    rss_mib_per_1000: float
    fds_per_1000: float


def slope_per_1000(points: Sequence[tuple[int, float]]) -> float | None:
    """The least-squares slope of value over requests, times 1000; None with fewer than two distinct x."""
    if len({x for x, _ in points}) < 2:
        return None
    xs, ys = zip(*points, strict=True)
    return statistics.linear_regression(xs, ys).slope * 1000


def growth(samples: Sequence[Sample], warmup: int) -> dict:
    """Per process: RSS (MiB) and fds per 1000 requests, fitted over samples taken at or after `warmup` requests;
    Redis used_memory in MiB per 1000 requests; and the first/last fitted values for context."""
    fitted = [s for s in samples if s.requests >= warmup]
    names = sorted(set.intersection(*(set(s.rss_mib) for s in fitted))) if fitted else []
    per_process = {}
    for name in names:
        rss = [(s.requests, s.rss_mib[name]) for s in fitted]
        fds = [(s.requests, float(s.fds[name])) for s in fitted]
        pooled = [(s.requests, float(s.redis_fds.get(name, 0))) for s in fitted]
        other = [(x, total - p) for (x, total), (_, p) in zip(fds, pooled, strict=True)]
        per_process[name] = {"rss_mib_per_1000": slope_per_1000(rss), "fds_per_1000": slope_per_1000(fds),
                             "other_fds_per_1000": slope_per_1000(other),
                             "rss_mib_first": rss[0][1], "rss_mib_last": rss[-1][1],
                             "fds_first": int(fds[0][1]), "fds_last": int(fds[-1][1]),
                             "redis_fds_first": int(pooled[0][1]), "redis_fds_last": int(pooled[-1][1])}
    redis = [(s.requests, s.redis_used_memory / MIB) for s in fitted if s.redis_used_memory is not None]
    return {"fitted_samples": len(fitted), "from_requests": fitted[0].requests if fitted else None,
            "processes": per_process, "redis_used_memory_mib_per_1000": slope_per_1000(redis),
            "redis_used_memory_mib_first": redis[0][1] if redis else None,
            "redis_used_memory_mib_last": redis[-1][1] if redis else None}


def outcome_counts(outcomes: Sequence[Outcome]) -> dict:
    """Counts by (kind, transport, code), and the unexpected ones by code."""
    by = Counter((o.kind, o.transport, o.code, o.expected) for o in outcomes)
    rows = [{"kind": k, "transport": t, "code": c, "expected": e, "count": n} for (k, t, c, e), n in sorted(by.items())]
    unexpected = Counter(f"{o.kind} {o.transport} {o.code}" for o in outcomes if not o.expected)
    return {"rows": rows, "by_code": dict(sorted(Counter(o.code for o in outcomes).items())),
            "unexpected": dict(unexpected)}


def failures(g: dict, counts: dict, final_gauges: dict[str, float], limits: Thresholds) -> list[str]:
    """Every reason the run fails: unexpected outcomes, gauges not back to 0, growth over a threshold, too few
    samples to fit."""
    found = [f"{n} unexpected: {what}" for what, n in counts["unexpected"].items()]
    found += [f"{name} = {value:g} after the run (must be 0)" for name, value in final_gauges.items() if value]
    if g["fitted_samples"] < 2:
        found.append(f"only {g['fitted_samples']} sample(s) after the warm-up: nothing to fit")
    for name, p in g["processes"].items():
        rss, fds = p["rss_mib_per_1000"], p["other_fds_per_1000"]
        if rss is not None and name not in CACHE_PROCESSES and rss > limits.rss_mib_per_1000:
            found.append(f"{name}: RSS grows {rss:.2f} MiB per 1000 requests (limit {limits.rss_mib_per_1000:g})")
        if fds is not None and fds > limits.fds_per_1000:
            found.append(f"{name}: {fds:.2f} more fds (besides Redis connections) per 1000 requests "
                         f"(limit {limits.fds_per_1000:g})")
    return found


def _num(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}"


def _header(doc: dict) -> list[str]:
    c, m, g = doc["config"], doc["machine"], doc["growth"]
    setup = (f"`python -m bench.soak {' '.join(c['argv'])}`: `internvl-serve up` with {c['vision_replicas']} vision "
             f"and {c['llm_replicas']} LLM replicas ({c['engine']} engine, {c['model']}, float32, a prefix KV cache of "
             f"{c['llm_prefix_cache_mb']:g} MiB per LLM replica; MALLOC_ARENA_MAX="
             f"{c['malloc_arena_max'] or 'unset'}) and its own "
             f"redis-server; {c['concurrency']} concurrent clients over gRPC and HTTP; a sample every "
             f"{c['sample_every']} requests once the stack is idle; growth fitted from request {g['from_requests']} "
             f"on ({g['fitted_samples']} samples). {doc['elapsed_s']:.0f} s in all, "
             f"{doc['requests'] / doc['elapsed_s']:.1f} requests/s.")
    load = ", ".join(f"{x:.1f}" for x in m["load_average_at_start"])
    machine = (f"Machine: {m['cpu_model']}, {m['logical_cpus']} logical CPUs ({m['usable_cpus']} usable), "
               f"{m['memory_gib']} GiB RAM; load average at start {load}; torch {m['torch']}, Python {m['python']}.")
    verdict = (f"**Verdict: {'FAIL' if doc['failures'] else 'PASS'}** (limits per process: RSS "
               f"{c['max_rss_mib_per_1000']:g} MiB (Redis exempt: a cache) and {c['max_fds_per_1000']:g} fds "
               "besides Redis connections per 1000 requests (a Redis client's pool keeps every connection it "
               "opened, up to its bound, so those are shown apart); no unexpected status; every in-flight gauge 0 "
               "at the end).")
    return [f"# Soak: {doc['requests']} requests", "", setup, "", machine, "", verdict, "",
            *[f"- {f}" for f in doc["failures"]], *([""] if doc["failures"] else [])]


def _growth_table(g: dict) -> list[str]:
    head = ("| process | RSS MiB/1000 req | fds/1000 req besides Redis connections | all fds/1000 req | "
            "RSS MiB (first → last fitted) | fds (first → last) | of which Redis connections |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for name, p in g["processes"].items():
        lines.append(f"| {name} | {_num(p['rss_mib_per_1000'])} | {_num(p['other_fds_per_1000'])} | "
                     f"{_num(p['fds_per_1000'])} | {p['rss_mib_first']:.1f} → {p['rss_mib_last']:.1f} | "
                     f"{p['fds_first']} → {p['fds_last']} | {p['redis_fds_first']} → {p['redis_fds_last']} |")
    first, last = g["redis_used_memory_mib_first"], g["redis_used_memory_mib_last"]
    redis = (f"Redis used_memory: {_num(g['redis_used_memory_mib_per_1000'])} MiB per 1000 requests ({first:.2f} → "
             f"{last:.2f} MiB: the embedding cache, new images included, bounded by its maxmemory)."
             if first is not None else "Redis used_memory: not sampled.")
    return [*lines, "", redis, ""]


def _caches(samples: Sequence[dict]) -> str:
    """The caches at the first and last sample: what grows by design, beside the processes' memory."""
    first, last = samples[0]["caches"], samples[-1]["caches"]
    shown = [f"{name} {first.get(name, 0):g} → {value:g}" for name, value in last.items()]
    return "Caches (first → last sample): " + ("; ".join(shown) or "none sampled") + "."


def markdown(doc: dict) -> str:
    """The result as a markdown page: setup, machine, verdict, growth per process, gauges, outcomes."""
    gauges = ", ".join(f"`{k}` = {v:g}" for k, v in doc["final_gauges"].items() if v) or "all 0"
    rows = [f"| {r['kind']} | {r['transport']} | {r['code']} | {'yes' if r['expected'] else '**no**'} | {r['count']} |"
            for r in doc["outcomes"]["rows"]]
    return "\n".join([*_header(doc), *_growth_table(doc["growth"]), _caches(doc["samples"]), "",
                      f"In-flight gauges at the end: {gauges}.", "",
                      "| kind | transport | status | expected | count |", "|---|---|---|---|---|", *rows]) + "\n"


def write(doc: dict, out_dir: Path, name: str) -> tuple[Path, Path]:
    """`name`.json (everything, samples included) and `name`.md into out_dir."""
    doc = json.loads(json.dumps(doc, default=asdict))  # samples as plain dicts, as the markdown reads them
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{name}.json", out_dir / f"{name}.md"
    js.write_text(json.dumps(doc, indent=1, default=asdict) + "\n")
    md.write_text(markdown(doc))
    return js, md
