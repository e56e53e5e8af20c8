"""`internvl-serve bench-lora`: LoRA adapters batched with the base in one engine, against the base alone.

One language model is loaded and random adapters are installed in it (written to disk in ms-swift / PEFT layout,
read back with `read_adapter`): the same model object serves base rows and adapter rows, and a step whose rows are
all on the base takes the no-LoRA fast path. A second module tree sharing the very same weight tensors, made before
the adapters were installed, is the base model WITHOUT any adapter installed.

Measured through `TransformersEngine`, the sides taken in turn (the order reversed every repeat, so a linear drift of
the machine cancels), medians over the repeats:

1. decode step: 8 concurrent requests (distinct ~128-token text prompts, greedy, `max_new_tokens` 32) on the base
   without adapters installed, on the base with them installed, and spread over the adapters (2 per adapter with 4).
   A step's time is the interval between the engine's successive step reports (`EngineObserver.on_step`, on the
   event loop's thread after each step's tokens are delivered) over the steps that decoded all 8 rows and prefilled
   nothing; a run's sample is the median of its intervals. Target: adapters / base <= 1.3.
2. time to first token: one request alone, a ~300-token prompt (one image tile of random embeddings, 256 slots, plus
   text), on the base vs on an adapter: `Finish.timing.first_token - arrival`. Target: adapters / base <= 1.2.

Before measuring, the run checks that adapter rows take the LoRA path: every adapter changes the logits of a plain
forward, and in warm-up runs through the engine a LoRA layer saw its rows' slots set for the adapter requests and
unset (the fast path) for the base ones; it stops with an error otherwise, so it cannot benchmark the base twice.

Writes `<out>/<stamp>-lora.json` (machine, settings, every sample, medians, ratios, targets) and
`<out>/<stamp>-lora.md`; `--name` sets the stem (`<name>.json`, `<name>.md`).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import datetime
import json
import logging
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.machine import machine_info
from services.contract import template
from services.contract.conversation import Conversation, ImageRef
from services.llm.engine.api import EngineLoad, StepReport
from services.llm.engine.events import EngineRequest, Finish, TokenDelta
from services.llm.engine.sampling import SamplingParams
from services.llm.engine.transformers_engine import TransformersEngine
from services.llm.prompt import Prompt, PromptBuilder
from services.model.adapters import CONFIG_FILE, WEIGHTS_FILE, read_adapter
from services.model.checkpoint import Checkpoint, open_checkpoint
from services.model.lora import AdapterSlots, BatchedLoRALinear
from services.model.modules import install_language_adapters, load_language_model, load_tokenizer
from services.model.torch_dtypes import TORCH_DTYPES

log = logging.getLogger("bench.lora")

# ms-swift's default LoRA targets (its `all-linear` for the LLM only), per language model kind.
TARGETS = {
    "Qwen2ForCausalLM": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "InternLM2ForCausalLM": ("wqkv", "wo", "w1", "w2", "w3"),
}
TARGET_DECODE_RATIO = 1.3
TARGET_TTFT_RATIO = 1.2
MAX_CONTEXT_TOKENS = 4096
WORDS = ("river", "lantern", "copper", "meadow", "engine", "violet", "harbor", "quartz", "summit", "willow", "signal",
         "ember", "canyon", "orchard", "pixel", "glacier", "sparrow", "marble", "thunder", "saffron", "beacon", "tundra",
         "falcon", "velvet", "compass", "ripple", "granite", "lagoon", "cinder", "aurora", "juniper", "mosaic")


@dataclass(frozen=True)
class LoraBenchSettings:
    preset: str
    adapters: int
    rank: int = 8
    alpha: int = 32
    std: float = 0.01
    decode_requests: int = 8
    decode_prompt_tokens: int = 128
    decode_max_new_tokens: int = 32
    decode_repeats: int = 5
    ttft_prompt_tokens: int = 300
    ttft_image_tiles: int = 1
    ttft_repeats: int = 7
    max_step_tokens: int = 512
    seed: int = 0


DEFAULT = LoraBenchSettings(preset="1b-shape", adapters=4)
QUICK = LoraBenchSettings(preset="tiny", adapters=2, decode_max_new_tokens=8, decode_repeats=2, ttft_repeats=3)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="tiny model, 2 adapters, few steps and repeats: a smoke run in well under a minute")
    parser.add_argument("--out", default="bench/results", help="directory for the JSON and the markdown")
    parser.add_argument("--name", default=None, help="file stem of the results (default: <date>-lora)")
    parser.add_argument("--model", default=None,
                        help="benchmark this checkpoint instead of writing a random one of the 1B shape")
    parser.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default=None,
                        help="default: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--repeats", type=int, default=None,
                        help="repeats per side of the decode measure (default 5; 2 with --quick); the time to first "
                             "token takes 2 more")


# ---------------------------------------------------------------------------------------------------- adapters


def write_random_adapter(directory: Path, checkpoint: Checkpoint, *, rank: int, alpha: int, std: float,
                         seed: int) -> Path:
    """An adapter of every language-model projection ms-swift targets by default, as PEFT saves it (random A and B
    drawn from N(0, std^2)): `adapter_config.json` and `adapter_model.safetensors` in `directory`."""
    names = TARGETS[checkpoint.spec.llm_architecture]
    shapes = {key.removesuffix(".weight"): shape for key, shape in checkpoint.weight_shapes.items()
              if key.startswith("language_model.") and key.endswith(".weight")
              and key.removesuffix(".weight").rsplit(".", 1)[-1] in names and len(shape) == 2}
    if not shapes:
        raise ValueError(f"{checkpoint.path}: no language-model layer named {', '.join(names)}")
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out_features, in_features) in sorted(shapes.items()):
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * std
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * std
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(checkpoint.path),
        "r": rank, "lora_alpha": alpha, "lora_dropout": 0.05, "bias": "none", "use_rslora": False,
        "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
        "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None, "layers_pattern": None,
        # ms-swift's resolved target regex.
        "target_modules": rf"^(language_model(?=\.).*\.({'|'.join(names)}))$",
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return directory


# ------------------------------------------------------------------------------------------------------ prompts


def _text(prompts: PromptBuilder, parts: tuple, tokens: int, seed: int) -> tuple[Conversation, Prompt]:
    """A conversation of `parts` then random words, grown until its prompt has at least `tokens` tokens."""
    rng = random.Random(seed)
    words = [f"Request {seed}:"]
    while True:
        conversation = Conversation(user_parts=(*parts, " ".join(words)))
        prompt = prompts.build(conversation)
        if len(prompt) >= tokens:
            return conversation, prompt
        words += [rng.choice(WORDS) for _ in range(max(1, (tokens - len(prompt)) // 2))]


class StepClock:
    """The engine's observer: when each step's report arrived (perf_counter) and what the step did."""

    def __init__(self) -> None:
        self.steps: list[tuple[float, StepReport]] = []

    def on_step(self, step: StepReport) -> None:
        self.steps.append((time.perf_counter(), step))

    def on_tokens(self, timed: list, now: float) -> None: ...

    def on_finish(self, reason: str, prompt_tokens: int, cached_prompt_tokens: int, adapter: str = "") -> None: ...

    def on_schedule(self, load: EngineLoad) -> None: ...

    def decode_intervals(self, rows: int) -> list[float]:
        """Seconds of each step that decoded `rows` rows and prefilled nothing (from the previous step's report)."""
        return [t - self.steps[i - 1][0] for i, (t, s) in enumerate(self.steps)
                if i and s.decode_rows == rows and s.prefill_rows == 0]


class SlotProbe:
    """A forward pre-hook on one LoRA layer: how many forwards ran on the fast path and how many with slots set."""

    def __init__(self, layer: BatchedLoRALinear):
        self.layer = layer
        self.fast = 0
        self.lora_rows: list[list[int]] = []
        self._handle = layer.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        if module.rows.adapted:
            self.lora_rows.append(module.rows.slots.tolist())
        else:
            self.fast += 1

    def remove(self) -> None:
        self._handle.remove()


# --------------------------------------------------------------------------------------------------------- runs


async def _collect(stream) -> dict:
    tokens: list[int] = []
    first_wall = None
    finish = None
    async for event in stream:
        if isinstance(event, TokenDelta):
            if first_wall is None:
                first_wall = time.perf_counter()
            tokens += event.token_ids
        elif isinstance(event, Finish):
            finish = event
    return {"tokens": tokens, "first_wall": first_wall, "finish": finish}


async def decode_run(engine: TransformersEngine, requests: list[EngineRequest]) -> dict:
    clock = StepClock()
    engine.observer = clock
    try:
        started = time.perf_counter()
        results = await asyncio.gather(*[_collect(engine.submit(r)) for r in requests])
    finally:
        engine.observer = None
    intervals = clock.decode_intervals(len(requests))
    if not intervals:
        raise RuntimeError("no engine step decoded every request at once; cannot time a decode step")
    # The decode phase: from the step in which the last prompt's prefill completed to the last step.
    last_prefill = max(i for i, (_, s) in enumerate(clock.steps) if s.prefill_rows)
    decode_steps = len(clock.steps) - 1 - last_prefill
    decode_wall = clock.steps[-1][0] - clock.steps[last_prefill][0]
    return {
        "step_s": statistics.median(intervals),
        "intervals_s": intervals,
        "full_decode_steps": len(intervals),
        "steps": len(clock.steps),
        "decode_phase_s": decode_wall,
        "decode_phase_steps": decode_steps,
        "decode_phase_step_s": decode_wall / decode_steps if decode_steps else None,
        "wall_s": time.perf_counter() - started,
        "tokens": [r["tokens"] for r in results],
        "finish_reasons": [r["finish"].reason.value for r in results],
    }


async def ttft_run(engine: TransformersEngine, request: EngineRequest) -> dict:
    submitted = time.perf_counter()
    request = dataclasses.replace(request, arrival=time.monotonic())
    result = await _collect(engine.submit(request))
    timing = result["finish"].timing
    return {"ttft_s": timing.first_token - timing.arrival, "wall_to_first_delta_s": result["first_wall"] - submitted,
            "tokens": result["tokens"]}


def _summary(samples: list[float]) -> dict:
    return {"n": len(samples), "median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "samples": samples}


# --------------------------------------------------------------------------------------------------------- main


def _device_and_dtype(requested: str | None) -> tuple[str, str, str]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if requested:
        return device, requested, "requested with --dtype"
    if device == "cuda":
        return device, "bfloat16", "a GPU is available"
    return device, "float32", "CPU: float32"


def _shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A second module tree over the same parameter tensors (no weight is copied): the base without adapters."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


def _check_logits(model, plain, slots: AdapterSlots, prompt: Prompt, device: str) -> dict:
    """Every adapter changes the logits of a plain forward; the base rows equal the model without adapters."""
    ids = torch.tensor([prompt.token_ids], device=device)
    with torch.inference_mode():
        reference = plain(input_ids=ids).logits[0, -1].float()
        with slots.rows([0], device):
            base = model(input_ids=ids).logits[0, -1].float()
        changes = {}
        for name in slots.names:
            with slots.rows([slots.slot[name]], device):
                adapted = model(input_ids=ids).logits[0, -1].float()
            changes[name] = float((adapted - base).abs().max())
    unchanged = [name for name, change in changes.items() if change == 0]
    if unchanged:
        raise RuntimeError(f"adapters {unchanged} do not change the logits: the LoRA path is not running")
    return {"max_abs_logit_change_by_adapter": changes,
            "base_rows_equal_model_without_adapters": bool(torch.equal(base, reference)),
            "base_rows_max_abs_diff_to_model_without_adapters": float((base - reference).abs().max())}


def _table(doc: dict) -> str:
    m, cfg, med, ratios, targets = doc["machine"], doc["config"], doc["medians"], doc["ratios"], doc["targets"]

    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value * 1e3:.2f} ms"

    def met(key: str) -> str:
        return "**yes**" if targets[key]["met"] else "**no**"

    where = f"GPU {m['gpu']}" if m.get("gpu") else f"{m['usable_cpus']} usable CPUs, torch {m['torch_threads']} threads"
    d, t = cfg["decode"], cfg["ttft"]
    lines = [
        f"# LoRA adapters batched with the base, {doc['stamp']}",
        "",
        (f"**Machine:** {m['cpu_model']}, {m['logical_cpus']} logical CPUs ({where}), {m['memory_gib']} GiB RAM; "
         f"torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}; {m['device']}, {m['dtype']}. "
         f"Load average at start {', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}, at end "
         f"{', '.join(f'{x:.2f}' for x in m.get('load_average_at_end', []))}."),
        "",
        (f"**Model:** {cfg['model_description']}. **Adapters:** {cfg['adapters']['count']} random, rank "
         f"{cfg['adapters']['rank']}, alpha {cfg['adapters']['alpha']}, {cfg['adapters']['layers']} layers each "
         f"({', '.join(cfg['adapters']['targets'])} of every layer). **Decode:** {d['requests']} concurrent "
         f"requests, prompts of {min(d['prompt_tokens'])}-{max(d['prompt_tokens'])} tokens, {d['max_new_tokens']} "
         f"new tokens, {d['repeats']} repeats; adapter rows spread {d['requests'] // cfg['adapters']['count']} per "
         f"adapter. **TTFT:** one request alone, {t['prompt_tokens']}-token prompt ({t['image_slots']} image slots "
         f"of random embeddings + text), {t['repeats']} repeats. Medians; the sides taken in turn. "
         f"Wall time {doc['wall_s']:.0f} s."),
        "",
        "| measure | base, no adapters installed | base rows | adapter rows | adapters / base | target | met |",
        "|---|---|---|---|---|---|---|",
        (f"| decode step, {d['requests']} rows | {ms(med['decode_step']['plain'])} | "
         f"{ms(med['decode_step']['base'])} | {ms(med['decode_step']['adapters'])} | "
         f"{ratios['decode_step_adapters_over_base']:.3f} | <= {TARGET_DECODE_RATIO} | "
         f"{met('decode_step_adapters_over_base')} |"),
        (f"| time to first token, 1 request | – | {ms(med['ttft']['base'])} | {ms(med['ttft']['adapters'])} | "
         f"{ratios['ttft_adapters_over_base']:.3f} | <= {TARGET_TTFT_RATIO} | {met('ttft_adapters_over_base')} |"),
        "",
        (f"Base rows with adapters installed / base without: {ratios['decode_step_base_over_plain']:.3f} (decode "
         "step; the fast path should cost nothing)."),
    ]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO)
    log.setLevel(logging.INFO)
    s = QUICK if args.quick else DEFAULT
    if args.repeats:
        s = dataclasses.replace(s, decode_repeats=args.repeats, ttft_repeats=args.repeats + 2)
    device, dtype_name, dtype_reason = _device_and_dtype(args.dtype)
    stamp = args.name or datetime.datetime.now().strftime("%Y-%m-%d") + ("-quick" if args.quick else "") + "-lora"
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        started = time.perf_counter()
        machine = machine_info(dtype_name, device)
        if args.model:
            model_dir, description = Path(args.model), f"the checkpoint at {args.model}"
        else:
            from services.model.tiny import make_tiny

            log.info("writing a random %s checkpoint to %s", s.preset, tmp)
            model_dir = make_tiny(Path(tmp) / "model", preset=s.preset)
            description = {"1b-shape": "random weights with InternVL2_5-1B's real dimensions (Qwen2.5-0.5B language "
                                       "model; `make-tiny --preset 1b-shape`)",
                           "tiny": "the tiny random checkpoint (a smoke test, not a performance figure)"}[s.preset]
        doc = asyncio.run(_bench(s, model_dir, Path(tmp), device, dtype_name))
        machine["load_average_at_end"] = list(os.getloadavg())
        doc = {"stamp": stamp, "machine": machine, **doc, "wall_s": time.perf_counter() - started}
        doc["config"].update(quick=bool(args.quick), model=str(args.model or "(temporary)"),
                             model_description=description, dtype_reason=dtype_reason)
    out.mkdir(parents=True, exist_ok=True)
    table = _table(doc)
    (out / f"{stamp}.json").write_text(json.dumps(doc, indent=2))
    (out / f"{stamp}.md").write_text(table)
    print(table)
    print(out / f"{stamp}.json")
    print(out / f"{stamp}.md")
    return 0


