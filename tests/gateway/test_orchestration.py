"""The gateway's orchestration through its real gRPC servicer, against fake vision and LLM services.

What the fakes let us check without a model: keys are looked up before any bytes are sent and only misses are
encoded; parts reach the LLM in order, by reference; a video's frames fan out over the vision replicas; evicted
embeddings are handed over inline and Generate retried; sessions continue by id; deadlines and cancellation reach the
services; bad input is refused with the right status, naming the part.
"""

from __future__ import annotations

import asyncio
import base64
import os

import grpc
import pytest
from helpers.chat import image_part, text_part
from helpers.fakes import FINGERPRINT, HIDDEN, TOKENS_PER_TILE, embedding_bytes, fake_stack
from helpers.media import png, write_video
from internvl.common.v1 import common_pb2
from internvl.gateway.v1 import gateway_pb2

from gateway.orchestrator import check_same_model
from services.contract.errors import (
    ERROR_BY_CODE,
    STATUS_BY_CODE,
    ErrorCode,
    ModelMismatchError,
    NotReadyError,
)
from services.contract.model_info import AdapterInfo, ModelInfo
from services.runtime.grpc_errors import error_detail

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

G = gateway_pb2


async def chat(stack, request: G.ChatRequest, timeout: float = 20):
    """(deltas, finish) of one Chat call."""
    deltas, finish = [], None
    async for response in stack.stub.Chat(request, timeout=timeout):
        if response.HasField("delta"):
            deltas.append(response.delta)
        else:
            finish = response.finish
    return deltas, finish


async def status_of(stack, request: G.ChatRequest) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await chat(stack, request)
    return info.value.code(), info.value.details()


