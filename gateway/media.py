"""Media resolution for the gateway: where image and video bytes come from, and video decoding with PyAV.

Everything here is blocking (file reads, base64, PyAV decoding); the orchestrator runs it in an executor. Errors
are domain errors whose messages name the content part (`where`), so a caller can tell which of its inputs failed:

* image and video sources: raw bytes, a file path that must lie inside the media root (after resolving symlinks
  and `..`), or a base64 `data:` URL. Nothing here touches the network: `http(s)://` URLs are fetched before media
  resolution by `gateway.remote_media` (only from hosts in `--allowed-media-domains`), which replaces them by their
  bytes; a remote URL that still reaches this module was not fetched and is refused.
* images are only probed here (format header and size, for the pixel limit and the tile count); the vision service
  decodes them, and only on a cache miss.
* videos are decoded once, in stream order, keeping only the frames `gateway.video.frame_indices` picks, as RGB24.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from dataclasses import dataclass
from pathlib import Path

import av
from PIL import Image

from gateway.remote_media import DISABLED_MESSAGE, is_remote_url
from gateway.video import frame_indices
from services.contract.errors import (
    InternVLError,
    InvalidArgumentError,
    InvalidMediaError,
    MediaAccessError,
    MediaTooLargeError,
)
from services.contract.image_formats import UNSUPPORTED_FORMAT, open_untrusted

# Containers a video may come in (FFmpeg demuxer names; a demuxer is named e.g. "mov,mp4,m4a,3gp,3g2,mj2").
# Playlists and concat scripts, which make FFmpeg open further files or URLs, are never among them.
VIDEO_CONTAINERS = frozenset({"mov", "mp4", "matroska", "webm", "avi", "mpeg", "mpegts", "flv", "ogg", "gif"})


@dataclass(frozen=True)
class ProbedImage:
    """An encoded image file, not yet decoded, and its size from the header."""

    data: bytes
    width: int
    height: int


@dataclass(frozen=True)
class Frame:
    """A decoded RGB24 picture (row-major, HWC)."""

    rgb: bytes
    height: int
    width: int


class MediaResolver:
    """Reads and checks media under the gateway's limits."""

    def __init__(self, media_root: str | os.PathLike | None, max_media_bytes: int, max_pixels: int,
                 max_video_frames: int):
        self.media_root = Path(media_root).resolve() if media_root is not None else None
        self.max_media_bytes = max_media_bytes
        self.max_pixels = max_pixels
        self.max_video_frames = max_video_frames

    # ------------------------------------------------------------------------------------------- sources

    def read_path(self, path: str, where: str) -> bytes:
        """The bytes of `path` (absolute, or relative to the media root); only files inside the root."""
        if self.media_root is None:
            raise MediaAccessError(f"{where}: file paths are disabled on this gateway (it has no --media-root); "
                                   "send the bytes or a data: URL")
        if not path or "\x00" in path:
            raise InvalidArgumentError(f"{where}: the file path is empty or malformed")
        path = path.removeprefix("file://")
        candidate = Path(path)
        if not candidate.is_absolute():
            candidate = self.media_root / candidate
        resolved = Path(os.path.realpath(candidate))
        if not resolved.is_relative_to(self.media_root):
            raise MediaAccessError(f"{where}: {path!r} is outside the gateway's media root")
        if not resolved.is_file():
            raise InvalidArgumentError(f"{where}: no such file under the media root: {path!r}")
        size = resolved.stat().st_size
        if size > self.max_media_bytes:
            raise InvalidMediaError(f"{where}: the file has {size} bytes, above the limit of {self.max_media_bytes}")
        return resolved.read_bytes()

    def read_data_url(self, url: str, where: str) -> bytes:
        return decode_data_url(url, where, self.max_media_bytes)

    def _bytes(self, data: bytes | None, where: str) -> bytes:
        if not data:
            raise InvalidMediaError(f"{where}: the media is empty")
        if len(data) > self.max_media_bytes:
            raise InvalidMediaError(f"{where}: {len(data)} bytes, above the limit of {self.max_media_bytes}")
        return bytes(data)

    # -------------------------------------------------------------------------------------------- images

    def image(self, data: bytes | None = None, path: str | None = None, url: str | None = None, *,
              where: str) -> ProbedImage:
        """Reads an image from its source and probes its header (format and size), without decoding pixels."""
        if path is not None:
            data = self.read_path(path, where)
        elif url is not None:
            data = self.read_data_url(url, where)
        data = self._bytes(data, where)
        width, height = probe_image(data, self.max_pixels, where)
        return ProbedImage(data, width, height)

    # -------------------------------------------------------------------------------------------- videos

    def video(self, data: bytes | None = None, path: str | None = None, url: str | None = None, *,
              num_segments: int, bound: tuple[float, float] | None, where: str) -> list[Frame]:
        if not 1 <= num_segments <= self.max_video_frames:
            raise InvalidArgumentError(f"{where}: num_segments must be between 1 and {self.max_video_frames}, "
                                       f"got {num_segments}")
        if path is not None:
            data = self.read_path(path, where)
        elif url is not None:
            data = self.read_data_url(url, where)
        data = self._bytes(data, where)
        return decode_video(data, num_segments, bound, self.max_pixels, where)


