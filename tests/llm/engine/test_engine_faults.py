"""The transformers engine under faults and memory pressure: a failing request ends alone, a failed batch is rebuilt,
admission keeps the KV within its budget without a long prompt blocking short ones, several prompts share a prefill
forward, and text held back at the end of a stream is flushed."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest
import torch
from helpers.engine import Recorder, ask

from services.contract.conversation import ImageRef
from services.contract.errors import InternVLError, InvalidArgumentError, OverloadedError
from services.llm.engine import runner as runner_module
from services.llm.engine.api import BatchFaultError
from services.llm.engine.batch import COLUMN_SLACK

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(180)]
MIB = 2**20


async def outcome(collect, stream):
    """The stream's Result, or the exception it ended with."""
    try:
        return await asyncio.wait_for(collect(stream), 60)
    except InternVLError as exc:
        return exc


@contextlib.contextmanager
def hooked(module: torch.nn.Module, hook):
    """`hook(kwargs)` runs before every forward of `module` (it may raise)."""
    handle = module.register_forward_pre_hook(lambda m, args, kwargs: hook(kwargs), with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class Steps(Recorder):
    """Records every StepReport and every EngineLoad."""

    def __init__(self, engine):
        super().__init__(engine)
        self.reports, self.loads = [], []

    def on_step(self, step):
        self.reports.append(step)
        super().on_step(step)

    def on_schedule(self, load):
        self.loads.append(load)
        super().on_schedule(load)


POISON = 7.0  # every value of the poisoned image's embeddings


async def test_a_request_failing_in_a_shared_prefill_fails_alone(make_service, collect, reference):
    """Eight prompts prefilled together; the forward raises out-of-memory whenever one of them (the one whose image
    embeddings are all POISON) is in it. The engine retries prompt by prompt: that request alone fails, with
    RESOURCE_EXHAUSTED's error, and the seven others equal their solo runs."""
    hidden = reference("qwen2").language_model.config.hidden_size
    poison = {"poison": torch.full((256, hidden), POISON)}
    requests = [ask(f"Stream {i}: " + "la " * i, max_new_tokens=6) for i in range(7)]
    bad = ask("Look.", ImageRef("poison", 1), max_new_tokens=6)

    def fail_on_poison(kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None and bool((embeds == POISON).all(dim=-1).any()):
            raise torch.OutOfMemoryError("injected: out of memory")

    async with make_service(kv_cache_budget_mb=0) as service:
        solo = [await collect(await service.generate(r)) for r in requests]
        steps = Steps(service.engine)
        with hooked(reference("qwen2").language_model.model, fail_on_poison):
            streams = [await service.generate(r) for r in requests[:3]]
            streams.append(await service.generate(bad, poison))
            streams += [await service.generate(r) for r in requests[3:]]
            results = await asyncio.gather(*(outcome(collect, s) for s in streams))
        after = await collect(await service.generate(requests[0]))
    failure = results.pop(3)
    assert isinstance(failure, OverloadedError) and "out of memory" in str(failure)
    assert [r.token_ids for r in results] == [r.token_ids for r in solo]
    assert max(r.prefill_rows for r in steps.reports) >= 4, "the poisoned prompt never shared a prefill forward"
    assert after.token_ids == solo[0].token_ids
    assert service.engine.load().running == 0


async def test_non_finite_embeddings_fail_their_request_alone(make_service, collect, reference):
    hidden = reference("qwen2").language_model.config.hidden_size
    rows = torch.zeros(256, hidden)
    rows[17, 3] = float("nan")
    requests = [ask(f"Fine {i}", max_new_tokens=4) for i in range(2)]
    async with make_service(kv_cache_budget_mb=0) as service:
        solo = [await collect(await service.generate(r)) for r in requests]
        streams = [await service.generate(requests[0]),
                   await service.generate(ask("Look.", ImageRef("broken", 1), max_new_tokens=4), {"broken": rows}),
                   await service.generate(requests[1])]
        results = await asyncio.gather(*(outcome(collect, s) for s in streams))
    failure = results.pop(1)
    assert isinstance(failure, InvalidArgumentError) and "broken" in str(failure) and "NaN" in str(failure)
    assert [r.token_ids for r in results] == [r.token_ids for r in solo]


async def test_a_failed_decode_batch_is_rebuilt_and_the_engine_serves_on(make_service, collect, reference):
    """The decode forward raises once, with four sequences in it: those four end UNAVAILABLE (BatchFaultError), no
    stream hangs, and requests after it are answered as before."""
    requests = [ask(f"Decode {i}", max_new_tokens=12) for i in range(4)]
    calls = {"decode": 0}

    def fail_once(kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape == (4, 1):
            calls["decode"] += 1
            if calls["decode"] == 3:
                raise RuntimeError("injected: device error")

    async with make_service() as service:
        solo = await collect(await service.generate(requests[0]))
        with hooked(reference("qwen2").language_model, fail_once):
            streams = [await service.generate(r) for r in requests]
            results = await asyncio.gather(*(outcome(collect, s) for s in streams))
        assert calls["decode"] >= 3
        streams = [await service.generate(r) for r in requests]
        after = await asyncio.gather(*(outcome(collect, s) for s in streams))
        assert service.engine.load().running == 0
    assert all(isinstance(r, BatchFaultError) for r in results), results
    assert "retry" in str(results[0])
    assert after[0].token_ids == solo.token_ids
    assert all(r.reason == "length" for r in after)


async def test_a_step_that_raises_fails_its_requests_and_the_engine_serves_on(make_service, collect, monkeypatch):
    """A fault outside any one request (here the runner's step itself raises, once, after two requests started
    decoding): both end UNAVAILABLE, the runner starts afresh, and the next requests are answered as before."""
    requests = [ask(f"Step {i}", max_new_tokens=12) for i in range(2)]
    async with make_service(kv_cache_budget_mb=0) as service:
        solo = await collect(await service.generate(requests[0]))
        runner = service.engine.runner
        real, calls = runner.step, {"decoding both": 0}

        def failing(plan):
            if len(plan.decode) == 2:
                calls["decoding both"] += 1
                if calls["decoding both"] == 2:
                    raise RuntimeError("injected: bookkeeping")
            return real(plan)

        monkeypatch.setattr(runner, "step", failing)
        streams = [await service.generate(r) for r in requests]
        results = await asyncio.gather(*(outcome(collect, s) for s in streams))
        after = await collect(await service.generate(requests[0]))
        assert service.engine.load().running == 0 and service.engine.load().kv_bytes == 0
    assert all(isinstance(r, BatchFaultError) for r in results), results
    assert after.token_ids == solo.token_ids


async def test_a_row_whose_sampling_fails_fails_alone(make_service, collect, monkeypatch):
    real = runner_module.sample_batch

    def failing(logits, samplers):
        if any(s.params.seed == 666 for s in samplers):
            raise ValueError("injected: probability tensor contains nan")
        return real(logits, samplers)

    monkeypatch.setattr(runner_module, "sample_batch", failing)
    requests = [ask(f"Row {i}", max_new_tokens=8, temperature=0.7, seed=i) for i in range(3)]
    bad = ask("Bad row", max_new_tokens=8, temperature=0.7, seed=666)
    async with make_service(kv_cache_budget_mb=0) as service:
        solo = [await collect(await service.generate(r)) for r in requests]
        streams = [await service.generate(r) for r in (requests[0], bad, *requests[1:])]
        results = await asyncio.gather(*(outcome(collect, s) for s in streams))
    failure = results.pop(1)
    assert isinstance(failure, InternVLError) and "other requests are unaffected" in str(failure)
    assert [r.token_ids for r in results] == [r.token_ids for r in solo]


async def test_admission_by_memory_long_prompt_waits_short_ones_run(make_service, collect, reference, pixels,
                                                                   embeddings_of):
    """A budget that holds the long prompt alone, or several short ones: the short ones run while the long one
    waits; it is passed over by at most max_bypass (= max_batch_size) later requests, then runs; the reserved KV
    never exceeds the budget and every request completes."""
    chat = reference("qwen2")
    long = ask("Describe.", ImageRef("wide", 3), max_new_tokens=4)
    inline = {"wide": embeddings_of(chat, pixels["wide"])}
    shorts = [ask(f"Short {i}", max_new_tokens=4) for i in range(8)]
    async with make_service(kv_cache_budget_mb=0) as probe:
        bytes_per_token = probe.engine.kv_bytes_per_token
        long_len = (await collect(await probe.generate(long, inline))).finish.usage.prompt_tokens
    budget = (long_len + 4 + COLUMN_SLACK) * bytes_per_token  # the long one fits alone, exactly
    async with make_service(kv_cache_budget_mb=0, kv_budget_mb=budget / MIB, max_batch_size=4) as service:
        steps = Steps(service.engine)
        first_token: dict[str, float] = {}
        finished: dict[str, float] = {}

        async def run(name, stream):
            async for event in stream:
                first_token.setdefault(name, asyncio.get_running_loop().time())
            finished[name] = asyncio.get_running_loop().time()

        tasks = [asyncio.create_task(run(f"s{i}", await service.generate(shorts[i]))) for i in range(2)]
        tasks.append(asyncio.create_task(run("long", await service.generate(long, inline))))
        tasks += [asyncio.create_task(run(f"s{i}", await service.generate(shorts[i]))) for i in range(2, 8)]
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
    assert len(finished) == 9
    assert all(load.kv_reserved_bytes <= load.kv_budget_bytes for load in steps.loads)
    assert any(load.waiting and load.running >= 2 for load in steps.loads), "nothing ran while the long one waited"
    # s0, s1 started first; s2..s5 passed the long one (4 = max_bypass); s6 and s7 had to wait for it.
    assert max(first_token[f"s{i}"] for i in range(6)) < first_token["long"] < min(first_token["s6"],
                                                                                     first_token["s7"])
    assert first_token["long"] >= max(finished[f"s{i}"] for i in range(6))


async def test_a_request_larger_than_the_budget_is_refused(make_service):
    async with make_service(kv_budget_mb=0.01) as service:
        with pytest.raises(OverloadedError, match="max_new_tokens"):
            await service.generate(ask("Hello", max_new_tokens=400))


async def test_several_prompts_prefilled_in_one_forward_equal_their_solo_runs(make_service, collect, reference):
    """Four prompts that arrive while the model is busy are prefilled in one forward (the metric shows it) and
    answer what each answers alone."""
    requests = [ask(f"Together {i} " + "word " * (5 * i), max_new_tokens=5) for i in range(4)]
    busy, release = threading.Event(), threading.Event()

    def hold_first_forward(kwargs):
        if not busy.is_set():
            busy.set()
            release.wait(30)

    async with make_service(kv_cache_budget_mb=0) as service:
        solo = [await collect(await service.generate(r)) for r in requests]
        steps = Steps(service.engine)
        with hooked(reference("qwen2").language_model.model, hold_first_forward):
            blocker = await service.generate(ask("Busy", max_new_tokens=3))
            await asyncio.to_thread(busy.wait, 30)
            streams = [await service.generate(r) for r in requests]
            release.set()
            together = await asyncio.gather(*(collect(s) for s in streams))
            await collect(blocker)
        registry = service.metrics.registry
        forwards = registry.get_sample_value("internvl_llm_prefill_batch_size_count")
        up_to_two = registry.get_sample_value("internvl_llm_prefill_batch_size_bucket", {"le": "2.0"})
    assert [r.token_ids for r in together] == [r.token_ids for r in solo]
    assert [r.text for r in together] == [r.text for r in solo]
    assert max(r.prefill_rows for r in steps.reports) == 4
    assert forwards > up_to_two, "the metric shows no prefill forward of more than two prompts"


def scripted(tokens: list[int]):
    """A sample_batch that answers `tokens` in order to every row (a scripted model)."""
    position = {}

    def sample(logits, samplers):
        out = []
        for sampler in samplers:
            i = position.get(id(sampler), 0)
            position[id(sampler)] = i + 1
            out.append(tokens[i])
        return out, [None] * len(samplers)

    return sample


@pytest.mark.parametrize("stop", [None, "xyz"])
async def test_a_stream_ending_inside_a_multibyte_character_keeps_its_text(make_service, collect, reference,
                                                                           monkeypatch, stop):
    """The answer is cut by max_new_tokens in the middle of an emoji's bytes: the held-back bytes are sent at the end
    (as the replacement character the original's decode gives), so the text equals the tokenizer's decode. A
    possible stop-string start held back at the end ("xy" of "xyz") is sent too: it never completed."""
    tokenizer = reference("qwen2").tokenizer
    text = "ab xy🦜"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    emoji = tokenizer("🦜", add_special_tokens=False).input_ids
    assert len(emoji) > 1, "the emoji must span several byte-level tokens for this test"
    cut = ids[:-1]
    expected = tokenizer.decode(cut, skip_special_tokens=True)
    assert expected.endswith("\ufffd")
    monkeypatch.setattr(runner_module, "sample_batch", scripted(ids))
    async with make_service() as service:
        result = await collect(await service.generate(ask("Go", max_new_tokens=len(cut),
                                                          stop_strings=[stop] if stop else [])))
    assert result.reason == "length"
    assert result.token_ids == cut
    assert result.text == expected


async def test_held_back_text_that_completes_a_stop_string_is_dropped(make_service, collect, reference, monkeypatch):
    tokenizer = reference("qwen2").tokenizer
    ids = tokenizer("hello END", add_special_tokens=False).input_ids
    monkeypatch.setattr(runner_module, "sample_batch", scripted(ids + ids))
    async with make_service() as service:
        result = await collect(await service.generate(ask("Go", max_new_tokens=20, stop_strings=["END"])))
    assert result.reason == "stop"
    assert result.text == "hello "

