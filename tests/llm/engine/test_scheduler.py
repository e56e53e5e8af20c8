"""The scheduler's decisions against a fake model runner: the plans it makes and what it makes of the results.

No model: the runner's side of the step contract (services.llm.engine.step) is written out by each test, as the runner
would return it. Token id t decodes to the letter chr(ord("a") + t); STOP is the stop token.
"""

from __future__ import annotations

import dataclasses
import time

import pytest

from services.contract.errors import (
    DeadlineExceededError,
    InternVLError,
    InvalidArgumentError,
    OverloadedError,
)
from services.contract.finish import FinishReason
from services.contract.priority import Priority
from services.contract.sampling import SamplingParams
from services.llm.engine.admission import Admission
from services.llm.engine.api import BatchFaultError, StepReport
from services.llm.engine.events import EngineRequest, Finish, TokenDelta
from services.llm.engine.prefix_cache import PrefixCache
from services.llm.engine.scheduler import MIN_PREFILL_CHUNK, Scheduler
from services.llm.engine.step import Chunk, Leave, NewPrompt, Sampled, StepPlan, StepResult
from services.llm.prompt import Prompt

STOP = 99
BYTES_PER_TOKEN = 10


class Letters:
    """A tokenizer whose token t is one letter."""

    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(chr(ord("a") + t) for t in ids if t != STOP)


class FakeRunner:
    """The runner's side between steps: remembers what it was handed; every prompt finds `cached` positions cached,
    and `refuse(new)` may name the error admitting it raises."""

    def __init__(self, cached: int = 0, refuse=lambda new: None):
        self.prefix_cache = PrefixCache(0)
        self.steps = 0
        self.cached = cached
        self.refuse = refuse
        self.admitted: list[NewPrompt] = []
        self.released: list[int] = []
        self.resets = 0

    def admit(self, new: NewPrompt) -> int:
        error = self.refuse(new)
        if error is not None:
            raise error
        self.admitted.append(new)
        return self.cached

    def release(self, prompt: int) -> None:
        self.released.append(prompt)

    def reset(self) -> None:
        self.resets += 1


def make(runner: FakeRunner | None = None, *, max_step_tokens: int = 512, max_batch_size: int = 8,
         budget_tokens: int = 10_000) -> tuple[Scheduler, FakeRunner]:
    runner = runner or FakeRunner()
    admission = Admission(budget_tokens * BYTES_PER_TOKEN, BYTES_PER_TOKEN, max_batch_size, max_bypass=max_batch_size)
    return Scheduler(runner, Letters(), admission, stop_token_id=STOP, max_step_tokens=max_step_tokens), runner


def request(prompt_tokens: int, max_new_tokens: int = 10, **sampling) -> EngineRequest:
    prompt = Prompt(text="", token_ids=tuple(range(prompt_tokens)), images=(), tokens_per_tile=256)
    return EngineRequest(prompt, SamplingParams(**sampling), max_new_tokens)


def events(stream) -> list:
    """Everything the stream's queue holds now (events and errors)."""
    out = []
    while not stream._queue.empty():
        out.append(stream._queue.get_nowait())
    return out


def step(scheduler: Scheduler, plan: StepPlan, **result) -> None:
    scheduler.update(plan, StepResult(**result))


def test_the_step_budget_is_shared_by_the_prompts_in_admission_order():
    scheduler, runner = make(max_step_tokens=100)
    long, short, middle = (scheduler.submit(request(n)) for n in (150, 20, 60))
    plan = scheduler.plan()
    ids = [new.id for new in runner.admitted]
    assert len(ids) == 3 and plan.decode == frozenset() and plan.leaving == ()
    # 100 tokens over three prompts: 33 each, the short one done in this step.
    assert plan.prefill == (Chunk(ids[0], 33), Chunk(ids[1], 20), Chunk(ids[2], 33))
    step(scheduler, plan, completed=[ids[1]], sampled=[Sampled(ids[1], 3, None)])
    assert [e.text for e in events(short)] == ["d"]
    plan = scheduler.plan()
    # Its answer decodes now (one token of the budget); the 99 left are shared by the other two, 49 each.
    assert plan.decode == frozenset({ids[1]})
    assert plan.prefill == (Chunk(ids[0], 33 + 49), Chunk(ids[2], 60))
    assert events(long) == events(middle) == []


