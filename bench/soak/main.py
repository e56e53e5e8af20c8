"""`python -m bench.soak` (`make soak`): thousands of mixed requests against `internvl-serve up` with replicas,
sampling memory, file descriptors, Redis memory and the in-flight gauges every `--sample-every` requests; writes
OUT/NAME.md and OUT/NAME.json and exits 1 when the stack grew past a threshold, left work in flight, or answered a
request with a status it should not have.

Requests go out in rounds of `--sample-every`, `--concurrency` at a time; after each round the stack is let go idle
and sampled, so every sample sees the same state (nothing in flight) and the gauges can be checked at each one.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import random
import sys
import time
import urllib.parse
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from bench.machine import machine_info
from bench.soak import mix, probe, report
from bench.stack import RunningStack, redis_client
from services.runtime.redis_cluster import is_cluster_url
from tools.launcher import REPO

log = logging.getLogger("soak")
IDLE_TIMEOUT_S = 30.0


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO / "checkpoints" / "tiny-qwen2-300m"),
                   help="checkpoint directory (written with the tiny preset if it has no config.json)")
    p.add_argument("--requests", type=int, default=3000, help="requests to send (a session's turns count each)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--sample-every", type=int, default=250, help="requests between samples")
    # Measured on the tiny checkpoint: within the first ~800 requests each vision replica's RSS steps up once or twice
    # (the allocator's high-water mark, the first time it meets a larger batch) and the LLMs' prefix caches fill;
    # both are flat after. A leak keeps growing, so fitting after them loses nothing.
    p.add_argument("--warmup", type=int, default=1000, help="requests before the first sample the fit uses")
    p.add_argument("--vision-replicas", type=int, default=2)
    p.add_argument("--llm-replicas", type=int, default=2)
    p.add_argument("--engine", default="transformers")
    p.add_argument("--llm-prefix-cache-mb", type=float, default=32.0,
                   help="each LLM replica's prefix KV cache budget (up's --kv-cache-budget-mb): small, so that the "
                        "cache is full within the warm-up and its growth, which is by design, is not taken for a leak")
    # glibc gives each thread that allocates an arena of its own (up to 8 per core) and keeps freed blocks in them:
    # with its default, a vision replica's RSS wandered in a ~110 MiB band over 3000 requests (up and down, as the
    # busy threads changed), which a linear fit over a few thousand requests cannot tell from a leak. Two arenas make
    # RSS follow live memory; a leak still grows it.
    p.add_argument("--malloc-arena-max", type=int, default=2,
                   help="MALLOC_ARENA_MAX for the stack's processes (0: glibc's default)")
    # Even with two arenas a replica's RSS flips by ~45 MiB between samples (a large block mapped and unmapped), so
    # slopes of healthy processes fitted over 2000 requests reached +12 and -21 MiB per 1000 in the runs measured;
    # 20 passes them and still catches a leak of 20 KB per request (one image's tiles are 2.4 MB, its embeddings
    # 0.9 MB on the tiny checkpoint). A smaller leak needs a longer soak.
    p.add_argument("--max-rss-mib-per-1000", type=float, default=20.0,
                   help="fail when a process's RSS grows faster (MiB per 1000 requests; Redis exempt: a cache)")
    p.add_argument("--max-fds-per-1000", type=float, default=1.0,
                   help="fail when a process's open file descriptors grow faster (per 1000 requests)")
    p.add_argument("--seed", type=int, default=0, help="seed of the mix (the same seed sends the same requests)")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--name", default=f"{datetime.date.today().isoformat()}-soak", help="result files' stem")
    p.add_argument("--log-dir", default=None, help="the stack's logs (default: a new temporary directory)")
    return p.parse_args(argv)


def _checkpoint(path: str) -> str:
    if not (Path(path) / "config.json").exists():
        from services.model.tiny import make_tiny

        log.info("writing the tiny checkpoint to %s", path)
        make_tiny(path, preset="tiny")
    return path


def _round(pool: ThreadPoolExecutor, target: mix.Target, rng: random.Random, want: int, concurrency: int,
           next_seed: list[int]) -> list[mix.Outcome]:
    """Tasks drawn from the mix until `want` requests are done (a task in flight counts as its kind's requests),
    never more than `concurrency` at once; their outcomes."""
    outcomes: list[mix.Outcome] = []
    running: dict[Future, int] = {}
    while len(outcomes) < want or running:
        while len(running) < concurrency and (room := want - len(outcomes) - sum(running.values())) > 0:
            kind = mix.draw(rng)
            while mix.requests_of(kind) > room:  # a session's three turns would overshoot the round: redraw
                kind = mix.draw(rng)
            running[pool.submit(mix.run_task, target, kind, next_seed[0])] = mix.requests_of(kind)
            next_seed[0] += 1
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in done:
            del running[future]
            outcomes += future.result()
    return outcomes


def soak(a: argparse.Namespace, stack: RunningStack) -> tuple[list[probe.Sample], list[mix.Outcome], dict, float]:
    """The rounds and their samples: (samples, outcomes, final gauges, seconds of traffic)."""
    pids = {"up": stack.process.pid, **stack.pids}
    metrics_ports = {n: s.metrics_port for n, s in stack.services.items() if s.metrics_port}
    redis = redis_client(stack.redis_url) if stack.redis_url else None
    # One redis-server (the soak starts no cluster, whose connections would not be told apart: all would count).
    one_redis = stack.redis_url and not is_cluster_url(stack.redis_url)
    redis_port = urllib.parse.urlsplit(stack.redis_url).port if one_redis else None
    target = mix.Target.build(stack.channel, stack.services["gateway"].http_port)
    rng, next_seed = random.Random(a.seed), [a.seed * 1_000_000]
    outcomes: list[mix.Outcome] = []
    started = time.perf_counter()
    samples = [probe.take(0, 0.0, pids, metrics_ports, redis, redis_port, IDLE_TIMEOUT_S)]
    with ThreadPoolExecutor(a.concurrency, thread_name_prefix="soak") as pool:
        while len(outcomes) < a.requests:
            want = min(a.sample_every, a.requests - len(outcomes))
            outcomes += _round(pool, target, rng, want, a.concurrency, next_seed)
            samples.append(probe.take(len(outcomes), time.perf_counter() - started, pids, metrics_ports, redis,
                                      redis_port, IDLE_TIMEOUT_S))
            unexpected = sum(not o.expected for o in outcomes)
            log.info("%d requests, %.0f s, %d unexpected; RSS MiB %s", len(outcomes), samples[-1].elapsed_s,
                     unexpected, {k: round(v) for k, v in samples[-1].rss_mib.items()})
    elapsed = time.perf_counter() - started
    return samples, outcomes, samples[-1].gauges, elapsed


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    a = parse(argv)
    model = _checkpoint(a.model)
    machine = machine_info("float32", "cpu")
    if a.malloc_arena_max:
        os.environ["MALLOC_ARENA_MAX"] = str(a.malloc_arena_max)  # read by the stack's processes as they start
    log.info("starting up: %d vision + %d LLM replicas on %s", a.vision_replicas, a.llm_replicas, model)
    with RunningStack(model, "float32", a.vision_replicas, log_dir=Path(a.log_dir) if a.log_dir else None,
                      llm_replicas=a.llm_replicas, engine=a.engine, http=True,
                      extra_flags=["--kv-cache-budget-mb", str(a.llm_prefix_cache_mb)]) as stack:
        log.info("up in %.0f s; logs in %s", stack.startup_s, stack.log_dir)
        samples, outcomes, final_gauges, elapsed = soak(a, stack)
    limits = report.Thresholds(a.max_rss_mib_per_1000, a.max_fds_per_1000)
    g, counts = report.growth(samples, a.warmup), report.outcome_counts(outcomes)
    doc = {"requests": len(outcomes), "elapsed_s": elapsed,
           "config": {"argv": argv, "model": Path(model).name, "engine": a.engine,
                      "vision_replicas": a.vision_replicas, "llm_replicas": a.llm_replicas,
                      "llm_prefix_cache_mb": a.llm_prefix_cache_mb,
                      "malloc_arena_max": a.malloc_arena_max, "concurrency": a.concurrency, "sample_every": a.sample_every, "warmup": a.warmup,
                      "max_rss_mib_per_1000": a.max_rss_mib_per_1000, "max_fds_per_1000": a.max_fds_per_1000},
           "machine": machine, "growth": g, "outcomes": counts, "final_gauges": final_gauges,
           "failures": report.failures(g, counts, final_gauges, limits), "samples": samples}
    js, md = report.write(doc, Path(a.out), a.name)
    print(md.read_text())
    print(f"wrote {md} and {js}")
    return 1 if doc["failures"] else 0