async def refusal(stack, request: G.ChatRequest) -> tuple[grpc.StatusCode, str, int]:
    """(status, message, ErrorDetail code) of a refused request."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await chat(stack, request)
    return info.value.code(), info.value.details(), error_detail(info.value).code


async def test_one_image_is_looked_up_encoded_once_then_reused():
    async with fake_stack() as stack:
        request = G.ChatRequest(content=[image_part(png(900, 448)), text_part("What is this?")],
                                sampling=G.SamplingParams(top_logprobs=2))
        deltas, finish = await chat(stack, request)
        assert "".join(d.text for d in deltas) == "a b c"
        assert [t for d in deltas for t in d.token_ids] == [1, 2, 3]
        assert [lp.top[1].token_id for d in deltas for lp in d.logprobs] == [9, 9, 9]
        assert finish.reason == G.FINISH_REASON_STOP
        # 900x448 is a 2x1 grid plus the thumbnail.
        assert list(finish.usage.image_tiles) == [3]
        assert (finish.usage.encoded_tiles, finish.usage.reused_tiles) == (3, 0)
        assert stack.vision_calls("Lookup") == [1] and stack.vision_calls("Encode") == [1]

        start = stack.llm.starts[-1]
        kinds = [p.WhichOneof("part") for p in start.user_parts]
        assert kinds == ["image", "text"]
        assert start.user_parts[0].image.num_tiles == 3
        assert start.user_parts[0].image.key in stack.cache.tiles
        assert not start.inline_embeddings and not start.HasField("system_message")

        _, again = await chat(stack, request)
        assert (again.usage.encoded_tiles, again.usage.reused_tiles) == (0, 3)
        assert stack.vision_calls("Encode") == [1], "a cached image must not be sent to the vision service"
        assert stack.llm.starts[-1].user_parts[0].image.key == start.user_parts[0].image.key


async def test_explicit_placeholders_keep_part_order():
    async with fake_stack() as stack:
        request = G.ChatRequest(content=[text_part("Image-1: <image>\nImage-2: <image>\nCompare them."),
                                         image_part(png(100, 100)), image_part(png(100, 100, (0, 0, 255)))],
                                max_num=6)
        _, finish = await chat(stack, request)
        assert list(finish.usage.image_tiles) == [1, 1]
        start = stack.llm.starts[-1]
        assert [p.WhichOneof("part") for p in start.user_parts] == ["text", "image", "image"]
        assert start.user_parts[1].image.key != start.user_parts[2].image.key


@pytest.mark.parametrize(("content", "count"), [
    (["<image> and <image>", "img"], "2 <image> placeholder(s) but 1 images"),
    (["<image>", "img", "img", "img"], "1 <image> placeholder(s) but 3 images"),
])
async def test_placeholder_count_must_match_before_any_work(content, count):
    async with fake_stack() as stack:
        parts = [image_part(png(64, 64)) if c == "img" else text_part(c) for c in content]
        code, details = await status_of(stack, G.ChatRequest(content=parts))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and count in details
        assert stack.vision_calls("Lookup") == [] and stack.llm.starts == []


async def test_video_frames_fan_out_over_vision_replicas():
    async with fake_stack(vision_replicas=2, encode_items_per_call=1) as stack:
        video = G.VideoInput(data=write_video(frames=12, fps=6), num_segments=6)
        _, finish = await chat(stack, G.ChatRequest(content=[G.ContentPart(video=video), text_part("What happens?")]))
        assert list(finish.usage.image_tiles) == [1] * 6
        assert finish.usage.encoded_tiles == 6
        per_replica = [sum(n for m, n in v.calls if m == "Encode") for v in stack.visions]
        assert sum(per_replica) == 6 and all(n > 0 for n in per_replica), per_replica
        start = stack.llm.starts[-1]
        assert start.user_parts[0].WhichOneof("part") == "video"
        assert len(start.user_parts[0].video.frames) == 6


async def test_evicted_embeddings_are_handed_over_inline_and_generate_retried_once():
    async with fake_stack() as stack:
        evictions = []

        def evict_first_time(start):
            if not evictions:
                evictions.append(start.user_parts[0].image.key)
                stack.cache.tiles.pop(start.user_parts[0].image.key)

        stack.llm.before_read = evict_first_time
        _, finish = await chat(stack, G.ChatRequest(content=[image_part(png(300, 200)), text_part("Hi")]))
        assert finish.reason == G.FINISH_REASON_STOP and evictions
        assert len(stack.llm.starts) == 2 and stack.vision_calls("Encode") == [1]
        # The evicted image's rows came back from the vision service (encoded again: FetchEmbeddings with the image)
        # and went to the LLM inline; the retry sent nothing else.
        assert stack.vision_calls("FetchEmbeddings") == [1]
        assert stack.llm.starts[-1].inline_embeddings and list(stack.llm.inline[-1]) == evictions
        assert stack.llm.inline[-1][evictions[0]] == embedding_bytes(evictions[0], finish.usage.image_tiles[0])
        assert stack.metrics.missing_retries._value.get() == 1
        assert stack.metrics.embedding_bytes.labels("inline")._value.get() == len(stack.llm.inline[-1][evictions[0]])


async def test_a_cache_that_evicts_every_read_still_answers_one_retry_per_image():
    """The cache loses one more of the request's images before each read (as under heavy churn): each retry hands
    one more over inline, the others stay references, and the request is answered, not refused UNAVAILABLE."""
    async with fake_stack() as stack:
        images = [png(300 + i, 200) for i in range(3)]

        def evict_one(start):
            refs = [p.image.key for p in start.user_parts if p.HasField("image")]
            cached = [key for key in refs if key not in stack.llm.inline[-1] and key in stack.cache.tiles]
            if cached:
                stack.cache.tiles.pop(cached[0])

        stack.llm.before_read = evict_one
        _, finish = await chat(stack, G.ChatRequest(content=[*map(image_part, images), text_part("Hi")]))
        assert finish.reason == G.FINISH_REASON_STOP
        assert len(stack.llm.starts) == 4 and stack.metrics.missing_retries._value.get() == 3
        keys = [p.image.key for p in stack.llm.starts[-1].user_parts if p.HasField("image")]
        assert [sorted(sent) for sent in stack.llm.inline] == [[], sorted(keys[:1]), sorted(keys[:2]), sorted(keys)]
        # Each image encoded once by Encode, and each evicted one once more by its FetchEmbeddings.
        assert sum(stack.vision_calls("Encode")) == 3 and stack.vision_calls("FetchEmbeddings") == [1, 1, 1]


async def test_session_continues_by_reference_and_reports_reuse():
    async with fake_stack() as stack:
        _, first = await chat(stack, G.ChatRequest(content=[image_part(png(900, 448)), text_part("Describe it.")],
                                                   system_message="Be brief."))
        encodes = len(stack.vision_calls("Encode"))
        _, second = await chat(stack, G.ChatRequest(content=[text_part("And the colour?")], session_id=first.session_id))
        assert second.session_id == first.session_id
        assert len(stack.vision_calls("Encode")) == encodes, "the second round must encode nothing"
        assert (second.usage.encoded_tiles, second.usage.reused_tiles) == (0, 3)
        assert list(second.usage.image_tiles) == [3]
        assert second.usage.cached_prompt_tokens == 10  # the fake reports 10 per history turn

        start = stack.llm.starts[-1]
        assert start.system_message == "Be brief."
        assert len(start.history) == 1
        turn = start.history[0]
        assert [p.WhichOneof("part") for p in turn.user_parts] == ["image", "text"]
        assert turn.assistant_text == "a b c"
        assert [p.text for p in start.user_parts] == ["And the colour?"]

        # The session's image was evicted: it cannot be re-encoded (no pixels are kept), say so.
        stack.cache.tiles.clear()
        code, details = await status_of(stack, G.ChatRequest(content=[text_part("Again?")], session_id=first.session_id))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "earlier rounds" in details

        code, details, detail = await refusal(stack, G.ChatRequest(content=[text_part("?")], session_id="no-such-session"))
        assert code == grpc.StatusCode.NOT_FOUND and "no-such-session" in details
        assert detail == common_pb2.ERROR_CODE_SESSION_NOT_FOUND
        code, _ = await status_of(stack, G.ChatRequest(content=[text_part("?")], session_id="bad id!"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_session_answers_one_round_at_a_time():
    async with fake_stack() as stack:
        _, first = await chat(stack, G.ChatRequest(content=[text_part("Hello")]))
        stack.llm.block = True
        running = asyncio.ensure_future(chat(stack, G.ChatRequest(content=[text_part("1")], session_id=first.session_id)))
        await asyncio.wait_for(stack.llm.blocked.wait(), 10)
        code, details, detail = await refusal(stack, G.ChatRequest(content=[text_part("2")], session_id=first.session_id))
        assert code == grpc.StatusCode.ABORTED and "another round" in details
        assert detail == common_pb2.ERROR_CODE_SESSION_BUSY  # the detail names the same condition as the status
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_caller_deadline_reaches_both_services():
    async with fake_stack() as stack:
        await chat(stack, G.ChatRequest(content=[image_part(png(64, 64)), text_part("Hi")]), timeout=5)
        # Without propagation they would see the gateway's own default (600 s); allow for clock granularity.
        vision_left = [t for v in stack.visions for t in v.time_remaining]
        assert vision_left and all(t is not None and t < 5.5 for t in vision_left)
        assert stack.llm.time_remaining[-1] is not None and stack.llm.time_remaining[-1] < 5.5


async def test_cancelling_the_call_cancels_generation():
    async with fake_stack() as stack:
        stack.llm.block = True
        call = stack.stub.Chat(G.ChatRequest(content=[text_part("Tell me a long story")]))
        reading = asyncio.ensure_future(call.read())
        await asyncio.wait_for(stack.llm.blocked.wait(), 10)
        call.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        await asyncio.wait_for(stack.llm.cancelled.wait(), 10)
        for _ in range(50):  # the gateway records the cancelled request once its handler unwinds
            if stack.metrics.requests.total.labels("Chat", "CANCELLED")._value.get() == 1:
                break
            await asyncio.sleep(0.05)
        assert stack.metrics.requests.total.labels("Chat", "CANCELLED")._value.get() == 1
        assert stack.metrics.requests.in_flight.labels("Chat")._value.get() == 0


async def test_combined_mode_sends_concatenated_embeddings_inline():
    async with fake_stack() as stack:
        a, b = png(900, 448), png(100, 100, (0, 255, 0))
        request = G.ChatRequest(content=[image_part(a), image_part(b), text_part("Describe the two images.")],
                                multi_image_mode=G.MULTI_IMAGE_MODE_COMBINED)
        _, finish = await chat(stack, request)
        assert list(finish.usage.image_tiles) == [3, 1]
        start = stack.llm.starts[-1]
        assert start.inline_embeddings
        assert [p.WhichOneof("part") for p in start.user_parts] == ["image", "text"]
        combined = start.user_parts[0].image
        assert combined.num_tiles == 4
        # In request order (a: 3 tiles, then b: 1), whichever of the two Encodes finished first.
        leaves = sorted(stack.cache.tiles, key=stack.cache.tiles.get, reverse=True)
        sent = stack.llm.inline[-1]
        assert list(sent) == [combined.key]
        assert sent[combined.key] == b"".join(embedding_bytes(k, stack.cache.tiles[k]) for k in leaves)
        assert len(sent[combined.key]) == 4 * TOKENS_PER_TILE * HIDDEN * 4
        assert stack.metrics.embedding_bytes.labels("inline")._value.get() == len(sent[combined.key])


async def test_batch_chat_answers_in_order():
    async with fake_stack() as stack:
        requests = [G.ChatRequest(content=[image_part(png(64 + i, 64)), text_part(f"Q{i}")]) for i in range(3)]
        requests.append(G.ChatRequest(content=[text_part("text only")]))
        reply = await stack.stub.BatchChat(G.BatchChatRequest(requests=requests), timeout=20)
        assert [r.text for r in reply.results] == ["a b c"] * 4
        assert [list(r.usage.image_tiles) for r in reply.results] == [[1], [1], [1], []]
        assert len({r.session_id for r in reply.results}) == 4

        requests[2] = G.ChatRequest(content=[image_part(b"not an image"), text_part("?")])
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stack.stub.BatchChat(G.BatchChatRequest(requests=requests), timeout=20)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "requests[2]" in info.value.details() and "content[0] (image)" in info.value.details()


async def test_model_mismatch_is_refused():
    async with fake_stack(llm_fingerprint="0123456789abcdef", connect=False) as stack:
        with pytest.raises(ModelMismatchError, match=FINGERPRINT):
            await stack.orchestrator.connect(timeout=10)


async def test_pools_serving_other_adapters_are_refused():
    base = ModelInfo("feedfacefeedface", "fake", 64, "float32", 256, 448)
    latex = AdapterInfo("latex", "0011223344556677", False, 8)
    check_same_model(ModelInfo(**{**base.__dict__, "adapters": (latex,)}),
                     ModelInfo(**{**base.__dict__, "adapters": (latex,)}))
    other = AdapterInfo("latex", "8899aabbccddeeff", False, 8)  # same name, other weights
    for llm_adapters in ((), (other,)):
        with pytest.raises(ModelMismatchError, match=r"vision service serves LoRA adapters latex \(0011223344556677\)"
                                                      r" but the LLM service serves .*same --lora flags"):
            check_same_model(ModelInfo(**{**base.__dict__, "adapters": (latex,)}),
                             ModelInfo(**{**base.__dict__, "adapters": llm_adapters}))


async def test_the_model_field_names_the_base_or_is_not_found():
    async with fake_stack() as stack:
        replies = [r async for r in stack.stub.Chat(G.ChatRequest(content=[text_part("hi")], model="fake"), timeout=20)]
        assert replies[-1].HasField("finish")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stack.stub.Chat(G.ChatRequest(content=[image_part(png(64, 64)), text_part("hi")],
                                                         model="nope"), timeout=20):
                pass
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "model 'nope' is not served; GET /v1/models (or ListModels) lists them" in info.value.details()
        assert stack.vision_calls("Encode") == [], "an unknown model must be refused before any work"
        listed = await stack.stub.ListModels(G.ListModelsRequest(), timeout=5)
        assert [(m.id, m.parent) for m in listed.models] == [("fake", "")]


# ------------------------------------------------------------------------------------------------ bad input


async def test_media_paths_only_inside_the_media_root(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    (root / "cat.png").write_bytes(png(64, 64))
    (tmp_path / "secret.png").write_bytes(png(64, 64))
    os.symlink(tmp_path / "secret.png", root / "link.png")
    async with fake_stack(media_root=str(root)) as stack:
        for path in ("cat.png", str(root / "cat.png")):
            _, finish = await chat(stack, G.ChatRequest(content=[image_part(path=path), text_part("?")]))
            assert list(finish.usage.image_tiles) == [1]
        for path in (str(tmp_path / "secret.png"), "../secret.png", "link.png", "/etc/passwd"):
            code, details = await status_of(stack, G.ChatRequest(content=[image_part(path=path), text_part("?")]))
            assert code == grpc.StatusCode.PERMISSION_DENIED, (path, details)
            assert "content[0] (image)" in details and "outside the gateway's media root" in details
        code, details = await status_of(stack, G.ChatRequest(content=[image_part(path="missing.png")]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "no such file" in details
    async with fake_stack() as stack:
        code, details, detail = await refusal(stack, G.ChatRequest(content=[image_part(path="cat.png")]))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "no --media-root" in details
        assert detail == common_pb2.ERROR_CODE_MEDIA_ACCESS_DENIED


BAD_INPUTS = [
    ("empty content", G.ChatRequest(), "content is empty"),
    ("empty part", G.ChatRequest(content=[text_part("?"), G.ContentPart()]), "content[1] is empty"),
    ("no image source", G.ChatRequest(content=[G.ContentPart(image=G.ImageInput())]),
     "content[0] (image) has no source"),
    ("not an image", G.ChatRequest(content=[text_part("?"), image_part(b"hello")]), "content[1] (image): cannot decode"),
    ("empty image", G.ChatRequest(content=[image_part(b"")]), "content[0] (image): the media is empty"),
    ("remote url", G.ChatRequest(content=[image_part(url="https://example.com/cat.png")]), "not fetched"),
    ("plain data url", G.ChatRequest(content=[image_part(url="data:image/png,abc")]), "must be base64"),
    ("bad base64", G.ChatRequest(content=[image_part(url="data:image/png;base64,***")]), "not valid base64"),
    ("max_num 0", G.ChatRequest(content=[text_part("?")], max_num=0), "max_num must be between 1 and 40"),
    ("video max_num", G.ChatRequest(content=[G.ContentPart(video=G.VideoInput(data=b"x", max_num=99))]),
     "content[0] (video): max_num"),
    ("not a video", G.ChatRequest(content=[G.ContentPart(video=G.VideoInput(data=b"garbage" * 20))]),
     "content[0] (video): cannot decode the video"),
    ("too many segments", G.ChatRequest(content=[G.ContentPart(video=G.VideoInput(data=b"v", num_segments=500))]),
     "num_segments must be between 1 and 64"),
    ("reserved markup", G.ChatRequest(content=[text_part("<IMG_CONTEXT>")]), "only the server writes"),
    ("history image", G.ChatRequest(content=[text_part("?")], history=[G.Turn(user_content=[image_part(b"zz")])]),
     "history[0].user_content[0] (image)"),
]


@pytest.mark.parametrize(("request_pb", "message"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
async def test_bad_input_is_invalid_argument_naming_the_part(request_pb, message):
    async with fake_stack() as stack:
        code, details = await status_of(stack, request_pb)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert message in details
        assert stack.llm.starts == []


async def test_vision_media_errors_name_the_part():
    broken = png(64, 64) + b"BROKEN"  # the header probes fine; the fake vision service refuses it
    async with fake_stack() as stack:
        code, details = await status_of(stack, G.ChatRequest(content=[image_part(png(80, 80)), image_part(broken)]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith("content[1] (image): cannot decode image"), details


async def test_data_url_image_and_metrics():
    async with fake_stack() as stack:
        url = "data:image/png;base64," + base64.b64encode(png(64, 64)).decode()
        _, finish = await chat(stack, G.ChatRequest(content=[image_part(url=url), text_part("?")]))
        assert list(finish.usage.image_tiles) == [1]
        m = stack.metrics
        # Counted when the server's stream has closed, a moment after the client has its last message.
        for _ in range(100):
            if m.requests.total.labels("Chat", "OK")._value.get():
                break
            await asyncio.sleep(0.01)
        assert m.requests.total.labels("Chat", "OK")._value.get() == 1
        assert m.generated_tokens.labels("Chat")._value.get() == 3
        assert m.tiles_encoded._value.get() == 1 and m.tiles_reused._value.get() == 0
        assert m.embedding_bytes.labels("reference")._value.get() == TOKENS_PER_TILE * HIDDEN * 4
        assert m.media_bytes_sent.labels("image")._value.get() == len(png(64, 64))
        assert m.time_to_first_token.labels("Chat")._sum.get() > 0
        await status_of(stack, G.ChatRequest())
        assert m.requests.total.labels("Chat", "INVALID_ARGUMENT")._value.get() == 1


class _LoadingBackend:
    """A peer whose GetModelInfo answers UNAVAILABLE (NotReadyError) until it has been asked `ready_after` times."""

    def __init__(self, identity, ready_after: int):
        self.identity, self.ready_after, self.calls = identity, ready_after, 0

    async def model_info(self, timeout=None, wait_for_ready=False):
        self.calls += 1
        if self.calls <= self.ready_after:
            raise NotReadyError("the service is unavailable, retry later")
        return self.identity


async def test_connect_waits_for_peers_that_are_still_loading():
    from gateway.config import GatewayConfig
    from gateway.orchestrator import Orchestrator
    from gateway.sessions import MemorySessionStore
    from services.contract.model_info import ModelInfo

    identity = ModelInfo(fingerprint="f" * 16, model_name="tiny", llm_hidden_size=64, dtype="float32",
                         tokens_per_tile=256, image_size=448)
    vision, llm = _LoadingBackend(identity, 0), _LoadingBackend(identity, 3)
    config = GatewayConfig(vision_target="dns:///v:1", llm_target="dns:///l:1")
    orchestrator = Orchestrator(config, vision, llm, MemorySessionStore(60))

    assert await orchestrator.connect(timeout=10, retry_interval_s=0.01) == identity
    assert llm.calls == 4
    never = _LoadingBackend(identity, 10**6)
    with pytest.raises(NotReadyError):
        await Orchestrator(config, vision, never, MemorySessionStore(60)).connect(timeout=0.05, retry_interval_s=0.01)


async def test_no_ready_llm_replica_is_unavailable_at_once_not_a_hang():
    async with fake_stack() as stack:
        await stack.servers[-1].stop()
        loop = asyncio.get_running_loop()
        started = loop.time()
        code, details = await status_of(stack, G.ChatRequest(content=[text_part("Hello")]))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert "no LLM replica ready" in details, details
        assert loop.time() - started < 5


async def test_detail_low_is_one_tile_without_a_thumbnail():
    async with fake_stack() as stack:
        data = png(900, 448)  # a 2x1 grid plus the thumbnail at any max_num >= 2
        request = G.ChatRequest(content=[
            G.ContentPart(image=G.ImageInput(data=data, detail=G.IMAGE_DETAIL_LOW)),
            G.ContentPart(image=G.ImageInput(data=data, detail=G.IMAGE_DETAIL_HIGH)),
            image_part(data), text_part("Compare.")], max_num=6)
        _, finish = await chat(stack, request)
        assert list(finish.usage.image_tiles) == [1, 3, 3]
        # The low-detail image is its own cache entry (one tile); the other two share one.
        refs = [p.image for p in stack.llm.starts[-1].user_parts if p.HasField("image")]
        assert refs[0].key != refs[1].key == refs[2].key


async def test_n_answers_are_streamed_with_their_index_and_batch_chat_refuses_them():
    async with fake_stack() as stack:
        deltas, finishes = [], []
        async for response in stack.stub.Chat(G.ChatRequest(content=[text_part("Hi")], sampling=G.SamplingParams(n=2)),
                                              timeout=20):
            if response.HasField("delta"):
                deltas.append(response.delta)
            else:
                finishes.append(response.finish)
        assert ["".join(d.text for d in deltas if d.index == i) for i in (0, 1)] == ["a b c", "a b c 1"]
        assert sorted(f.index for f in finishes) == [0, 1]
        assert {f.usage.completion_tokens for f in finishes} == {3} and {f.session_id for f in finishes} != {""}
        assert len({f.session_id for f in finishes}) == 1

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stack.stub.BatchChat(G.BatchChatRequest(requests=[
                G.ChatRequest(content=[text_part("a")]), G.ChatRequest(content=[text_part("b")], sampling=G.SamplingParams(n=2))]))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "requests[1]: BatchChat gives one answer per request" in info.value.details()


async def test_a_remote_image_is_fetched_by_the_allowlist_and_shares_the_cache_with_its_bytes():
    from aiohttp import web

    data = png(900, 448)
    async def cat(request: web.Request) -> web.Response:
        return web.Response(body=data, content_type="image/png")

    app = web.Application()
    app.router.add_get("/cat.png", cat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        # The guard is lifted for the loopback test server only by its flag.
        async with fake_stack(allowed_media_domains=("127.0.0.1",), allow_private_media_addresses=True) as stack:
            by_url = G.ChatRequest(content=[image_part(url=f"http://127.0.0.1:{port}/cat.png"), text_part("What?")])
            deltas, finish = await chat(stack, by_url)
            assert "".join(d.text for d in deltas) == "a b c" and list(finish.usage.image_tiles) == [3]
            key = stack.llm.starts[-1].user_parts[0].image.key
            _, again = await chat(stack, G.ChatRequest(content=[image_part(data), text_part("What?")]))
            assert stack.llm.starts[-1].user_parts[0].image.key == key
            assert (again.usage.encoded_tiles, again.usage.reused_tiles) == (0, 3)
            assert stack.vision_calls("Encode") == [1]
        async with fake_stack(allowed_media_domains=("media.example.com",)) as stack:
            code, details, _ = await refusal(stack, G.ChatRequest(content=[
                text_part("What?"), image_part(url=f"http://127.0.0.1:{port}/cat.png")]))
            assert code == grpc.StatusCode.PERMISSION_DENIED
            assert details.startswith("content[1] (image): host '127.0.0.1' is not in the gateway's "
                                      "--allowed-media-domains")
            assert stack.vision_calls("Lookup") == []
    finally:
        await runner.cleanup()


def _raised(code: ErrorCode) -> Exception:
    """An error of `code` as a service raises it."""
    if code == ErrorCode.EMBEDDINGS_MISSING:
        return ERROR_BY_CODE[code](["ns:emb:v1:not-from-this-request"])
    return ERROR_BY_CODE[code](f"raised with {code.name}", item_index=0)


@pytest.mark.parametrize("code", list(ErrorCode), ids=lambda c: c.name)
async def test_every_code_a_service_raises_reaches_the_caller_with_its_own_code(code):
    """A service's error decodes through the one table back into its own error, so the gateway's caller sees the
    same code (and its status) whichever service raised it: the LLM service below, the vision service when it
    encodes."""
    async with fake_stack(vision_replicas=1) as stack:
        def fail(start):
            raise _raised(code)

        stack.llm.before_read = fail
        status, _, detail_code = await refusal(stack, G.ChatRequest(content=[text_part("Hello")]))
        assert (status.name, detail_code) == (STATUS_BY_CODE[code].name, code)
        stack.visions[0].fail_encode = _raised(code)
        status, _, detail_code = await refusal(stack, G.ChatRequest(content=[image_part(png(32, 32)),
                                                                            text_part("What is it?")]))
        assert (status.name, detail_code) == (STATUS_BY_CODE[code].name, code)
