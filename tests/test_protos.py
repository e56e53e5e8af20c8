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
    from internvl.llm.v1 import llm_pb2

    for enum in (common_pb2.DType, common_pb2.ErrorCode, llm_pb2.FinishReason):
        zero = enum.DESCRIPTOR.values_by_number[0].name
        assert zero.endswith("_UNSPECIFIED"), zero
