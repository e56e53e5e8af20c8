"""The vLLM engine against independent references, on both language-model families (conftest.py `family`): greedy
tokens equal and top-5 log-probabilities close to transformers' own generation, for text, images, several images of
different tile counts, combined mode, a video and a conversation; the prefix cache reported; sampling reproducible
per seed; n answers; stop strings; penalties and logit bias; refusals; cancel and the deadline; the engine's restart
after its engine core died.

Tolerance: the top-5 log-probabilities (float32) within LOGPROB_ATOL of transformers' log-softmax, and the same five
token ids in the same order. An engine in bfloat16 (`--vllm-dtype bfloat16`, bench/gpu_check.py) is checked on its
own greedy path instead, within BF16_LOGPROB_ATOL (helpers/native.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import os
import signal
import time
import uuid

import pytest
import torch
from helpers.engine import until
from helpers.native import BF16_LOGPROB_ATOL, LOGPROB_ATOL, forced_gaps, forced_logits
from transformers import LogitsProcessor, LogitsProcessorList

from services.contract.constraint import Constraint, ConstraintKind
from services.contract.conversation import Conversation, ImageRef, Turn, VideoRef
from services.contract.errors import InvalidArgumentError, NotReadyError
from services.contract.finish import FinishReason
from services.llm.engine.api import BatchFaultError

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(600)]

BLOCK = 128  # vLLM's KV block on a CPU: the prefix cache's unit

CASES = {
    "text": (Conversation(user_parts=("Tell me a story about a red car.",)), ()),
    "one image": (Conversation(user_parts=(ImageRef("wide", 3), "Describe the picture.")), ("wide",)),
    "two images of 1 and 3 tiles": (
        Conversation(user_parts=(ImageRef("small", 1), ImageRef("wide", 3), "Compare them.")), ("small", "wide")),
    "combined": (Conversation(user_parts=(ImageRef("small+wide", 4), "Both pictures, one placeholder.")),
                 ("small+wide",)),
    "video": (Conversation(user_parts=(VideoRef((ImageRef("small", 1), ImageRef("portrait", 1),
                                                 ImageRef("landscape", 1))), "What happens?")),
              ("small", "portrait", "landscape")),
}


def assert_matches_reference(family, answer, prompt, images, max_new_tokens):
    if family.dtype != torch.float32:
        return assert_near_reference(family, answer, prompt, images)
    expected, logits = family.reference(prompt, images, max_new_tokens)
    assert answer.token_ids == expected
    assert answer.finish.reason is (FinishReason.STOP if expected[-1] == family.stop_id else FinishReason.LENGTH)
    assert (answer.finish.usage.prompt_tokens, answer.finish.usage.completion_tokens) == (len(prompt), len(expected))
    top = torch.log_softmax(logits, dim=-1).topk(5, dim=-1)
    for step, report in enumerate(answer.top_logprobs):
        assert list(report.token_ids) == top.indices[step].tolist(), f"step {step}"
        torch.testing.assert_close(torch.tensor(report.logprobs), top.values[step], atol=LOGPROB_ATOL, rtol=0)
        chosen = torch.log_softmax(logits[step], dim=-1)[answer.token_ids[step]]
        assert abs(report.logprob - chosen.item()) <= LOGPROB_ATOL
    assert answer.text == family.chat.tokenizer.decode(expected, skip_special_tokens=True)
    return max((abs(torch.tensor(r.logprobs) - top.values[i]).max().item() for i, r in
                enumerate(answer.top_logprobs)), default=0.0)


def assert_near_reference(family, answer, prompt, images):
    """An engine in another dtype than the float32 reference, on its own greedy path: each token a near-best of the
    reference's log-softmax at that position, each reported log-probability near the reference's; the worst gap."""
    pixels = torch.cat([family.pixels[n] for name in images for n in name.split("+")]) if images else None
    logits = forced_logits(family.native, prompt.token_ids, answer.token_ids, pixels)
    reported = [[(token, report.logprob), *zip(report.token_ids, report.logprobs, strict=True)]
                for token, report in zip(answer.token_ids, answer.top_logprobs, strict=True)]
    gaps = forced_gaps(answer.token_ids, reported, logits)
    assert max(gaps) <= BF16_LOGPROB_ATOL, gaps
    assert answer.text == family.chat.tokenizer.decode(answer.token_ids, skip_special_tokens=True)
    return max(gaps)


@pytest.mark.parametrize("case", CASES)
async def test_greedy_tokens_and_logprobs_equal_transformers(family, case):
    conversation, images = CASES[case]
    request = family.request(conversation, images, max_new_tokens=12, top_logprobs=5)
    [answer] = await family.collect(family.engine.submit(request))
    assert len(answer.top_logprobs) == len(answer.token_ids)
    worst = assert_matches_reference(family, answer, request.prompt, images, 12)
    print(f"{family.name} {case}: {len(answer.token_ids)} tokens, worst top-5 logprob difference {worst:.2e}")


async def test_a_second_turn_reuses_the_first_turns_prefix(family):
    first_conversation = Conversation(user_parts=(ImageRef("portrait", 1), "What is in the picture?"))
    first_request = family.request(first_conversation, ("portrait",), max_new_tokens=8)
    [first] = await family.collect(family.engine.submit(first_request))
    history = (Turn((ImageRef("portrait", 1), "What is in the picture?"), first.text.strip()),)
    second_conversation = Conversation(user_parts=("And what colour is it?",), history=history)
    second_request = family.request(second_conversation, ("portrait",), max_new_tokens=8, top_logprobs=5)
    [second] = await family.collect(family.engine.submit(second_request))
    cached = second.finish.usage.cached_prompt_tokens
    # Every full block of the first turn's prompt (the second's prefix, the image included) came from the cache.
    assert (len(first_request.prompt) // BLOCK) * BLOCK <= cached < len(second_request.prompt)
    assert cached % BLOCK == 0
    assert_matches_reference(family, second, second_request.prompt, ("portrait",), 8)
    assert family.engine.load().prefix_hits >= 1


async def test_a_cache_salt_keeps_cached_prefixes_to_requests_of_the_same_salt(family):
    """The gateway's per-tenant salt (EngineRequest.cache_salt, vLLM's prompt `cache_salt`): a prompt is a prefix-cache
    hit only for requests of its own salt."""
    # Unique from the system message on: the engine is shared, and its unsalted scope holds other tests' prompts, which
    # all begin with the template's default system message.
    text = "Tell me a long story about a blue boat on a grey sea. " * 30
    conversation = Conversation(user_parts=(text,), system_message=f"Case {uuid.uuid4().hex}.")

    async def cached(salt: str) -> int:
        request = dataclasses.replace(family.request(conversation, max_new_tokens=2), cache_salt=salt)
        [answer] = await family.collect(family.engine.submit(request))
        return answer.finish.usage.cached_prompt_tokens

    assert await cached("alpha") == 0
    assert await cached("alpha") >= BLOCK  # the same salt: a hit
    assert await cached("beta") == 0 and await cached("") == 0


async def test_seeded_sampling_is_reproducible_per_seed(family):
    conversation = Conversation(user_parts=(ImageRef("small", 1), "Say something."))
    sampling = {"temperature": 1.0, "top_p": 0.95, "top_k": 100, "max_new_tokens": 12}
    runs = [await family.run(conversation, ("small",), seed=seed, **sampling) for seed in (7, 7, 8)]
    assert runs[0][0].token_ids == runs[1][0].token_ids
    assert runs[2][0].token_ids != runs[0][0].token_ids
    greedy = await family.run(conversation, ("small",), max_new_tokens=12)
    assert runs[0][0].token_ids != greedy[0].token_ids  # it did sample


async def test_n_answers_equal_single_requests_with_seed_plus_i(family):
    conversation = Conversation(user_parts=("Name three colours.",))
    sampling = {"temperature": 1.2, "max_new_tokens": 8}
    answers = await family.run(conversation, n=3, seed=40, **sampling)
    singles = [(await family.run(conversation, seed=40 + i, **sampling))[0] for i in range(3)]
    assert [a.token_ids for a in answers] == [s.token_ids for s in singles]
    assert [a.text for a in answers] == [s.text for s in singles]
    assert [a.finish.index for a in answers] == [0, 1, 2]
    assert len({tuple(a.token_ids) for a in answers}) > 1


async def test_a_stop_string_cuts_the_text_as_the_engine_interface_says(family):
    conversation = Conversation(user_parts=("Write a long sentence.",))
    [free] = await family.run(conversation, max_new_tokens=24)
    text = free.text
    # A stop string first seen some way into the answer: two characters starting at the middle character.
    start = next(k for k in range(len(text) // 2, len(text) - 2) if text.find(text[k:k + 2]) == k
                 and text[k:k + 2].strip())
    stop = text[start:start + 2]
    [cut] = await family.run(conversation, max_new_tokens=24, stop_strings=(stop, "never seen"))
    assert cut.finish.reason is FinishReason.STOP
    assert cut.text == "".join(cut.deltas) == text[:start]
    assert all(stop not in delta for delta in cut.deltas)
    # The answer ended with the token that completed the stop string.
    decode = family.chat.tokenizer.decode
    assert cut.token_ids == free.token_ids[:len(cut.token_ids)]
    assert stop in decode(cut.token_ids, skip_special_tokens=True)
    assert stop not in decode(cut.token_ids[:-1], skip_special_tokens=True)


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties over the generated tokens (not the prompt), then the logit bias."""

    def __init__(self, prompt_length: int, presence: float, frequency: float, bias: dict[int, float]):
        self.prompt_length, self.presence, self.frequency, self.bias = prompt_length, presence, frequency, bias

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[0, self.prompt_length:]
        counts = torch.bincount(generated, minlength=scores.shape[-1]).float()
        scores = scores - counts * self.frequency - (counts > 0).float() * self.presence
        for token, bias in self.bias.items():
            scores[:, token] += bias
        return scores


