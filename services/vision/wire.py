"""The one place where `internvl.vision.v1` messages become the vision service's domain objects and back.

Nothing else in services/vision imports the generated stubs, except the servicer that registers them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from internvl.common.v1 import common_pb2
from internvl.vision.v1 import vision_pb2

from services.contract.dtypes import DTYPE_TO_PB
from services.contract.encoding import EncodedItem, MediaItem
from services.contract.model_info import ModelInfo
from services.runtime.embedding_store import StoredEmbeddings
from services.runtime.tensor_wire import tensor_chunks
from services.vision.service import EncodeOptions

# -- requests ---------------------------------------------------------------------------------------------------


def item_from_pb(item: vision_pb2.EncodeItem) -> MediaItem:
    """An item that sets neither medium becomes kind "" (the service refuses it, naming its index)."""
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


# -- responses --------------------------------------------------------------------------------------------------


def encode_response_to_pb(results: Sequence[EncodedItem]) -> vision_pb2.EncodeResponse:
    return vision_pb2.EncodeResponse(items=[
        vision_pb2.EncodedItem(key=r.key, num_tiles=r.num_tiles, num_tokens=r.num_tokens, cache_hit=r.cache_hit)
        for r in results])


def fetch_responses(value: StoredEmbeddings, chunk_bytes: int) -> Iterator[vision_pb2.FetchEmbeddingsResponse]:
    """One stored tensor [rows, hidden] as FetchEmbeddings messages of at most `chunk_bytes` of data each."""
    for chunk in tensor_chunks(DTYPE_TO_PB[value.dtype], value.shape, value.data, chunk_bytes):
        yield vision_pb2.FetchEmbeddingsResponse(chunk=chunk)


def model_info_to_pb(info: ModelInfo) -> vision_pb2.GetModelInfoResponse:
    return vision_pb2.GetModelInfoResponse(model_info=info.to_pb())
