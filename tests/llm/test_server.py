"""End to end: `internvl-serve llm` as a real process with a real Redis, against the single-process reference path.

Greedy output must equal `InternVLChat.generate_ids` (transformers' generate) token for token, and the streamed top
log-probabilities must equal the reference forward's log-softmax to 1e-4 (float32), for both language models.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from dataclasses import dataclass

import grpc
import pytest
import redis.asyncio as aioredis
import torch
from internvl.common.v1 import common_pb2
from internvl.llm.v1 import llm_pb2, llm_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from stack import start_services

from services.contract.template import clean_response, video_prefix
from services.model.chat import GenerationParams, splice_image_embeddings
from services.runtime.embedding_store import EmbeddingCache
from services.runtime.grpc_errors import error_detail
from services.runtime.grpc_server import channel_options

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

LLMS = ("qwen2", "internlm2")
MAX_NEW = 8
TOP = 5


@pytest.fixture(scope="module", params=LLMS)
def llm(request):
    return request.param


@pytest.fixture(scope="module")
def servers(tiny_checkpoint, redis_url):
    """One server process per language model, started and stopped side by side (mostly imports and exits)."""
    with contextlib.ExitStack() as stack:
        started = start_services(stack, [(f"llm-{llm}", "llm", ["--model", str(tiny_checkpoint(llm=llm)), "--redis-url",
                                                                  redis_url, "--dtype", "float32", "--device", "cpu",
                                                                  "--max-step-tokens", "256"]) for llm in LLMS])
        yield dict(zip(LLMS, started, strict=True))


@pytest.fixture(scope="module")
def server(servers, llm):
    return servers[llm]


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address, options=channel_options()) as channel:
        yield llm_pb2_grpc.LLMServiceStub(channel)


@pytest.fixture(scope="module")
def chat(llm, reference):
    return reference(llm)


@pytest.fixture(scope="module")
def keys(chat, pixels, redis_url, embeddings_of):
    """name -> (cache key, tiles) of every golden image, their embeddings stored in Redis as the vision service would."""
    namespace = uuid.uuid4().hex
    stored = {name: (f"test:{namespace}:{name}", tiles) for name, tiles in pixels.items()}

    async def put_all():
        redis = aioredis.Redis.from_url(redis_url)
        cache = EmbeddingCache(redis, chat.checkpoint.fingerprint)
        for key, tiles in stored.values():
            await cache.put(key, embeddings_of(chat, tiles))
        await redis.aclose()

    asyncio.run(put_all())
    return stored


def image(keys, name) -> llm_pb2.ContentPart:
    key, tiles = keys[name]
    return llm_pb2.ContentPart(image=llm_pb2.ImageRef(key=key, num_tiles=tiles.shape[0]))


def text(value: str) -> llm_pb2.ContentPart:
    return llm_pb2.ContentPart(text=value)


@dataclass
class Reply:
    token_ids: list[int]
    text: str
    top_logprobs: list
    finish: llm_pb2.GenerateFinish


def generate(stub, start: llm_pb2.GenerateStart, timeout: float = 60) -> Reply:
    reply = Reply([], "", [], None)
    for response in stub.Generate(iter([llm_pb2.GenerateRequest(start=start)]), timeout=timeout):
        if response.HasField("delta"):
            reply.token_ids += response.delta.token_ids
            reply.text += response.delta.text
            reply.top_logprobs += response.delta.top_logprobs
        else:
            reply.finish = response.finish
    return reply


def start(parts, history=(), max_new=MAX_NEW, **sampling) -> llm_pb2.GenerateStart:
    return llm_pb2.GenerateStart(user_parts=parts, history=history, sampling=common_pb2.SamplingParams(
        max_new_tokens=max_new, top_logprobs=TOP, **sampling))


@torch.inference_mode()
def reference_run(chat, question, history, tiles, num_patches):
    """(prompt, greedy ids from HF generate, log-softmax at each generated position from one HF forward)."""
    _, prompt = chat.build_prompt(question, history, num_patches)
    ids = chat.generate_ids(prompt, tiles, GenerationParams(max_new_tokens=MAX_NEW))
    prompt_ids = chat.tokenizer(prompt, return_tensors="pt").input_ids
    full = torch.cat([prompt_ids, torch.tensor([ids[:-1]], dtype=torch.long)], dim=1)
    embeds = chat.language_model.get_input_embeddings()(full)
    if tiles is not None:
        embeds = splice_image_embeddings(embeds, full, chat.vision.encode(tiles), chat.img_context_id)
    logits = chat.language_model(inputs_embeds=embeds, logits_to_keep=len(ids)).logits[0]
    return prompt, ids, torch.log_softmax(logits.float(), dim=-1)


def assert_parity(reply: Reply, prompt: str, ids: list[int], logprobs: torch.Tensor, chat) -> None:
    assert reply.token_ids == ids
    assert reply.finish.usage.prompt_tokens == len(chat.tokenizer(prompt).input_ids)
    assert reply.finish.usage.completion_tokens == len(ids)
    assert reply.text == chat.tokenizer.decode(ids, skip_special_tokens=True)
    assert len(reply.top_logprobs) == len(ids)
    for position, (token, top) in enumerate(zip(ids, reply.top_logprobs, strict=True)):
        expected = logprobs[position]
        values, _ = torch.topk(expected, TOP)
        assert top.logprob == pytest.approx(float(expected[token]), abs=1e-4)
        assert list(top.logprobs) == pytest.approx(values.tolist(), abs=1e-4)
        # Token ids by value, so that a near-tie in the order cannot fail the test.
        assert [float(expected[t]) for t in top.token_ids] == pytest.approx(list(top.logprobs), abs=1e-4)


def test_model_info_and_health(stub, chat):
    info = stub.GetModelInfo(llm_pb2.GetModelInfoRequest()).model_info
    assert info.fingerprint == chat.checkpoint.fingerprint
    assert info.llm_hidden_size == chat.language_model.config.hidden_size
    assert info.dtype == common_pb2.DTYPE_FLOAT32
    assert info.tokens_per_tile == 256 and info.image_size == 448
    assert info.llm_architecture == chat.checkpoint.spec.llm_architecture


def test_text_only(stub, chat):
    reply = generate(stub, start([text("Tell me a story about a lighthouse.")]))
    assert_parity(reply, *reference_run(chat, "Tell me a story about a lighthouse.", None, None, []), chat)


def test_one_image(stub, chat, keys, pixels):
    # No placeholder: the image goes first as `<image>\n`, as the original chat() prepends it.
    reply = generate(stub, start([image(keys, "wide"), text("Describe the picture.")]))
    assert_parity(reply, *reference_run(chat, "Describe the picture.", None, pixels["wide"], [3]), chat)


def test_two_images(stub, chat, keys, pixels):
    # No placeholders: `Image-1: <image>\nImage-2: <image>\n`, the original multi-image convention.
    reply = generate(stub, start([image(keys, "small"), image(keys, "wide"), text("Compare them.")]))
    tiles = torch.cat([pixels["small"], pixels["wide"]])
    question = "Image-1: <image>\nImage-2: <image>\nCompare them."
    assert_parity(reply, *reference_run(chat, question, None, tiles, [1, 3]), chat)


def test_video_frames(stub, chat, keys, pixels):
    names = ["small", "landscape", "portrait"]
    frames = llm_pb2.VideoRef(frames=[image(keys, n).image for n in names])
    reply = generate(stub, start([llm_pb2.ContentPart(video=frames), text("What happens?")]))
    tiles = torch.cat([pixels[n] for n in names])
    assert_parity(reply, *reference_run(chat, video_prefix(3) + "What happens?", None, tiles, [1, 1, 1]), chat)


def test_second_round_with_history_reuses_the_prefix(stub, chat, keys, pixels):
    question = "Image-1: <image>\nImage-2: <image>\nWhat differs?"
    parts = [text(question), image(keys, "small"), image(keys, "portrait")]
    tiles = torch.cat([pixels["small"], pixels["portrait"]])
    first = generate(stub, start(parts))
    prompt, ids, logprobs = reference_run(chat, question, None, tiles, [1, 1])
    assert_parity(first, prompt, ids, logprobs, chat)

    answer = clean_response(first.text)
    assert answer == clean_response(chat.tokenizer.decode(ids, skip_special_tokens=True))
    history = [llm_pb2.Turn(user_parts=parts, assistant_text=answer)]
    second = generate(stub, start([text("And the colours?")], history=history))
    assert_parity(second, *reference_run(chat, "And the colours?", [(question, answer)], tiles, [1, 1]), chat)
    # The whole first prompt (and any answer tokens that re-tokenise the same) came from the prefix cache.
    assert second.finish.usage.cached_prompt_tokens >= first.finish.usage.prompt_tokens


def test_missing_keys_fail_with_the_list(stub, keys):
    gone = [f"test:{uuid.uuid4().hex}:a", f"test:{uuid.uuid4().hex}:b"]
    parts = [text("<image> and <image> and <image>"), image(keys, "small"),
             llm_pb2.ContentPart(image=llm_pb2.ImageRef(key=gone[0], num_tiles=1)),
             llm_pb2.ContentPart(image=llm_pb2.ImageRef(key=gone[1], num_tiles=2))]
    with pytest.raises(grpc.RpcError) as failure:
        generate(stub, start(parts))
    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    detail = error_detail(failure.value)
    assert detail.code == common_pb2.ERROR_CODE_EMBEDDINGS_MISSING
    assert list(detail.missing_keys) == gone


@pytest.mark.parametrize(("parts", "code"), [
    # 200 tiles = 51,200 image tokens, beyond the 32,768-token context.
    ([llm_pb2.ContentPart(image=llm_pb2.ImageRef(key="k", num_tiles=200)), text("hi")],
     common_pb2.ERROR_CODE_CONTEXT_TOO_LONG),
    ([text("two placeholders <image><image>"), llm_pb2.ContentPart(image=llm_pb2.ImageRef(key="k", num_tiles=1))],
     common_pb2.ERROR_CODE_INVALID_ARGUMENT),
    ([text("sneaky <IMG_CONTEXT>")], common_pb2.ERROR_CODE_INVALID_ARGUMENT),
    ([], common_pb2.ERROR_CODE_INVALID_ARGUMENT),
], ids=["too-long", "placeholder-count", "reserved-token", "empty"])
def test_bad_requests_are_invalid_argument(stub, parts, code):
    with pytest.raises(grpc.RpcError) as failure:
        generate(stub, start(parts))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_detail(failure.value).code == code


def test_same_seed_same_sample(stub):
    sampled = {"temperature": 1.2, "top_p": 0.9, "top_k": 100, "repetition_penalty": 1.1}
    runs = [generate(stub, start([text("Pick a word.")], max_new=12, seed=seed, **sampled)).token_ids
            for seed in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def _metrics(server) -> dict[str, float]:
    values = {}
    for family in text_string_to_metric_families(server.metrics()):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def test_concurrent_streams_share_steps_and_match_solo(stub, server, keys):
    questions = [f"Question number {i}: " + "why? " * i for i in range(8)]
    starts = [start([text(q)], max_new=12) if i % 2 else
              start([image(keys, "small"), text(q)], max_new=12, temperature=0.9, seed=i)
              for i, q in enumerate(questions)]
    solo = [generate(stub, s).token_ids for s in starts]

    before = _metrics(server)
    together: list = [None] * len(starts)
    barrier = threading.Barrier(len(starts))

    def one(i):
        barrier.wait()
        together[i] = generate(stub, starts[i]).token_ids

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(starts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    after = _metrics(server)

    assert together == solo
    tokens = sum(len(ids) for ids in together)
    steps = after["internvl_llm_scheduler_steps_total"] - before["internvl_llm_scheduler_steps_total"]
    decode_forwards = (after["internvl_llm_decode_batch_size_count"]
                       - before["internvl_llm_decode_batch_size_count"])
    single = (after["internvl_llm_decode_batch_size_bucket{le=1.0}"]
              - before["internvl_llm_decode_batch_size_bucket{le=1.0}"])
    assert steps < tokens, "the streams did not share forward steps"
    assert single < decode_forwards, "no decode forward had more than one sequence"
    def generated(values: dict[str, float]) -> float:  # over the `model` label: one, the base's
        return sum(v for k, v in values.items() if k.startswith("internvl_llm_generated_tokens_total{model="))

    assert generated(after) - generated(before) == tokens
    assert after["internvl_llm_time_to_first_token_seconds_count"] > before[
        "internvl_llm_time_to_first_token_seconds_count"]
    assert after["internvl_llm_running_sequences"] == 0
    assert after["internvl_llm_prefix_cache_hits_total"] > 0
    assert after["internvl_llm_kv_cache_usage_bytes{pool=prefix}"] > 0
