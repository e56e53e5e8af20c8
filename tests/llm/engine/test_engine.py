"""The scheduler in process: batching independence, chunked prefill, cancellation, the prefix cache, the queue."""

from __future__ import annotations

import asyncio

import pytest
from helpers.engine import Recorder, ask, until
from torch_kernels import Kernels

from services.contract.conversation import ImageRef, Turn
from services.contract.errors import ContextTooLongError, InvalidArgumentError, OverloadedError
from services.contract.template import clean_response

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def image(reference, pixels, embeddings_of):
    """An ImageRef of the 3-tile wide golden image and its embeddings for the qwen2 tiny model."""
    tiles = pixels["wide"]
    return ImageRef("wide", tiles.shape[0]), {"wide": embeddings_of(reference("qwen2"), tiles)}


async def test_eight_streams_share_steps_and_equal_their_solo_runs(make_service, collect, image):
    part, inline = image
    requests = [ask(f"Stream {i} says " + "la " * (3 * i), *([part] if i % 3 == 0 else []),
                    max_new_tokens=6 + i, **({"temperature": 0.8, "top_p": 0.95, "seed": i} if i % 2 else {}))
                for i in range(8)]
    async with make_service(kv_cache_budget_mb=0) as service:
        solo = [await collect(await service.generate(r, inline)) for r in requests]
        steps_before = service.engine.steps
        together = await asyncio.gather(*[collect(await service.generate(r, inline)) for r in requests])
        load, seen = service.engine.load(), service.engine.max_batch_size_seen
    assert [r.token_ids for r in together] == [r.token_ids for r in solo]
    assert [r.text for r in together] == [r.text for r in solo]
    tokens = sum(len(r.token_ids) for r in together)
    assert load.steps - steps_before < tokens
    assert seen > 1
    assert (load.running, load.waiting) == (0, 0)


async def test_long_prefill_is_chunked_between_decode_steps(make_service, collect, image):
    part, inline = image
    async with make_service(max_step_tokens=65, max_batch_size=4) as service:
        recorder = Recorder(service.engine)
        running = await service.generate(ask("Count to a hundred.", max_new_tokens=60))
        await running.__anext__()
        long = await service.generate(ask("Describe.", part, max_new_tokens=2), inline)
        first = await long.__anext__()
        assert first.token_ids
        assert (await collect(running)).reason == "length"
        await collect(long)
    # The 3-tile prompt (over 768 tokens) was prefilled 64 tokens per step, each step also decoding the running
    # stream: it never waited for the whole prefill.
    prefill_steps = [(decode, prefill) for decode, prefill in recorder.steps if prefill]
    assert len(prefill_steps) >= 768 // 64 + 1
    assert max(prefill for _, prefill in prefill_steps) == 64
    assert sum(1 for decode, _ in prefill_steps if decode == 1) >= 768 // 64


async def test_cancel_frees_the_slot_and_others_go_on(make_service, collect):
    async with make_service() as service:
        recorder = Recorder(service.engine)
        streams = [await service.generate(ask(f"Go {i}", max_new_tokens=40)) for i in range(3)]
        counts = [0, 0, 0]

        async def consume(i):
            async for event in streams[i]:
                counts[i] += 1 if hasattr(event, "token_ids") else 0

        tasks = [asyncio.create_task(consume(i)) for i in range(3)]
        await until(lambda: service.engine.load().running == 3 and min(counts) >= 2)
        tasks[1].cancel()
        streams[1].cancel()
        steps_at_cancel = service.engine.steps
        await until(lambda: service.engine.load().running == 2)
        assert service.metrics.running._value.get() == 2
        await asyncio.gather(tasks[0], tasks[2])
    # The first scheduling point that saw two running sequences came at most one step (the one in flight) later.
    first_drop = next(steps for steps, running in recorder.schedules if steps >= steps_at_cancel and running == 2)
    assert first_drop <= steps_at_cancel + 1, "the slot was not freed within one step"
    assert counts[0] == counts[2] == 40
    assert counts[1] < 40


async def test_deadline_frees_the_slot(make_service, collect):
    async with make_service() as service:
        result = await collect(await service.generate(ask("Ramble.", max_new_tokens=10_000), timeout=0.3))
        assert result.reason == "cancelled"
        assert 0 < len(result.token_ids) < 10_000
        assert service.engine.load().running == 0


