"""`python -m bench.engines`: one LLM engine (`--engine transformers` or `vllm`) measured in this process, as the LLM
service builds it (the engine factory, `LLMConfig`), on a checkpoint of InternVL2_5-1B's real shape with random
weights (`make-tiny --preset 1b-shape`) unless `--model` names one. No vision service: an image is its rows of
random embeddings [tiles * 256, hidden] under a content key of its own, as the service would fetch them from Redis.

Measured, each `--repeats` times (medians, and every sample):
1. decode throughput, 1 stream and 8 streams: distinct ~100-token text prompts, greedy, `--tokens` new tokens each
   (the end of turn biased away, so every answer has them all); tokens after each stream's first over the span from
   the earliest first token to the last token (the decode phase; prefill excluded);
2. time to first token of one image prompt (5 tiles, 1,280 image slots plus text): uncached (a new image, so a new
   prefix) and cached (the same request again: its prompt from the engine's prefix cache, `cached_prompt_tokens`
   says how much), from submit to the first token's event.

Each engine in a process of its own (bench/gpu_check.py runs this once per engine), so one's memory is not the
other's. Writes `--json PATH` and prints a one-line summary per figure.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.machine import choose_dtype, machine_info
from services.contract import template
from services.contract.conversation import Conversation, ImageRef
from services.contract.sampling import SamplingParams
from services.llm.config import LLMConfig
from services.llm.engine.events import EngineRequest, Finish, TokenDelta
from services.llm.engine.factory import build_engine
from services.llm.prompt import PromptBuilder
from services.model.checkpoint import Checkpoint, open_checkpoint
from services.model.modules import load_tokenizer

STREAMS = (1, 8)
IMAGE_TILES = 5
WORDS = ("river", "lamp", "orange", "window", "forest", "engine", "violet", "harbour", "pencil", "cloud")


@dataclass(frozen=True)
class Settings:
    engine: str
    device: str
    dtype: str
    tokens: int  # new tokens per decode answer
    repeats: int
    context: int  # prompt + answer limit given to the engine
    kv_budget_mb: float  # 0: the engine's default share of the free memory


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=("transformers", "vllm"), required=True)
    parser.add_argument("--model", default=None,
                        help="checkpoint directory (default: a random 1b-shape checkpoint written to a temp dir)")
    parser.add_argument("--preset", default="1b-shape", choices=("tiny", "small", "1b-shape"),
                        help="make-tiny preset of the random checkpoint (default 1b-shape)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="default: bfloat16 on a GPU or a CPU with native bf16, float32 otherwise")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per decode answer (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="samples of each figure (default 3)")
    parser.add_argument("--context", type=int, default=8192, help="prompt + answer limit (default 8192)")
    parser.add_argument("--kv-budget-mb", type=float, default=0.0,
                        help="KV memory (default 0: the engine's share of the free memory)")
    parser.add_argument("--json", required=True, help="where the results go")


async def _answer(engine, request: EngineRequest) -> dict:
    """One answer's token arrival times (perf_counter) and its finish."""
    submitted, times, finish = time.perf_counter(), [], None
    async for event in engine.submit(request):
        if isinstance(event, TokenDelta):
            times += [time.perf_counter()] * len(event.token_ids)
        elif isinstance(event, Finish):
            finish = event
    return {"submitted": submitted, "times": times, "finish": finish}


def _text_request(prompts: PromptBuilder, stop_id: int, seed: int, tokens: int) -> EngineRequest:
    words = " ".join(WORDS[(seed * 7 + i) % len(WORDS)] for i in range(80))
    prompt = prompts.build(Conversation(user_parts=(f"Request {seed}: continue this list: {words}",)))
    return EngineRequest(prompt, SamplingParams(max_new_tokens=tokens, logit_bias=((stop_id, -100.0),)), tokens)