async def test_penalties_count_the_generated_tokens_only_and_bias_adds(family):
    conversation = Conversation(user_parts=("Repeat after me: red red red red.",))
    request = family.request(conversation, max_new_tokens=12)
    special = set(family.chat.tokenizer.all_special_ids)
    words = [t for t in request.prompt.token_ids[-24:] if t not in special]
    favourite = max(set(words), key=words.count)  # a token the prompt holds several times ("red")
    presence, frequency = 1.5, 0.7
    # Bias it to the top of the first step by a margin of 1: a penalty that counted the prompt's tokens
    # (presence + frequency x its count there, over 2) would push it back below the best other token.
    _, logits = family.reference(request.prompt, (), 1)
    others = logits[0].clone()
    others[favourite] = float("-inf")
    bias = round(float(others.max() - logits[0, favourite]) + 1.0, 3)
    assert presence + frequency * words.count(favourite) > 2.0
    options = {"presence_penalty": presence, "frequency_penalty": frequency, "logit_bias": ((favourite, bias),)}
    [answer] = await family.run(conversation, max_new_tokens=12, **options)
    penalties = OpenAIPenalties(len(request.prompt), presence, frequency, {favourite: bias})
    expected, _ = family.reference(request.prompt, (), 12, logits_processor=LogitsProcessorList([penalties]))
    assert answer.token_ids == expected
    assert answer.token_ids[0] == favourite
    [plain] = await family.run(conversation, max_new_tokens=12)
    assert plain.token_ids[0] != favourite


