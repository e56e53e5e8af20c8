"""`internvl-serve vision`: the gRPC face of the vision service.

The servicer translates ``internvl.vision.v1`` messages into the core's types (``services.vision.service``)
and back; errors are domain exceptions that the shared interceptor maps to statuses. Start-up order: the
server binds first and answers health checks (NOT_SERVING) while the model loads; readiness flips to SERVING
only once the model is loaded and a warm-up tile has gone through the encoder. SIGTERM drains, then the
model and the cache connection are released.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator

from internvl.common.v1 import common_pb2
from internvl.vision.v1 import vision_pb2, vision_pb2_grpc

from services.common.errors import NotReadyError
from services.common.grpc_errors import status_for
from services.common.grpc_server import GrpcServer
from services.common.model_info import DTYPE_TO_PB
from services.common.tensor_wire import tensor_chunks
from services.vision import config as vision_config
from services.vision.config import VisionConfig
from services.vision.metrics import VisionMetrics
from services.vision.service import EncodeOptions, MediaItem, VisionService

log = logging.getLogger(__name__)

SERVICE_NAME = vision_pb2.DESCRIPTOR.services_by_name["VisionService"].full_name  # internvl.vision.v1.VisionService

# ------------------------------------------------------------------------------------------- translation


def item_from_pb(item: vision_pb2.EncodeItem) -> MediaItem:
    which = item.WhichOneof("media")
    if which == "image_bytes":
        return MediaItem.image(item.image_bytes)
    if which == "frame":
        return MediaItem.frame(item.frame.rgb, item.frame.height, item.frame.width)
    return MediaItem("", b"")


def options_from_pb(options: common_pb2.PreprocessOptions) -> EncodeOptions:
    return EncodeOptions(
        max_num=options.max_num if options.HasField("max_num") else None,
        use_thumbnail=options.use_thumbnail if options.HasField("use_thumbnail") else None,
    )


# ---------------------------------------------------------------------------------------------- servicer


class VisionServicer(vision_pb2_grpc.VisionServiceServicer):
    """Thin translation between the wire and ``VisionService``. Answers UNAVAILABLE until a service is attached."""

    def __init__(self, metrics: VisionMetrics, service: VisionService | None = None) -> None:
        self.metrics = metrics
        self.service = service

    def _ready(self) -> VisionService:
        if self.service is None:
            raise NotReadyError("the vision model is still loading")
        return self.service

    @contextlib.contextmanager
    def _track(self, method: str) -> Iterator[None]:
        """Counts the call by method and final status, and times it."""
        started = time.perf_counter()
        code = "OK"
        try:
            yield
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            raise
        except Exception as exc:
            code = status_for(exc)[0].name
            raise
        finally:
            self.metrics.requests.labels(method, code).inc()
            self.metrics.request_seconds.labels(method).observe(time.perf_counter() - started)

    async def Encode(self, request: vision_pb2.EncodeRequest, context) -> vision_pb2.EncodeResponse:
        with self._track("Encode"):
            results = await self._ready().encode([item_from_pb(i) for i in request.items],
                                                 options_from_pb(request.options))
            return vision_pb2.EncodeResponse(items=[
                vision_pb2.EncodedItem(key=r.key, num_tiles=r.num_tiles, num_tokens=r.num_tokens,
                                       cache_hit=r.cache_hit) for r in results])

    async def Lookup(self, request: vision_pb2.LookupRequest, context) -> vision_pb2.LookupResponse:
        with self._track("Lookup"):
            return vision_pb2.LookupResponse(exists=await self._ready().lookup(list(request.keys)))

    async def FetchEmbeddings(self, request: vision_pb2.FetchEmbeddingsRequest,
                              context) -> AsyncIterator[vision_pb2.FetchEmbeddingsResponse]:
        with self._track("FetchEmbeddings"):
            service = self._ready()
            chunk_bytes = service.config.chunk_bytes(request.max_chunk_bytes)
            value = await service.fetch(request.key)
            for chunk in tensor_chunks(DTYPE_TO_PB[value.dtype], value.shape, value.data, chunk_bytes):
                yield vision_pb2.FetchEmbeddingsResponse(chunk=chunk)

    async def GetModelInfo(self, request, context) -> vision_pb2.GetModelInfoResponse:
        with self._track("GetModelInfo"):
            return vision_pb2.GetModelInfoResponse(model_info=self._ready().model_info().to_pb())


# ------------------------------------------------------------------------------------------------- process


def add_arguments(parser: argparse.ArgumentParser) -> None:
    vision_config.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    config = VisionConfig.from_args(args)
    asyncio.run(serve(config))
    return 0


async def serve(config: VisionConfig) -> None:
    metrics = VisionMetrics()
    server = GrpcServer(config.server, [SERVICE_NAME])
    servicer = VisionServicer(metrics)
    server.add(vision_pb2_grpc.add_VisionServiceServicer_to_server, servicer)
    # Bound while the weights load: liveness ("") answers SERVING, readiness (SERVICE_NAME) NOT_SERVING.
    await server.start(registry=metrics.registry)
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
