"""The checked-in protobuf stubs match the .proto files, and the `internvl` package imports."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_up_to_date():
    result = subprocess.run(
        [sys.executable, str(REPO / "protos" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr + result.stdout


def test_stubs_import_and_build_messages():
    from internvl.common.v1 import common_pb2
    from internvl.llm.v1 import llm_pb2, llm_pb2_grpc
    from internvl.vision.v1 import vision_pb2, vision_pb2_grpc

    assert hasattr(vision_pb2_grpc, "VisionServiceStub")
    assert hasattr(llm_pb2_grpc, "LLMServiceServicer")

    request = vision_pb2.EncodeRequest(
        items=[vision_pb2.EncodeItem(frame=vision_pb2.RawFrame(rgb=b"\0" * 12, height=2, width=2))],
        options=common_pb2.PreprocessOptions(max_num=6),
    )
    parsed = vision_pb2.EncodeRequest.FromString(request.SerializeToString())
    assert parsed.items[0].WhichOneof("media") == "frame"
    assert parsed.options.HasField("max_num") and not parsed.options.HasField("use_thumbnail")

    start = llm_pb2.GenerateStart(
        user_parts=[
            llm_pb2.ContentPart(image=llm_pb2.ImageRef(key="k", num_tiles=7)),
            llm_pb2.ContentPart(text="Describe the image."),
        ],
    )
    assert not start.HasField("system_message")
    assert not start.sampling.HasField("seed")
    assert start.sampling.temperature == 0.0  # greedy by default


def test_enums_start_with_unspecified():
    from internvl.common.v1 import common_pb2

    for enum in (common_pb2.DType, common_pb2.ErrorCode, common_pb2.FinishReason):
        zero = enum.DESCRIPTOR.values_by_number[0].name
        assert zero.endswith("_UNSPECIFIED"), zero


# Messages serialized by the stubs of before SamplingParams, FinishReason and Usage moved into the common package
# (each then defined twice, in gateway.proto and llm.proto): every field set, so a renumbered field would show.
OLD_CHAT_REQUEST = bytes.fromhex("0a040a02686932380807150000003f1d6666663f20032dcdcc8c3f320178320179382a40024d0000803e55000000"
                                 "bf5a070805150000c03f60026a041a02612b")
OLD_CHAT_FINISH = bytes.fromhex("12170802120e080a1003180422020701280530031a01732001")
OLD_GENERATE_START = bytes.fromhex("0a401a040a02686922380807150000003f1d6666663f20032dcdcc8c3f320178320179382a40024d00"
                                   "00803e55000000bf5a070805150000c03f60026a041a02612b")
OLD_GENERATE_FINISH = bytes.fromhex("120c08031206080a100318041801")


def _sampling_fields(message) -> dict:
    return {"max_new_tokens": message.max_new_tokens, "temperature": round(message.temperature, 6),
            "top_p": round(message.top_p, 6), "top_k": message.top_k,
            "repetition_penalty": round(message.repetition_penalty, 6), "stop_strings": list(message.stop_strings),
            "seed": message.seed, "top_logprobs": message.top_logprobs, "presence_penalty": message.presence_penalty,
            "frequency_penalty": message.frequency_penalty, "logit_bias": dict(message.logit_bias), "n": message.n,
            "regex": message.constraint.regex}


SAMPLING = {"max_new_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 3, "repetition_penalty": 1.1,
            "stop_strings": ["x", "y"], "seed": 42, "top_logprobs": 2, "presence_penalty": 0.25,
            "frequency_penalty": -0.5, "logit_bias": {5: 1.5}, "n": 2, "regex": "a+"}


def test_the_wire_is_unchanged_by_the_shared_messages():
    from internvl.gateway.v1 import gateway_pb2
    from internvl.llm.v1 import llm_pb2

    request = gateway_pb2.ChatRequest.FromString(OLD_CHAT_REQUEST)
    assert _sampling_fields(request.sampling) == SAMPLING
    start = llm_pb2.GenerateRequest.FromString(OLD_GENERATE_START).start
    assert _sampling_fields(start.sampling) == SAMPLING
    finish = gateway_pb2.ChatResponse.FromString(OLD_CHAT_FINISH).finish
    assert (finish.reason, finish.session_id, finish.index) == (gateway_pb2.FINISH_REASON_LENGTH, "s", 1)
    usage = finish.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_prompt_tokens, list(usage.image_tiles),
            usage.encoded_tiles, usage.reused_tiles) == (10, 3, 4, [7, 1], 5, 3)
    generate_finish = llm_pb2.GenerateResponse.FromString(OLD_GENERATE_FINISH).finish
    assert generate_finish.reason == gateway_pb2.FINISH_REASON_CANCELLED
    assert (generate_finish.usage.prompt_tokens, generate_finish.usage.cached_prompt_tokens) == (10, 4)
    # And the other way: today's messages are byte for byte what the old stubs wrote.
    for message, old in ((request, OLD_CHAT_REQUEST), (gateway_pb2.ChatResponse(finish=finish), OLD_CHAT_FINISH),
                         (llm_pb2.GenerateRequest(start=start), OLD_GENERATE_START),
                         (llm_pb2.GenerateResponse(finish=generate_finish), OLD_GENERATE_FINISH)):
        assert message.SerializeToString(deterministic=True) == old


def test_the_shared_messages_keep_their_public_names():
    """A caller's code naming the public package's types (`gateway_pb2.SamplingParams`) keeps working: the gateway's
    proto imports the common one publicly, so its module re-exports the shared types and enum values."""
    from internvl.common.v1 import common_pb2
    from internvl.gateway.v1 import gateway_pb2

    assert gateway_pb2.SamplingParams is common_pb2.SamplingParams
    assert gateway_pb2.Usage is common_pb2.Usage
    assert gateway_pb2.FinishReason.Name(gateway_pb2.FINISH_REASON_STOP) == "FINISH_REASON_STOP"
    assert gateway_pb2.ChatRequest(sampling=gateway_pb2.SamplingParams(n=2)).sampling.n == 2