def test_many_prompts_get_at_least_the_smallest_chunk_each():
    scheduler, _ = make(max_step_tokens=100)
    for _ in range(5):
        scheduler.submit(request(200))
    plan = scheduler.plan()
    assert len(plan.prefill) == 100 // MIN_PREFILL_CHUNK
    assert {chunk.end for chunk in plan.prefill} == {100 // 3}


def test_a_cached_prefix_is_where_the_first_chunk_starts_and_is_counted_in_the_usage():
    scheduler, runner = make(FakeRunner(cached=40), max_step_tokens=32)
    stream = scheduler.submit(request(100, max_new_tokens=1))
    plan = scheduler.plan()
    [new] = runner.admitted
    assert plan.prefill == (Chunk(new.id, 72),)
    step(scheduler, plan)
    assert scheduler.plan().prefill == (Chunk(new.id, 100),)
    step(scheduler, scheduler.plan(), completed=[new.id], sampled=[Sampled(new.id, 0, None, FinishReason.LENGTH)])
    _, finish = events(stream)
    assert finish.usage.prompt_tokens == 100 and finish.usage.cached_prompt_tokens == 40
    assert finish.usage.completion_tokens == 1 and finish.reason is FinishReason.LENGTH


def test_n_answers_are_admitted_as_one_entry_and_decode_side_by_side_after_the_fork():
    scheduler, runner = make(max_batch_size=4)
    three = scheduler.submit(request(10, n=3, seed=5, temperature=1.0))
    two = scheduler.submit(request(10, n=2))
    plan = scheduler.plan()
    [new] = runner.admitted  # 3 + 2 rows exceed the batch of 4: the second waits
    assert len(new.answers) == 3 and new.request.sampling.n == 3
    assert (scheduler.load().running, scheduler.load().waiting) == (3, 1)
    step(scheduler, plan, completed=[new.id], sampled=[Sampled(a, 1, None) for a in new.answers])
    assert sorted(e.index for e in events(three)) == [0, 1, 2]
    plan = scheduler.plan()
    assert plan.decode == frozenset(new.answers) and plan.prefill == ()
    assert events(two) == []
    with pytest.raises(InvalidArgumentError, match="n = 5 answers exceed this LLM server's batch of 4"):
        scheduler.submit(request(10, n=5))


def test_a_request_over_the_budget_is_refused_at_once():
    scheduler, _ = make(budget_tokens=100)
    with pytest.raises(OverloadedError, match="lower max_new_tokens"):
        scheduler.submit(request(50, max_new_tokens=60))


def run_one(scheduler: Scheduler, runner: FakeRunner, **sampling):
    """A request admitted and forked, its first token (1, "b") delivered: its stream and its sequence id."""
    stream = scheduler.submit(request(10, max_new_tokens=20, **sampling))
    plan = scheduler.plan()
    new = runner.admitted[-1]
    step(scheduler, plan, completed=[new.id], sampled=[Sampled(new.id, 1, None)])
    assert [e.text for e in events(stream)] == ["b"]
    return stream, new.id


def test_a_stop_string_ends_the_answer_and_its_row_leaves_at_the_next_step_remembered():
    scheduler, runner = make()
    stream, answer = run_one(scheduler, runner, stop_strings=("cd",))
    plan = scheduler.plan()
    step(scheduler, plan, sampled=[Sampled(answer, 2, None)])  # "c": held back, it may start "cd"
    assert [e.text for e in events(stream)] == [""]
    step(scheduler, scheduler.plan(), sampled=[Sampled(answer, 3, None)])  # "d": the stop string
    delta, finish = events(stream)
    assert delta.text == "" and finish.reason is FinishReason.STOP and finish.usage.completion_tokens == 3
    plan = scheduler.plan()
    assert plan.leaving == (Leave(answer, remember=True),) and plan.decode == frozenset()
    step(scheduler, plan)
    assert scheduler.plan() is None


def test_a_cancelled_answer_leaves_unremembered_and_a_cancelled_prompt_is_released():
    scheduler, runner = make(max_step_tokens=32)
    running, answer = run_one(scheduler, runner)
    prefilling = scheduler.submit(request(100))
    plan = scheduler.plan()
    prompt = runner.admitted[-1].id
    step(scheduler, plan, sampled=[Sampled(answer, 1, None)])
    running.cancel()
    prefilling.cancel()
    plan = scheduler.plan()
    assert plan.leaving == (Leave(answer, remember=False),) and plan.decode == frozenset() and plan.prefill == ()
    assert runner.released == [prompt]
    assert events(running)[-1].reason is FinishReason.CANCELLED
    assert [e.reason for e in events(prefilling)] == [FinishReason.CANCELLED]
    assert scheduler.load().running == 0


def test_a_row_the_runner_ended_has_left_and_flushes_its_held_back_text():
    scheduler, runner = make()
    stream, answer = run_one(scheduler, runner, stop_strings=("cd",))
    step(scheduler, scheduler.plan(), sampled=[Sampled(answer, 2, None, FinishReason.LENGTH)])
    delta, finish = events(stream)
    assert delta.text == "c" and finish.reason is FinishReason.LENGTH  # "c" never completed the stop string
    assert scheduler.plan() is None  # no row to drop: the runner dropped it


def test_a_prompt_failing_before_its_fork_fails_every_answer_and_a_row_fails_alone():
    scheduler, runner = make()
    group = scheduler.submit(request(10, n=2))
    pair = scheduler.submit(request(10, n=2))
    plan = scheduler.plan()
    first, second = runner.admitted
    error = InternVLError("injected")
    # The second prompt forked, and its answer 0 failed sampling: that answer's id is also the prompt's.
    step(scheduler, plan, failed=[(first.id, error), (second.answers[0], error)], completed=[second.id],
         sampled=[Sampled(second.answers[1], 1, None)])
    assert events(group) == [error, error]
    assert events(pair)[-1] is error
    plan = scheduler.plan()
    assert plan.decode == frozenset({second.answers[1]})


def test_a_request_whose_admission_fails_fails_alone():
    runner = FakeRunner(refuse=lambda new: InternVLError("unusable inputs") if len(new.request.prompt) == 13 else None)
    scheduler, _ = make(runner)
    bad, good = scheduler.submit(request(13)), scheduler.submit(request(10))
    plan = scheduler.plan()
    assert [str(e) for e in events(bad)] == ["unusable inputs"]
    assert plan.prefill == (Chunk(runner.admitted[0].id, 10),) and events(good) == []


def test_abort_fails_running_and_prefilling_requests_and_resets_the_runner():
    scheduler, runner = make(max_step_tokens=32)
    running, _ = run_one(scheduler, runner)
    prefilling = scheduler.submit(request(100, n=2))
    step(scheduler, scheduler.plan())
    scheduler.abort(RuntimeError("bookkeeping"))
    [lost] = events(running)
    assert isinstance(lost, BatchFaultError) and "retry" in str(lost)
    assert [type(e) for e in events(prefilling)] == [BatchFaultError, BatchFaultError]
    assert runner.resets == 1 and scheduler.load().running == 0
    assert scheduler.plan() is None


def test_load_counts_rows_reserved_kv_and_the_batch_bytes():
    scheduler, runner = make(max_step_tokens=32)
    run_one(scheduler, runner)  # extent 10 + 20
    scheduler.submit(request(100, max_new_tokens=10, n=2))  # extent 110, two rows
    plan = scheduler.plan()
    step(scheduler, plan, sampled=[Sampled(next(iter(plan.decode)), 1, None)], kv_bytes=1234,
         report=StepReport(1, 1, 32))
    load = scheduler.load()
    assert (load.running, load.waiting, load.kv_bytes) == (3, 0, 1234)
    assert load.kv_reserved_bytes == 3 * 110 * BYTES_PER_TOKEN  # the padded batch: rows x the longest extent
    scheduler.close()
    assert scheduler.load().running == 0 and runner.resets == 1


def test_close_cancels_everything_unfinished():
    scheduler, runner = make(max_batch_size=1)
    running, _ = run_one(scheduler, runner)
    waiting = scheduler.submit(request(10))
    scheduler.close()
    assert events(running)[-1].reason is FinishReason.CANCELLED
    [finish] = events(waiting)
    assert isinstance(finish, Finish) and finish.reason is FinishReason.CANCELLED and finish.timing.admitted is None


def test_token_deltas_carry_the_answer_index_and_logprobs():
    scheduler, runner = make()
    stream = scheduler.submit(request(10, n=2))
    plan = scheduler.plan()
    new = runner.admitted[0]
    step(scheduler, plan, completed=[new.id], sampled=[Sampled(new.answers[1], 4, None), Sampled(new.id, 5, None)])
    deltas = events(stream)
    assert [(d.index, d.text) for d in deltas] == [(1, "e"), (0, "f")]
    assert all(isinstance(d, TokenDelta) and d.top_logprobs == () for d in deltas)


def test_waiting_requests_are_admitted_most_important_first_and_fifo_within_a_priority():
    scheduler, runner = make()
    # Prompt lengths name the requests: 11 and 14 standard, 12 sheddable, 13 critical, 15 critical.
    for length, priority in ((11, Priority.STANDARD), (12, Priority.SHEDDABLE), (13, Priority.CRITICAL),
                             (14, Priority.STANDARD), (15, Priority.CRITICAL)):
        scheduler.submit(dataclasses.replace(request(length), priority=priority))
    scheduler.plan()
    assert [len(new.request.prompt) for new in runner.admitted] == [13, 15, 11, 14, 12]


def test_a_critical_request_goes_before_waiting_ones_when_a_row_frees():
    scheduler, runner = make(max_batch_size=1)
    running = scheduler.submit(request(10, max_new_tokens=1))
    plan = scheduler.plan()
    [first] = runner.admitted
    scheduler.submit(request(20))
    scheduler.submit(dataclasses.replace(request(30), priority=Priority.CRITICAL))
    step(scheduler, plan, completed=[first.id], sampled=[Sampled(first.id, 0, None, FinishReason.LENGTH)])
    assert isinstance(events(running)[-1], Finish)
    scheduler.plan()
    assert [len(new.request.prompt) for new in runner.admitted] == [10, 30]


def test_a_request_whose_deadline_passes_while_waiting_fails_deadline_exceeded_without_running():
    scheduler, runner = make(max_batch_size=1)
    scheduler.submit(request(10))
    scheduler.plan()
    late = scheduler.submit(dataclasses.replace(request(20), deadline=time.monotonic() + 0.05))
    time.sleep(0.1)
    scheduler.plan()
    [error] = events(late)
    assert isinstance(error, DeadlineExceededError) and "waited in the LLM server's queue" in str(error)
    assert [len(new.request.prompt) for new in runner.admitted] == [10]
    assert scheduler.load().waiting == 0
