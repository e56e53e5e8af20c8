"""What one benchmark run does: the model, the dtype, the repeats and every scenario's workload size.

Built once by the CLI (`BenchSettings.from_args`) and passed down; nothing else reads the command line.
The full run uses InternVL2_5-1B's real dimensions with random weights; `--quick` uses the tiny preset, one repeat and
a few tokens, so it finishes in about a minute (the smoke test runs it).
"""

from __future__ import annotations

import argparse
import datetime
from dataclasses import dataclass
from pathlib import Path

from bench.machine import choose_device, choose_dtype
from services.contract.errors import InvalidArgumentError

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Workload:
    """Sizes of each scenario's inputs; the README's table states them."""

    # 1. Cache: Encode of one image of `cache_image_side`² pixels cut into at most `cache_max_num` tiles
    #    (896² -> a 2x2 grid plus the thumbnail: 5 tiles), then `hit_calls` Encodes of the same image.
    cache_image_side: int = 896
    cache_max_num: int = 4
    hit_calls: int = 5
    # 2. Multi-round: three turns about one such image, `turn_new_tokens` each.
    session_image_side: int = 896
    session_max_num: int = 4
    turn_new_tokens: int = 16
    # 3. Concurrency: `concurrency` requests, each with its own 448² image (one tile) and `concurrency_new_tokens`.
    concurrency: int = 8
    concurrency_image_side: int = 448
    concurrency_new_tokens: int = 64
    # 4. Overhead: one cold request, a 448² image (one tile), `overhead_new_tokens`.
    overhead_image_side: int = 448
    overhead_new_tokens: int = 32
    # 5. Video: `video_frames` sampled frames of `frame_side`² pixels (one tile each), `video_new_tokens`.
    video_frames: int = 16
    frame_side: int = 448
    video_new_tokens: int = 8
    # 7. Single-stream decode through the stack: a short text prompt, `decode_new_tokens` tokens.
    decode_new_tokens: int = 64
    bandwidth_mib: int = 1024
    matmul_sizes: tuple[int, ...] = (2048, 4096)
    # 8. Scaled pool: sessions of three turns, each about its own `pool_image_side`² image (max_num `pool_max_num`:
    #    5 tiles, as in 2), `pool_new_tokens` per turn, on 1 LLM replica and on `pool_replicas` with each routing
    #    policy: `pool_sessions` one at a time, then `pool_sessions` others all at once; then `fetch_calls`
    #    FetchEmbeddings of one session image from a single Redis and from a Redis Cluster of `pool_redis_masters`
    #    masters.
    pool_sessions: int = 6
    pool_replicas: int = 3
    pool_image_side: int = 896
    pool_max_num: int = 4
    pool_new_tokens: int = 8
    fetch_calls: int = 20
    pool_redis_masters: int = 3
    # 9. Arrivals: Poisson arrivals (seeded exponential gaps) at each of `arrival_loads` x the sequential chat()
    #    capacity, `arrival_requests` requests per rate. The capacity is 1 / chat()'s mean service time on this mix,
    #    estimated before the first run from `arrival_calibration_runs` unloaded chat()s of each request kind (the
    #    medians of each kind's TTFT and decode step). Each request is text-only, or has one or two fresh
    #    `arrival_image_side`² images (one tile each), with the probabilities `arrival_mix`; its max_new_tokens is
    #    drawn from `arrival_new_tokens`. The targets are read at the highest load. Windowed batch_chat: a batch starts
    #    `arrival_window` x the mean service time after its first request arrived (at once if the worker frees up
    #    later, or when `arrival_max_batch` requests wait). SLO of goodput: TTFT <= `arrival_slo_ttft` x chat()'s
    #    unloaded TTFT of a two-image request and TPOT <= `arrival_slo_tpot` x its unloaded decode step.
    #    Measured in the first `arrival_repeats` repeats (a repeat of it takes about 9 x requests x service time).
    arrival_requests: int = 30
    arrival_loads: tuple[float, ...] = (0.5, 0.9)
    arrival_mix: tuple[float, float, float] = (0.5, 0.3, 0.2)
    arrival_new_tokens: tuple[int, ...] = (8, 12, 16)
    arrival_image_side: int = 448
    arrival_window: float = 0.5
    arrival_max_batch: int = 8
    arrival_slo_ttft: float = 3.0
    arrival_slo_tpot: float = 3.0
    arrival_repeats: int = 1
    arrival_calibration_runs: int = 3
    # 10-14. The peer benchmark (bench/peer): `vllm serve` beside our stack with the vLLM engine and with the
    #    transformers engine. Every vLLM side's KV pool per replica: `peer_kv_mib`. 10: scenario 9's mix and SLO
    #    factors, `peer_arrival_requests` per rate at `peer_arrival_loads` x `vllm serve`'s capacity (in the first
    #    `arrival_repeats` repeats). 11 / 13: `peer_sessions` / `peer_pool_sessions` conversations of 3 turns, each
    #    about its own `peer_image_side`² image (max_num 12: 5 tiles), `peer_turn_tokens` per turn. 12: an image of
    #    that size, then `peer_between` conversations about others (24 x 1,282 image tokens: more than vLLM's encoder
    #    cache holds, 29,440 embeddings at the 1B shape: vLLM sizes it for its largest multimodal item, a video filling
    #    the 32k context; with 3 between, the image was still cached: measured), then the image in a new
    #    conversation, `peer_return_tokens` each. 14: `concurrency` text streams of `peer_decode_tokens`.
    peer_kv_mib: int = 512
    peer_replicas: int = 3
    peer_arrival_requests: int = 30
    peer_arrival_loads: tuple[float, ...] = (0.5, 0.9)
    peer_sessions: int = 2
    peer_pool_sessions: int = 3
    peer_image_side: int = 896
    peer_turn_tokens: int = 16
    peer_between: int = 24
    peer_return_tokens: int = 8
    peer_decode_tokens: int = 64