async def test_what_the_engine_refuses_is_refused_before_anything_runs(family):
    steps = family.engine.load().steps
    with pytest.raises(InvalidArgumentError, match="repetition_penalty"):
        family.engine.submit(family.request(Conversation(user_parts=("Hi",)), repetition_penalty=1.2))
    regex = Constraint(ConstraintKind.REGEX, pattern="[ab]+")
    with pytest.raises(InvalidArgumentError, match="top_logprobs with a constraint"):
        family.engine.submit(family.request(Conversation(user_parts=("Hi",)), constraint=regex, top_logprobs=2))
    # Embeddings vLLM's engine core would compute garbage (or die) with never reach it.
    request = family.request(Conversation(user_parts=(ImageRef("small-broken", 1), "Hi")), ("small",))
    for value in (float("nan"), float("inf")):
        rows = request.image_rows[0].clone()
        rows[3, 5] = value
        with pytest.raises(InvalidArgumentError, match="NaN or infinite"):
            await family.collect(family.engine.submit(dataclasses.replace(request, image_rows=(rows,))))
    assert family.engine.load().steps == steps


async def test_cancel_and_the_deadline_end_an_answer_and_free_its_slot(family):
    conversation = Conversation(user_parts=("Count to a thousand.",))
    endless = {"max_new_tokens": 2000, "logit_bias": ((family.stop_id, -100.0),)}  # it never ends its turn
    stream = family.engine.submit(family.request(conversation, **endless))
    first = await stream.__anext__()
    assert first.token_ids
    stream.cancel()
    rest = [event async for event in stream]
    assert rest[-1].reason is FinishReason.CANCELLED and rest[-1].usage.completion_tokens < 2000
    request = family.request(conversation, **endless)
    request = dataclasses.replace(request, deadline=time.monotonic() + 1.0)
    [late] = await family.collect(family.engine.submit(request))
    assert late.finish.reason is FinishReason.CANCELLED and len(late.token_ids) < 2000
    for _ in range(100):
        if family.engine.load().running == 0:
            break
        await asyncio.sleep(0.05)
    assert family.engine.load().running == 0
    # The engine serves on.
    [after] = await family.run(conversation, max_new_tokens=3)
    assert after.finish.reason is FinishReason.LENGTH and len(after.token_ids) == 3


