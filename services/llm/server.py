"""`internvl-serve llm`: the LLMService gRPC servicer and the process around it.

The servicer is thin: it reads the stream's first message (and inline embeddings), translates it with
services.llm.wire, calls the core (services.llm.service) and translates its events back. Domain errors propagate to
the shared interceptor, which aborts the call with the mapped status.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from internvl.llm.v1 import llm_pb2, llm_pb2_grpc

from services.common.contract.errors import InvalidArgumentError, NotReadyError
from services.common.grpc_server import GrpcServer
from services.common.own_thread import in_own_thread
from services.llm import config as llm_config
from services.llm import wire
from services.llm.config import SERVICE_NAME, LLMConfig
from services.llm.metrics import LLMMetrics
from services.llm.service import LLMService

log = logging.getLogger(__name__)


class LLMServicer(llm_pb2_grpc.LLMServiceServicer):
    def __init__(self, service: LLMService | None = None):
        self.service = service

    def _ready(self) -> LLMService:
        if self.service is None:
            raise NotReadyError("the language model is still loading")
        return self.service

    async def Generate(self, request_iterator, context):
        service = self._ready()
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("message") != "start":
            async for _ in request_iterator:  # fail after the client's half-close, not into its sends
                pass
            raise InvalidArgumentError("the first message of Generate must carry `start`")
        request = wire.generate_request_from_pb(first.start)
        inline = None
        if request.inline_embeddings:
            limit = service.max_context_tokens * service.hidden_size * 4
            inline = await wire.read_inline_embeddings(request_iterator, limit)
        stream = await service.generate(request, inline, timeout=context.time_remaining())
        try:
            async for event in stream:
                yield wire.event_to_pb(event)
        finally:
            # The client cancelled, the deadline passed, or the stream ended: free the slot (no-op once finished).
            stream.cancel()

    async def GetModelInfo(self, request: llm_pb2.GetModelInfoRequest, context):
        return wire.model_info_to_pb(self._ready().model_info())


async def serve(config: LLMConfig) -> None:
    """Serves NOT_SERVING while the model loads and warms up, then SERVING until SIGTERM, then drains."""
    metrics = LLMMetrics()
    server = GrpcServer(config.server, [SERVICE_NAME], requests=metrics.requests)
    servicer = LLMServicer()
    server.add(llm_pb2_grpc.add_LLMServiceServicer_to_server, servicer)
    await server.start(registry=metrics.registry)
    try:
        service = await in_own_thread(LLMService.load, config, metrics)  # see services.common.own_thread
    except BaseException:
        await server.stop()
        raise
    await service.start()
    try:
        await service.warm_up()
        servicer.service = service
        await server.mark_ready()
        await server.serve_until_signalled()
        log.info("gRPC server stopped; closing the engine")
    finally:
        await service.close()
        log.info("LLM service closed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    llm_config.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    asyncio.run(serve(LLMConfig.from_args(args)))
    return 0
