"""Every cost bound of a request, end to end on one `internvl-serve up` stack (issue 25): each hostile request is
refused INVALID_ARGUMENT with a message naming the limit's flag and value, before any model work (the vision
service's encoded tiles and the LLM's prompt and prefill token counters do not move), and an ordinary request sent
alongside is answered.

The stack runs with small limits so that each refusal costs a few bytes; the limits' defaults are checked by the
unit tests (tests/contract/test_sampling_limits.py, tests/tools/test_cli_usage.py).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from helpers.chat import assert_no_leak, chat, image_part, text_part
from helpers.media import noise_png
from internvl.common.v1 import common_pb2 as C
from internvl.gateway.v1 import gateway_pb2 as G
from stack import up_stack

from tools.launcher import metric

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

CONTEXT = 4096
LIMITS = {"--max-media-items": "3", "--max-conversation-media-items": "4", "--max-n": "2", "--max-logit-bias": "4",
          "--max-stop-strings": "2", "--max-stop-string-chars": "8", "--max-constraint-chars": "1000",
          "--max-constraint-choices": "3", "--max-prompt-tokens": "2000", "--max-context-tokens": str(CONTEXT),
          "--grammar-compile-timeout-s": "2"}
# 17 characters of regex that take xgrammar over 10 s to compile against the tiny checkpoint's 151k-token vocabulary.
PATHOLOGICAL_REGEX = "(.{1,200}){1,200}"
# The counters of model work: tiles through the vision encoder, prompt tokens finished and fed to prefill.
WORK = (("vision-0", "internvl_vision_tiles_encoded_total"), ("llm", "internvl_llm_prompt_tokens_total"),
        ("llm", "internvl_llm_prefill_tokens_total"))


@pytest.fixture(scope="module")
def stack(tiny_checkpoint, tmp_path_factory):
    args = [token for flag, value in LIMITS.items() for token in (flag, value)]
    with up_stack(tiny_checkpoint(), tmp_path_factory.mktemp("up-logs"), *args, http=False) as running:
        yield running


@pytest.fixture(scope="module")
def png():
    return noise_png(40, 30)


def work(stack) -> dict[str, float]:
    return {name: metric(stack.metrics(process), name) for process, name in WORK}


def refused(stack, content, match: str, **fields) -> str:
    """Sends one hostile Chat; it must be INVALID_ARGUMENT with `match` in its message, leaking nothing."""
    with pytest.raises(grpc.RpcError) as caught:
        chat(stack.stub, content, timeout=120, **fields)
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert match in error.details(), error.details()
    assert_no_leak(error.details())
    return error.details()


def ordinary(stack) -> None:
    answer = chat(stack.stub, [text_part("Hello there.")], max_new_tokens=2, timeout=120)
    assert answer.finish is not None and answer.finish.usage.completion_tokens >= 1


def refused_before_work_and_beside_an_ordinary_request(stack, content, match: str, **fields) -> None:
    """Refused alone with the model-work counters unchanged, then again while an ordinary request is answered."""
    before = work(stack)
    refused(stack, content, match, **fields)
    assert work(stack) == before
    with ThreadPoolExecutor(2) as pool:
        side = pool.submit(ordinary, stack)
        refused(stack, content, match, **fields)
        side.result()


def sampling(**fields) -> G.SamplingParams:
    return G.SamplingParams(max_new_tokens=2, **fields)


CASES = [
    ("n", {"sampling": sampling(n=3)}, "n must be between 1 and 2 (--max-n), got 3"),
    ("logit_bias", {"sampling": sampling(logit_bias={i: 1.0 for i in range(5)})},
     "logit_bias may have at most 4 entries (--max-logit-bias), got 5"),
    ("stop strings", {"sampling": sampling(stop_strings=["a", "b", "c"])},
     "at most 2 stop strings (--max-stop-strings), got 3"),
    ("stop string length", {"sampling": sampling(stop_strings=["123456789"])},
     "at most 8 characters (--max-stop-string-chars), got 9"),
    ("constraint size", {"sampling": sampling(constraint=C.Constraint(regex="a" * 1001))},
     "larger than 1000 characters (--max-constraint-chars), got 1001"),
    ("choices", {"sampling": sampling(constraint=C.Constraint(choice=C.ChoiceList(choices=["a", "b", "c", "d"])))},
     "at most 3 choices (--max-constraint-choices), got 4"),
    ("max_new_tokens", {"sampling": G.SamplingParams(max_new_tokens=1_000_000_000)},
     "max_new_tokens 1000000000 does not fit: the prompt has"),
    ("prompt tokens", {"sampling": sampling(), "text": "word " * 2100}, "at most 2000 (--max-prompt-tokens)"),
]


@pytest.mark.parametrize(("name", "fields", "match"), CASES, ids=[c[0] for c in CASES])
def test_sampling_and_prompt_bounds(stack, name, fields, match):
    fields = dict(fields)
    content = [text_part(fields.pop("text", "Hi."))]
    refused_before_work_and_beside_an_ordinary_request(stack, content, match, **fields)


def test_max_new_tokens_names_both_numbers(stack):
    message = refused(stack, [text_part("Hi.")], "", sampling=G.SamplingParams(max_new_tokens=CONTEXT))
    assert f"max_new_tokens {CONTEXT} does not fit: the prompt has " in message
    assert f"the context {CONTEXT} (--max-context-tokens)" in message


def test_media_items_per_request(stack, png):
    four = [image_part(png) for _ in range(4)] + [text_part("Compare.")]
    refused_before_work_and_beside_an_ordinary_request(
        stack, four, "4 images and videos (its history included); at most 3 per request (--max-media-items)",
        max_num=1)
    # The caller's history counts too.
    history = [G.Turn(user_content=[image_part(png), image_part(png)], assistant_text="Two.")]
    refused(stack, [image_part(png), image_part(png), text_part("And these?")], "(--max-media-items)",
            history=history, max_num=1)


def test_media_items_per_conversation(stack, png):
    first = chat(stack.stub, [image_part(png), image_part(png), image_part(png), text_part("Three.")], max_num=1,
                 timeout=120)
    session = first.finish.session_id
    refused_before_work_and_beside_an_ordinary_request(
        stack, [image_part(noise_png(30, 40)), image_part(noise_png(31, 40)), text_part("Two more.")],
        "the conversation would hold 5 images and videos (3 from earlier rounds of the session); at most 4 per "
        "conversation (--max-conversation-media-items)", session_id=session, max_num=1)
    # One more fits.
    assert chat(stack.stub, [image_part(png), text_part("One more.")], session_id=session, max_num=1,
                timeout=120).finish is not None


def test_a_grammar_over_its_compile_budget_is_refused_and_others_are_answered(stack):
    """The compile runs in a worker process killed at the budget: refused after about 2 s (not the compile's 10+),
    while an ordinary request is answered; the only model work done is the ordinary request's."""
    before = work(stack)
    with ThreadPoolExecutor(1) as pool:
        hostile = pool.submit(refused, stack, [text_part("Hi.")],
                              "regex: the constraint took longer than 2 s to compile (--grammar-compile-timeout-s)",
                              sampling=sampling(constraint=C.Constraint(regex=PATHOLOGICAL_REGEX)))
        side = chat(stack.stub, [text_part("Hello there, again.")], max_new_tokens=2, timeout=120)
        hostile.result()
    after = work(stack)
    assert after["internvl_vision_tiles_encoded_total"] == before["internvl_vision_tiles_encoded_total"]
    assert (after["internvl_llm_prompt_tokens_total"] - before["internvl_llm_prompt_tokens_total"]
            == side.finish.usage.prompt_tokens)
    # The killed worker was replaced: a constrained request compiles and is answered.
    answer = chat(stack.stub, [text_part("Hi.")], timeout=120,
                  sampling=sampling(constraint=C.Constraint(choice=C.ChoiceList(choices=["yes", "no"]))))
    assert answer.text in ("yes", "no")