async def _bench(s: LoraBenchSettings, model_dir: Path, tmp: Path, device: str, dtype_name: str) -> dict:
    checkpoint = open_checkpoint(model_dir)
    spec = checkpoint.spec
    adapter_dirs = [write_random_adapter(tmp / f"adapter-{i}", checkpoint, rank=s.rank, alpha=s.alpha, std=s.std,
                                         seed=s.seed + 1 + i) for i in range(s.adapters)]
    adapters = [read_adapter(f"bench-lora-{i}", d, checkpoint, max_rank=s.rank) for i, d in enumerate(adapter_dirs)]
    log.info("loading %s (%s on %s) and installing %d adapters", checkpoint.path, dtype_name, device, len(adapters))
    model = load_language_model(checkpoint, TORCH_DTYPES[dtype_name], device)
    plain = _shared_copy(model)
    slots = install_language_adapters(model, checkpoint, adapters)
    tokenizer = load_tokenizer(checkpoint)
    max_context = min(spec.text_hf_config().max_position_embeddings, MAX_CONTEXT_TOKENS)
    prompts = PromptBuilder(tokenizer, spec.tokens_per_tile, spec.system_message, max_context)
    stop_id = tokenizer.convert_tokens_to_ids(template.STOP_TOKEN)

    def engine(m, adapter_slots) -> TransformersEngine:
        # No prefix cache: every run prefills its prompts in full.
        return TransformersEngine(m, tokenizer, stop_token_id=stop_id, img_context_id=prompts.img_context_id,
                                  max_context_tokens=max_context, max_batch_size=32, max_step_tokens=s.max_step_tokens,
                                  prefix_cache_budget_bytes=0, kv_budget_bytes=2 << 30, adapters=adapter_slots)

    names = list(slots.names)
    decode_prompts = [_text(prompts, (), s.decode_prompt_tokens, s.seed + 100 + i)[1]
                      for i in range(s.decode_requests)]
    greedy = SamplingParams(max_new_tokens=s.decode_max_new_tokens)
    sides = {
        "plain": [EngineRequest(p, greedy, s.decode_max_new_tokens) for p in decode_prompts],
        "base": [EngineRequest(p, greedy, s.decode_max_new_tokens) for p in decode_prompts],
        "adapters": [EngineRequest(p, greedy, s.decode_max_new_tokens, adapter=names[i % len(names)])
                     for i, p in enumerate(decode_prompts)],
    }
    image = ImageRef("bench-lora-image", s.ttft_image_tiles)
    _, ttft_prompt = _text(prompts, (image,), s.ttft_prompt_tokens, s.seed + 7)
    embed = model.get_input_embeddings().weight
    generator = torch.Generator().manual_seed(s.seed)
    rows = torch.randn(s.ttft_image_tiles * spec.tokens_per_tile, embed.shape[1], generator=generator)
    image_rows = ((rows * float(embed.detach().float().std())).to(device=embed.device, dtype=embed.dtype),)
    one = SamplingParams(max_new_tokens=1)

    def ttft_request(adapter: str = "") -> EngineRequest:
        return EngineRequest(ttft_prompt, one, 1, image_rows=image_rows, adapter=adapter)

    engines = {"plain": engine(plain, None), "lora": engine(model, slots)}
    for e in engines.values():
        await e.start()
    try:
        # -- the LoRA path really runs: logits, then the slots the engine sets, in warm-up runs of every side.
        verification = _check_logits(model, plain, slots, decode_prompts[0], device)
        probe = SlotProbe(next(iter(slots.layers.values())))
        try:
            warm = {"plain": await decode_run(engines["plain"], sides["plain"])}
            fast_before = probe.fast
            warm["base"] = await decode_run(engines["lora"], sides["base"])
            base_fast, base_lora = probe.fast - fast_before, len(probe.lora_rows)
            warm["adapters"] = await decode_run(engines["lora"], sides["adapters"])
            await ttft_run(engines["lora"], ttft_request())
            await ttft_run(engines["lora"], ttft_request(names[0]))
        finally:
            probe.remove()
        adapter_rows = probe.lora_rows[base_lora:]
        if base_lora or not base_fast:
            raise RuntimeError("the base requests did not take the no-LoRA fast path")
        expected = set(slots.slots_of(names))
        if not adapter_rows or not any(set(rows) == expected for rows in adapter_rows):
            raise RuntimeError(f"the adapter requests' forwards never ran with every adapter's slot set "
                               f"(saw {adapter_rows[:3]})")
        verification.update(
            base_forwards_on_fast_path=base_fast, adapter_forwards_with_slots=len(adapter_rows),
            adapter_decode_slots_seen=sorted({tuple(sorted(rows)) for rows in adapter_rows if len(rows) > 1})[:4],
            tokens_differ_from_base=[a != b for a, b in zip(warm["adapters"]["tokens"], warm["base"]["tokens"],
                                                            strict=True)],
            base_tokens_equal_model_without_adapters=warm["base"]["tokens"] == warm["plain"]["tokens"])
        log.info("verified: adapter rows run the LoRA path (%s)", verification["max_abs_logit_change_by_adapter"])

        # -- 1 and 3: decode step, the three sides in turn, the order reversed every repeat.
        decode: dict[str, list[dict]] = {side: [] for side in sides}
        for r in range(s.decode_repeats):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for side in order:
                result = await decode_run(engines["plain" if side == "plain" else "lora"], sides[side])
                decode[side].append(result)
                log.info("decode repeat %d %-8s %.2f ms/step", r + 1, side, result["step_s"] * 1e3)
        # -- 2: time to first token, base and adapter in turn (ABBA), cycling through the adapters.
        ttft: dict[str, list[dict]] = {"base": [], "adapters": []}
        for r in range(s.ttft_repeats):
            order = ["base", "adapters"] if r % 2 == 0 else ["adapters", "base"]
            for side in order:
                adapter = names[r % len(names)] if side == "adapters" else ""
                result = await ttft_run(engines["lora"], ttft_request(adapter))
                ttft[side].append({**result, "adapter": adapter})
                log.info("ttft repeat %d %-8s %.2f ms", r + 1, side, result["ttft_s"] * 1e3)
    finally:
        for e in engines.values():
            await e.close()

    for runs in decode.values():
        for result in runs:
            result.pop("tokens")
    decode_summary = {side: _summary([x["step_s"] for x in runs]) for side, runs in decode.items()}
    for side, runs in decode.items():
        decode_summary[side]["decode_phase_step_s"] = _summary([x["decode_phase_step_s"] for x in runs])
    ttft_summary = {side: _summary([x["ttft_s"] for x in runs]) for side, runs in ttft.items()}
    for side, runs in ttft.items():
        ttft_summary[side]["wall_to_first_delta_s"] = _summary([x["wall_to_first_delta_s"] for x in runs])
    medians = {"decode_step": {side: v["median"] for side, v in decode_summary.items()},
               "ttft": {side: v["median"] for side, v in ttft_summary.items()}}
    ratios = {
        "decode_step_adapters_over_base": medians["decode_step"]["adapters"] / medians["decode_step"]["base"],
        "ttft_adapters_over_base": medians["ttft"]["adapters"] / medians["ttft"]["base"],
        "decode_step_base_over_plain": medians["decode_step"]["base"] / medians["decode_step"]["plain"],
    }
    targets = {
        "decode_step_adapters_over_base": {"max": TARGET_DECODE_RATIO},
        "ttft_adapters_over_base": {"max": TARGET_TTFT_RATIO},
    }
    for key, target in targets.items():
        target.update(ratio=ratios[key], met=ratios[key] <= target["max"])
    return {
        "config": {
            "preset": s.preset, "device": device, "dtype": dtype_name, "settings": dataclasses.asdict(s),
            "adapters": {"count": len(adapters), "rank": s.rank, "alpha": s.alpha, "std": s.std,
                         "targets": list(TARGETS[spec.llm_architecture]),
                         "layers": len(slots.layers), "names": names,
                         "files": ["adapter_config.json", "adapter_model.safetensors"]},
            "decode": {"requests": s.decode_requests, "prompt_tokens": [len(p) for p in decode_prompts],
                       "max_new_tokens": s.decode_max_new_tokens, "repeats": s.decode_repeats,
                       "adapter_of_request": [r.adapter for r in sides["adapters"]],
                       "step_time": "median interval between the engine's step reports over the steps that decoded "
                                    "every request and prefilled nothing"},
            "ttft": {"prompt_tokens": len(ttft_prompt), "image_slots": s.ttft_image_tiles * spec.tokens_per_tile,
                     "image_embeddings": "random", "repeats": s.ttft_repeats,
                     "measure": "Finish.timing.first_token - arrival (time.monotonic)"},
            "engine": {"max_step_tokens": s.max_step_tokens, "max_batch_size": 32, "prefix_cache": False},
            "order": "decode: plain, base, adapters, reversed every repeat; ttft: base, adapters, reversed every "
                     "repeat",
        },
        "verification": verification,
        "samples": {"decode_step": decode, "ttft": ttft},
        "summaries": {"decode_step": decode_summary, "ttft": ttft_summary},
        "medians": medians,
        "ratios": ratios,
        "targets": targets,
    }