def decode_data_url(url: str, where: str, max_bytes: int) -> bytes:
    """The payload of a `data:[<mime>];base64,<data>` URL.

    Remote URLs are refused here: `gateway.remote_media` fetches those (when the gateway allows their host) and
    replaces them by their bytes before media resolution, so one arriving here was not fetched.
    """
    if is_remote_url(url):
        raise InvalidArgumentError(f"{where}: {DISABLED_MESSAGE}")
    if not url.startswith("data:"):
        raise InvalidArgumentError(f"{where}: expected a data: URL, got {url[:32]!r}")
    header, sep, payload = url[len("data:"):].partition(",")
    if not sep or not header.endswith(";base64"):
        raise InvalidArgumentError(f"{where}: data: URLs must be base64 (data:<mime>;base64,<data>)")
    if len(payload) > max_bytes * 4 // 3 + 4:
        raise InvalidMediaError(f"{where}: the data URL is larger than the limit of {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidMediaError(f"{where}: the data URL is not valid base64 ({exc})") from None


def probe_image(data: bytes, max_pixels: int, where: str) -> tuple[int, int]:
    """(width, height) from an image file's header; InvalidMediaError if it is not an image or too large."""
    try:
        with open_untrusted(data) as image:
            width, height = image.size
    except Image.DecompressionBombError:
        raise MediaTooLargeError(f"{where}: the image is too large: more pixels than the limit of "
                                 f"{max_pixels}") from None
    except Image.UnidentifiedImageError:
        raise InvalidMediaError(f"{where}: cannot decode the image: {UNSUPPORTED_FORMAT}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidMediaError(f"{where}: cannot decode the image: {exc}") from None
    except Exception:  # noqa: BLE001 - a parser tripping over hostile bytes (struct.error, ...) is bad media
        raise InvalidMediaError(f"{where}: cannot decode the image: corrupt header") from None
    if width < 1 or height < 1:
        raise InvalidMediaError(f"{where}: the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise MediaTooLargeError(f"{where}: the image is {width}x{height} = {width * height} pixels, above the "
                                 f"limit of {max_pixels}")
    return width, height


def decode_video(data: bytes, num_segments: int, bound: tuple[float, float] | None, max_pixels: int,
                 where: str) -> list[Frame]:
    """The `num_segments` frames InternVL 2.5's video recipe samples, decoded to RGB24.

    The frame count and average frame rate are the container's (as decord's `len(vr)` and `get_avg_fps()`); the
    count is taken by demuxing (cheap, no decoding) since the stream header's count is often absent or wrong.
    """
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            demuxer = container.format.name
            if not VIDEO_CONTAINERS.intersection(demuxer.split(",")):
                raise InvalidMediaError(f"{where}: unsupported video container {demuxer!r}; send MP4/MOV, WebM/MKV, "
                                        "AVI, MPEG(-TS), FLV, Ogg or GIF")
            if not container.streams.video:
                raise InvalidMediaError(f"{where}: the file has no video stream")
            stream = container.streams.video[0]
            context = stream.codec_context
            if context is None:
                raise InvalidMediaError(f"{where}: the video stream has no decoder")
            if context.width * context.height > max_pixels:  # refused before any frame is decoded
                raise MediaTooLargeError(f"{where}: video frames are {context.width}x{context.height}, above the "
                                         f"limit of {max_pixels} pixels")
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
            num_frames = sum(1 for packet in container.demux(stream) if packet.size)
        if num_frames < 1:
            raise InvalidMediaError(f"{where}: the video has no frames")
        try:
            wanted = frame_indices(num_frames, fps, num_segments, bound)
        except ValueError as exc:
            raise InvalidArgumentError(f"{where}: {exc}") from None
        frames: dict[int, Frame] = {}
        last = max(wanted)
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for index, frame in enumerate(container.decode(stream)):
                if index in wanted:
                    if frame.width * frame.height > max_pixels:
                        raise InvalidMediaError(f"{where}: video frames are {frame.width}x{frame.height}, above the "
                                                f"limit of {max_pixels} pixels")
                    rgb = frame.to_ndarray(format="rgb24")
                    frames[index] = Frame(rgb.tobytes(), rgb.shape[0], rgb.shape[1])
                if index >= last:
                    break
    except av.FFmpegError as exc:
        raise InvalidMediaError(f"{where}: cannot decode the video: {_ffmpeg_reason(exc)}") from None
    except InternVLError:
        raise
    except (ValueError, TypeError, IndexError, OverflowError, ZeroDivisionError, EOFError, MemoryError,
            AttributeError):
        # Demuxers tripping over hostile bytes in ways PyAV does not wrap (a stream without a codec context, ...).
        raise InvalidMediaError(f"{where}: cannot decode the video: corrupt data") from None
    missing = [i for i in wanted if i not in frames]
    if missing:
        raise InvalidMediaError(f"{where}: the video has fewer decodable frames than its container lists "
                                f"(frame {missing[0]} of {num_frames} is missing)")
    return [frames[i] for i in wanted]


def _ffmpeg_reason(exc: av.FFmpegError) -> str:
    """FFmpeg's reason without PyAV's repr of the (in-memory) file it was reading."""
    return exc.strerror or type(exc).__name__