async def test_the_metrics_see_vllms_steps_and_our_tokens(family):
    metrics = family.metrics
    before = metrics.generated_tokens.labels("base")._value.get()
    steps_before = metrics.scheduler_steps._value.get()
    [answer] = await family.run(Conversation(user_parts=(ImageRef("small", 1), "Hello")), ("small",),
                                max_new_tokens=5)
    assert metrics.generated_tokens.labels("base")._value.get() - before == len(answer.token_ids)
    assert metrics.scheduler_steps._value.get() - steps_before >= len(answer.token_ids)
    assert metrics.prefill_tokens._value.get() > 0
    load = family.engine.load()
    assert load.kv_budget_bytes > 0 and load.steps > 0


async def test_when_vllms_engine_core_dies_requests_in_flight_are_retryable_and_the_engine_restarts(family):
    """It kills the family's engine core (a process this test run started), then waits for the new one."""
    readiness: list[bool] = []
    family.engine.readiness = readiness.append
    restarts = family.engine.keeper.restarts
    conversation = Conversation(user_parts=("Count to a thousand.",))
    try:
        stream = family.engine.submit(family.request(conversation, max_new_tokens=2000,
                                                     logit_bias=((family.stop_id, -100.0),)))
        await stream.__anext__()
        [core] = [p for p in multiprocessing.active_children() if p.name.startswith("EngineCore")]
        os.kill(core.pid, signal.SIGKILL)
        with pytest.raises(BatchFaultError, match="retry"):
            async for _ in stream:
                pass
        await until(lambda: readiness == [False], timeout=10)
        with pytest.raises(NotReadyError, match="restarted"):
            family.engine.submit(family.request(conversation))
        await until(lambda: readiness == [False, True], timeout=300)
    finally:
        family.engine.readiness = None
    assert family.engine.keeper.restarts == restarts + 1
    request = family.request(Conversation(user_parts=(ImageRef("small", 1), "Hello again.")), ("small",),
                             max_new_tokens=6, top_logprobs=5)
    [answer] = await family.collect(family.engine.submit(request))
    assert_matches_reference(family, answer, request.prompt, ("small",), 6)