def _image_request(prompts: PromptBuilder, checkpoint: Checkpoint, seed: int) -> EngineRequest:
    key = "bench:emb:" + hashlib.sha256(f"image-{seed}".encode()).hexdigest()
    prompt = prompts.build(Conversation(user_parts=(ImageRef(key, IMAGE_TILES), "Describe the picture.")))
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(IMAGE_TILES * prompts.tokens_per_tile, checkpoint.spec.llm_hidden_size, generator=generator)
    return EngineRequest(prompt, SamplingParams(max_new_tokens=2), 2, (rows * 0.02,))


async def decode_tokens_per_s(engine, requests: list[EngineRequest]) -> float:
    """Tokens after each answer's first, over the span from the earliest first token to the last token."""
    answers = await asyncio.gather(*(_answer(engine, r) for r in requests))
    start = min(a["times"][0] for a in answers)
    end = max(a["times"][-1] for a in answers)
    return sum(len(a["times"]) - 1 for a in answers) / (end - start)


async def ttft(engine, request: EngineRequest) -> tuple[float, int]:
    """(seconds from submit to the first token, the prompt's cached tokens)."""
    answer = await _answer(engine, request)
    return answer["times"][0] - answer["submitted"], answer["finish"].usage.cached_prompt_tokens


def _summary(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


async def measure(s: Settings, model_dir: Path) -> dict:
    checkpoint = open_checkpoint(str(model_dir))
    tokenizer = load_tokenizer(checkpoint)
    config = LLMConfig(model=str(model_dir), engine=s.engine, device=s.device, dtype=s.dtype,
                       kv_budget_mb=s.kv_budget_mb, max_context_tokens=s.context, max_batch_size=max(STREAMS))
    prompts = PromptBuilder(tokenizer, checkpoint.spec.tokens_per_tile, checkpoint.spec.system_message, s.context)
    stop_id = tokenizer.convert_tokens_to_ids(template.STOP_TOKEN)
    started = time.perf_counter()
    engine = await asyncio.to_thread(build_engine, config, checkpoint, tokenizer, prompts, s.context)
    await engine.start()
    start_s = time.perf_counter() - started
    try:
        await _answer(engine, _text_request(prompts, stop_id, 999, 4))  # warm-up
        decode = {}
        for streams in STREAMS:
            samples = []
            for repeat in range(s.repeats):
                requests = [_text_request(prompts, stop_id, 100 * repeat + i, s.tokens) for i in range(streams)]
                samples.append(await decode_tokens_per_s(engine, requests))
            decode[f"{streams}_streams_tokens_per_s"] = _summary(samples)
        uncached, cached, cached_tokens = [], [], []
        for repeat in range(s.repeats):
            request = _image_request(prompts, checkpoint, 1000 + repeat)
            uncached.append((await ttft(engine, request))[0])
            seconds, tokens = await ttft(engine, request)
            cached.append(seconds)
            cached_tokens.append(tokens)
        return {"engine_start_s": start_s, "decode": decode,
                "ttft_image_uncached_s": _summary(uncached), "ttft_image_cached_s": _summary(cached),
                "image_prompt_tokens": len(request.prompt), "cached_prompt_tokens": cached_tokens}
    finally:
        await engine.close()


def run(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype, _ = choose_dtype(args.dtype, device)
    s = Settings(args.engine, device, dtype, args.tokens, args.repeats, args.context, args.kv_budget_mb)
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
        model_dir = Path(args.model) if args.model else _random_checkpoint(Path(tmp), args.preset)
        results = asyncio.run(measure(s, model_dir))
    doc = {"settings": vars(s), "model": args.model or f"random make-tiny --preset {args.preset}",
           "machine": machine_info(dtype, device), **results}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2))
    for streams in STREAMS:
        print(f"{s.engine}: decode, {streams} stream(s): "
              f"{results['decode'][f'{streams}_streams_tokens_per_s']['median']:.1f} tok/s")
    print(f"{s.engine}: TTFT, {IMAGE_TILES}-tile image: uncached {results['ttft_image_uncached_s']['median']:.3f} s, "
          f"cached {results['ttft_image_cached_s']['median']:.3f} s")
    return 0


def _random_checkpoint(root: Path, preset: str) -> Path:
    from services.model.tiny import make_tiny

    return make_tiny(root / preset, preset=preset)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engines", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