QUICK_WORKLOAD = Workload(turn_new_tokens=4, concurrency_new_tokens=8, overhead_new_tokens=4, video_frames=4,
                          video_new_tokens=2, decode_new_tokens=8, hit_calls=3, bandwidth_mib=256,
                          matmul_sizes=(1024,), pool_sessions=3, pool_new_tokens=2, fetch_calls=5,
                          arrival_requests=8, arrival_new_tokens=(2, 4, 6), peer_kv_mib=128,
                          peer_arrival_requests=6, peer_sessions=1, peer_pool_sessions=1, peer_turn_tokens=4,
                          peer_between=1, peer_return_tokens=2, peer_decode_tokens=8)
# Every scenario `--scenarios` can name.
SCENARIOS = tuple(range(1, 15))
# The peer benchmark's (bench/peer): `vllm serve` beside our stack.
PEER_SCENARIOS = tuple(range(10, 15))


@dataclass(frozen=True)
class BenchSettings:
    quick: bool
    repeats: int
    dtype: str
    dtype_reason: str
    device: str
    preset: str
    # An existing checkpoint to benchmark instead of writing a random one.
    model: str | None
    checkpoint_dir: Path
    out_dir: Path
    stamp: str
    workload: Workload
    # The scenarios to measure (`--scenarios`); phases that none of them needs are skipped.
    scenarios: frozenset[int] = frozenset(SCENARIOS)
    startup_timeout_s: float = 1800.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchSettings:
        device = choose_device()
        dtype, reason = choose_dtype(args.dtype, device)
        chosen = frozenset(args.scenarios or SCENARIOS)
        # vLLM's CPU attention needs an LLM head size of at least 32; the tiny preset's is 16.
        preset = ("small" if not chosen.isdisjoint(PEER_SCENARIOS) else "tiny") if args.quick else "1b-shape"
        repeats = args.repeats if args.repeats is not None else (1 if args.quick else 2)
        if repeats < 1:
            raise InvalidArgumentError(f"--repeats must be >= 1, got {repeats}")
        if not chosen <= set(SCENARIOS):
            raise InvalidArgumentError(f"--scenarios: no scenario {sorted(chosen - set(SCENARIOS))}; there are "
                                       f"{SCENARIOS[0]} to {SCENARIOS[-1]}")
        checkpoint_dir = Path(args.checkpoint_dir or REPO / "checkpoints" / f"bench-{preset}")
        stamp = datetime.datetime.now().strftime("%Y-%m-%d" if not args.quick else "%Y-%m-%d-quick")
        return cls(quick=args.quick, repeats=repeats, dtype=dtype, dtype_reason=reason, device=device,
                   preset=preset, model=args.model, checkpoint_dir=checkpoint_dir, out_dir=Path(args.out),
                   stamp=args.name or stamp, workload=QUICK_WORKLOAD if args.quick else Workload(),
                   scenarios=chosen)