async def test_second_turn_reuses_the_first_and_matches_no_cache(make_service, collect, image):
    part, inline = image
    first_request = ask("What is in the image?", part, max_new_tokens=10)
    async with make_service() as service:
        first = await collect(await service.generate(first_request, inline))
        turn = Turn(first_request.conversation.user_parts, clean_response(first.text))
        second_request = ask("Tell me more.", history=(turn,), max_new_tokens=10, top_logprobs=3)
        second = await collect(await service.generate(second_request, inline))
        lookups, hits = service.engine.prefix_cache.lookups, service.engine.prefix_cache.hits
    async with make_service(kv_cache_budget_mb=0) as uncached:
        baseline = await collect(await uncached.generate(second_request, inline))
        assert uncached.engine.prefix_cache.lookups == 0
    assert second.finish.usage.cached_prompt_tokens >= first.finish.usage.prompt_tokens
    assert baseline.finish.usage.cached_prompt_tokens == 0
    assert second.token_ids == baseline.token_ids
    for ours, theirs in zip(second.top_logprobs, baseline.top_logprobs, strict=True):
        assert ours.logprobs == pytest.approx(theirs.logprobs, abs=1e-4)
    assert hits >= 1 and lookups >= 2


async def test_prefix_cache_respects_its_budget(make_service, collect):
    async with make_service(kv_cache_budget_mb=0.05) as service:  # ~51 KB: one short prompt's KV at most
        for i in range(4):
            result = await collect(await service.generate(ask(f"Different prompt number {i} " * 3,
                                                              max_new_tokens=2)))
            cache = service.engine.prefix_cache
            assert cache.nbytes <= cache.budget_bytes
            if i == 0:  # the prompt and every answer token but the last (never fed back) are kept
                usage = result.finish.usage
                kept = usage.prompt_tokens + usage.completion_tokens - 1
                assert cache.nbytes == kept * service.engine.kv_bytes_per_token
        assert len(cache) <= 2 and cache.evictions >= 1


async def test_full_queue_is_overloaded(make_service, collect):
    async with make_service(max_batch_size=1, max_queue=1) as service:
        running = await service.generate(ask("Long one.", max_new_tokens=500))
        await until(lambda: service.engine.load().running == 1 and service.engine.load().waiting == 0)
        waiting = await service.generate(ask("Second.", max_new_tokens=1))
        with pytest.raises(OverloadedError):
            await service.generate(ask("Third.", max_new_tokens=1))
        running.cancel()
        assert (await collect(waiting)).reason == "length"


async def test_context_limit(make_service, collect):
    async with make_service(max_context_tokens=60) as service:
        with pytest.raises(ContextTooLongError):
            await service.generate(ask("word " * 80))
        # An asked max_new_tokens that does not fit beside the prompt is refused, naming both numbers; an unset one
        # (--max-new-tokens-default, 512) is cut at the context: prompt + answer never exceed it.
        with pytest.raises(InvalidArgumentError, match=r"^max_new_tokens 100 does not fit: the prompt has \d+ tokens "
                                                       r"and the context 60 \(--max-context-tokens\)"):
            await service.generate(ask("Hi", max_new_tokens=100))
        result = await collect(await service.generate(ask("Hi", max_new_tokens=0)))
        assert result.reason == "length"
        assert result.finish.usage.prompt_tokens + result.finish.usage.completion_tokens == 60


async def test_stop_strings_cut_the_text(make_service, collect):
    async with make_service() as service:
        free = await collect(await service.generate(ask("Say something.", max_new_tokens=12)))
        stop = free.text[len(free.text) // 2:][:3]
        assert stop.strip(), f"unlucky sample {free.text!r}"
        cut = await collect(await service.generate(ask("Say something.", max_new_tokens=12, stop_strings=[stop])))
    assert cut.reason == "stop"
    assert cut.text == free.text[:free.text.index(stop)]
    assert free.token_ids[:len(cut.token_ids)] == cut.token_ids


async def test_torch_kernels_run_on_the_engine_thread_only(make_service, collect, image):
    """A request with inline embeddings, start to finish: the event loop's thread and the prompt thread run no torch
    kernel (one more thread with an OpenMP team of its own makes libgomp stop spin-waiting, and every decode step
    slower: see services.runtime.own_thread)."""
    part, inline = image
    on_loop, in_pool = Kernels(), Kernels()
    async with make_service() as service:
        build = service.prompts.build

        def recorded(conversation):
            with in_pool:
                return build(conversation)

        service.prompts.build = recorded
        with on_loop:
            result = await collect(await service.generate(ask("Describe.", part, max_new_tokens=4, temperature=0.7,
                                                              top_p=0.9, repetition_penalty=1.2, top_logprobs=2),
                                                          inline))
    assert len(result.token_ids) == 4
    assert on_loop.ops == [] and in_pool.ops == []
