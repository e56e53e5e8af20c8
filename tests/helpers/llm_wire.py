"""The LLM service's wire in process: its servicer on port 0, Generate's first message, and embeddings sent inline."""

from __future__ import annotations

import contextlib

import grpc
import torch
from internvl.common.v1 import common_pb2
from internvl.llm.v1 import llm_pb2, llm_pb2_grpc

from gateway.backends import Embeddings
from gateway.clients import embedding_messages as gateway_embedding_messages
from services.contract.dtypes import DTYPE_TO_PB
from services.contract.service_names import LLM_SERVICE
from services.llm.server import LLMServicer
from services.runtime.embedding_store import tensor_to_bytes
from services.runtime.grpc_server import GrpcServer, ServerOptions, channel_options
from services.runtime.request_metrics import RequestMetrics


def embedding_messages(key: str, tensor: torch.Tensor, chunk_bytes: int = 1 << 20) -> list[llm_pb2.GenerateRequest]:
    """`tensor` sent inline exactly as the gateway sends embeddings."""
    dtype, shape, data = tensor_to_bytes(tensor)
    return gateway_embedding_messages(key, Embeddings(DTYPE_TO_PB[dtype], tuple(shape), data), chunk_bytes)


@contextlib.asynccontextmanager
async def serving(service):
    """An LLMServiceStub of `service` behind its servicer on a port of its own, ready."""
    server = GrpcServer(ServerOptions(port=0, host="127.0.0.1"), [LLM_SERVICE], requests=RequestMetrics("llm_"))
    server.add(llm_pb2_grpc.add_LLMServiceServicer_to_server, LLMServicer(service))
    port = await server.start()
    await server.mark_ready()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=channel_options()) as channel:
            yield llm_pb2_grpc.LLMServiceStub(channel)
    finally:
        await server.server.stop(0)


def start_message(*parts, inline=False, **sampling) -> llm_pb2.GenerateRequest:
    """Generate's first message: `parts`, embeddings inline or not, `sampling` (6 new tokens unless given)."""
    sampling.setdefault("max_new_tokens", 6)
    return llm_pb2.GenerateRequest(start=llm_pb2.GenerateStart(
        user_parts=list(parts), inline_embeddings=inline, sampling=common_pb2.SamplingParams(**sampling)))
