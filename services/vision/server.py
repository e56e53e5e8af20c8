"""`internvl-serve vision`: the gRPC face of the vision service.

The servicer wraps the core (``services.vision.service``): the contract's types read and write their own messages
(``from_pb`` / ``to_pb``), and errors are domain exceptions that the shared interceptor maps to statuses. Start-up
order: the server binds first and answers health checks (NOT_SERVING) while the model loads; readiness flips to SERVING
only once the model is loaded and a warm-up tile has gone through the encoder. SIGTERM drains, then the
model and the cache connection are released.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import AsyncIterator

from internvl.vision.v1 import vision_pb2, vision_pb2_grpc

from services.contract.dtypes import DTYPE_TO_PB
from services.contract.encoding import MediaItem, PreprocessOptions
from services.contract.errors import NotReadyError
from services.contract.service_names import VISION_SERVICE
from services.runtime import tracing
from services.runtime.grpc_server import GrpcServer
from services.runtime.tensor_wire import tensor_chunks
from services.vision import config as vision_config
from services.vision.config import VisionConfig
from services.vision.metrics import VisionMetrics
from services.vision.service import VisionService

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- servicer


class VisionServicer(vision_pb2_grpc.VisionServiceServicer):
    """Thin translation between the wire and ``VisionService``. Answers UNAVAILABLE until a service is attached.

    Request metrics and error statuses are the shared interceptors' (services.runtime.grpc_server).
    """

    def __init__(self, service: VisionService | None = None) -> None:
        self.service = service

    def _ready(self) -> VisionService:
        if self.service is None:
            raise NotReadyError("the vision model is still loading")
        return self.service

    async def Encode(self, request: vision_pb2.EncodeRequest, context) -> vision_pb2.EncodeResponse:
        results = await self._ready().encode([MediaItem.from_pb(i) for i in request.items],
                                             PreprocessOptions.from_pb(request.options), request.adapter,
                                             request.key_salt)
        tracing.set_attributes({"internvl.items": len(results), "internvl.tiles": sum(r.num_tiles for r in results),
                                "internvl.cache_hits": sum(r.cache_hit for r in results)})
        return vision_pb2.EncodeResponse(items=[r.to_pb() for r in results])

    async def Lookup(self, request: vision_pb2.LookupRequest, context) -> vision_pb2.LookupResponse:
        exists = await self._ready().lookup(list(request.keys))
        tracing.set_attributes({"internvl.keys": len(exists), "internvl.cache_hits": sum(exists)})
        return vision_pb2.LookupResponse(exists=exists)

    async def FetchEmbeddings(self, request: vision_pb2.FetchEmbeddingsRequest,
                              context) -> AsyncIterator[vision_pb2.FetchEmbeddingsResponse]:
        service = self._ready()
        chunk_bytes = service.config.chunk_bytes(request.max_chunk_bytes)
        if request.HasField("item"):
            embeddings = await service.fetch_or_encode(request.key, MediaItem.from_pb(request.item),
                                                       PreprocessOptions.from_pb(request.options), request.adapter,
                                                       request.key_salt)
        else:
            embeddings = await service.fetch(request.key)
        tracing.set_attributes({"internvl.bytes": embeddings.nbytes})
        for chunk in tensor_chunks(DTYPE_TO_PB[embeddings.dtype], embeddings.shape, embeddings.data, chunk_bytes):
            yield vision_pb2.FetchEmbeddingsResponse(chunk=chunk)

    async def GetModelInfo(self, request, context) -> vision_pb2.GetModelInfoResponse:
        return vision_pb2.GetModelInfoResponse(model_info=self._ready().model_info().to_pb())


# ------------------------------------------------------------------------------------------------- process


def add_arguments(parser: argparse.ArgumentParser) -> None:
    vision_config.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    config = VisionConfig.from_args(args)
    with tracing.traced_process("vision", config.server.otlp_endpoint):
        asyncio.run(serve(config))
    return 0


async def serve(config: VisionConfig) -> None:
    metrics = VisionMetrics()
    server = GrpcServer(config.server, [VISION_SERVICE], requests=metrics.requests)
    servicer = VisionServicer()
    server.add(vision_pb2_grpc.add_VisionServiceServicer_to_server, servicer)
    # Bound while the weights load: liveness ("") answers SERVING, readiness (VISION_SERVICE) NOT_SERVING.
    await server.start(registry=metrics.registry)
    server.report_ports()
    service: VisionService | None = None
    try:
        service = await VisionService.load(config, metrics)
        started = time.perf_counter()
        await service.warm_up()
        log.info("warm-up tile encoded in %.2fs", time.perf_counter() - started)
    except BaseException:
        await server.stop()
        if service is not None:
            await service.close()
        raise
    servicer.service = service
    await server.mark_ready()
    try:
        await server.serve_until_signalled()
    finally:
        await service.close()
        log.info("vision service stopped")
