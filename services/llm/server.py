"""`internvl-serve llm`: the LLMService gRPC servicer and the process around it.

The servicer is thin: it reads the stream's first message (and inline embeddings) into the contract's
`GenerateRequest`, calls the core (services.llm.service) and sends its events back, each in its own wire form.
Domain errors propagate to the shared interceptor, which aborts the call with the mapped status.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from internvl.llm.v1 import llm_pb2, llm_pb2_grpc

from services.contract.conversation import GenerateRequest
from services.contract.errors import InvalidArgumentError, NotReadyError
from services.contract.service_names import LLM_SERVICE
from services.llm import config as llm_config
from services.llm.config import LLMConfig
from services.llm.engine.events import Finish
from services.llm.inline_embeddings import read_inline_embeddings
from services.llm.metrics import LLMMetrics
from services.llm.service import LLMService
from services.runtime import request_ids, tracing
from services.runtime.grpc_server import GrpcServer
from services.runtime.own_thread import in_own_thread

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
        request = GenerateRequest.from_pb(first.start)
        request_ids.adopt(request.request_id, context.invocation_metadata())
        inline = None
        if request.inline_embeddings:
            limit = service.max_context_tokens * service.hidden_size * 4
            inline = await read_inline_embeddings(request_iterator, limit)
        stream = await service.generate(request, inline, timeout=context.time_remaining())
        finishes: list[Finish] = []
        try:
            async for event in stream:
                if isinstance(event, Finish):
                    finishes.append(event)
                    yield llm_pb2.GenerateResponse(finish=event.to_pb())
                else:
                    yield llm_pb2.GenerateResponse(delta=event.to_pb())
        finally:
            # The client cancelled, the deadline passed, or the stream ended: free the slot (no-op once finished).
            stream.cancel()
        record_generation(finishes)

    async def GetModelInfo(self, request: llm_pb2.GetModelInfoRequest, context):
        return llm_pb2.GetModelInfoResponse(model_info=self._ready().model_info().to_pb())


def record_generation(finishes: list[Finish]) -> None:
    """The phases of a finished request on its span: queue wait, prefill (to the first token) and each answer's
    decode as child spans, and their figures as attributes (the `gen_ai` names, vLLM's latency attributes)."""
    if not tracing.enabled() or not finishes or finishes[0].timing is None:
        return
    first = min(finishes, key=lambda f: f.index)
    timing, usage = first.timing, first.usage
    attributes = {
        "gen_ai.usage.input_tokens": usage.prompt_tokens,
        "gen_ai.usage.output_tokens": sum(f.usage.completion_tokens for f in finishes),
        "gen_ai.response.finish_reasons": [f.reason.value for f in finishes],
        "internvl.cached_prompt_tokens": usage.cached_prompt_tokens,
        "gen_ai.latency.e2e": max(f.timing.finished for f in finishes) - timing.arrival,
    }
    if timing.admitted is not None:
        attributes["gen_ai.latency.time_in_queue"] = timing.admitted - timing.arrival
        tracing.record_span("llm.queue", timing.arrival, timing.admitted)
    if timing.first_token is not None:
        attributes["gen_ai.latency.time_to_first_token"] = timing.first_token - timing.arrival
        if timing.admitted is not None:
            attributes["gen_ai.latency.time_in_model_prefill"] = timing.first_token - timing.admitted
            tracing.record_span("llm.prefill", timing.admitted, timing.first_token, {
                "gen_ai.usage.input_tokens": usage.prompt_tokens,
                "internvl.cached_prompt_tokens": usage.cached_prompt_tokens})
    for finish in finishes:
        if finish.timing.first_token is not None:
            tracing.record_span("llm.decode", finish.timing.first_token, finish.timing.finished, {
                "internvl.answer": finish.index, "gen_ai.usage.output_tokens": finish.usage.completion_tokens,
                "gen_ai.response.finish_reasons": [finish.reason.value]})
    tracing.set_attributes(attributes)


async def serve(config: LLMConfig) -> None:
    """Serves NOT_SERVING while the model loads and warms up, then SERVING until SIGTERM, then drains; NOT_SERVING
    again while the engine cannot take requests after a fault (it restarts: services.llm.engine.api `readiness`)."""
    metrics = LLMMetrics()
    server = GrpcServer(config.server, [LLM_SERVICE], requests=metrics.requests)
    servicer = LLMServicer()
    server.add(llm_pb2_grpc.add_LLMServiceServicer_to_server, servicer)
    await server.start(registry=metrics.registry)
    server.report_ports()
    try:
        service = await in_own_thread(LLMService.load, config, metrics)  # see services.runtime.own_thread
    except BaseException:
        await server.stop()
        raise
    await service.start()
    try:
        await service.warm_up()
        servicer.service = service
        await server.mark_ready()
        service.engine.readiness = ReadinessFollower(server)
        await server.serve_until_signalled()
        log.info("gRPC server stopped; closing the engine")
    finally:
        await service.close()
        log.info("LLM service closed")


class ReadinessFollower:
    """The engine's readiness listener (services.llm.engine.api `Engine.readiness`): the server's readiness on
    grpc.health.v1 follows the engine's, each change applied after the one before it."""

    def __init__(self, server: GrpcServer):
        self.server = server
        self._last: asyncio.Future | None = None

    def __call__(self, ready: bool) -> None:
        previous = self._last

        async def apply() -> None:
            if previous is not None:
                await previous
            await (self.server.mark_ready() if ready else self.server.mark_not_ready())

        self._last = asyncio.ensure_future(apply())

    async def settled(self) -> None:
        """Returns once every change told so far is applied."""
        if self._last is not None:
            await self._last


def add_arguments(parser: argparse.ArgumentParser) -> None:
    llm_config.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    config = LLMConfig.from_args(args)
    with tracing.traced_process("llm", config.server.otlp_endpoint):
        asyncio.run(serve(config))
    return 0
