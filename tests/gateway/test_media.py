"""Media resolution: data URLs, paths confined to the media root, image probing, and PyAV video sampling."""

from __future__ import annotations

import base64
import os

import pytest
from helpers.media import decode_frames, png, write_video

from gateway.media import MediaResolver, decode_data_url, decode_video, probe_image
from gateway.video import frame_indices
from services.contract.errors import InvalidArgumentError, InvalidMediaError, MediaAccessError


@pytest.mark.parametrize(("frames", "fps", "segments", "bound"), [
    (12, 6, 4, None), (12, 6, 8, None), (30, 10, 5, (0.5, 2.0)), (7, 5, 8, None), (3, 3, 1, None)])
def test_video_frames_are_the_sampled_frames(frames, fps, segments, bound):
    data = write_video(frames=frames, fps=fps, size=(40, 24))
    got = decode_video(data, segments, bound, 10**8, "v")
    decoded, avg_fps = decode_frames(data)
    want = [decoded[i] for i in frame_indices(len(decoded), avg_fps, segments, bound)]
    assert len(got) == segments
    for frame, pixels in zip(got, want, strict=True):
        assert (frame.height, frame.width) == pixels.shape[:2] == (24, 40)
        assert frame.rgb == pixels.tobytes()


def test_video_errors_name_the_part():
    data = write_video(frames=6, fps=6, size=(40, 24))
    with pytest.raises(InvalidArgumentError, match=r"^content\[2\] \(video\): bound .* outside the video"):
        decode_video(data, 4, (5.0, 9.0), 10**8, "content[2] (video)")
    with pytest.raises(InvalidMediaError, match=r"^x: video frames are 40x24, above the limit of 100 pixels"):
        decode_video(data, 4, None, 100, "x")
    with pytest.raises(InvalidMediaError, match=r"^x: cannot decode the video"):
        decode_video(b"\x00" * 100, 4, None, 10**8, "x")


def test_data_urls():
    payload = b"\x89PNG whatever"
    url = "data:image/png;base64," + base64.b64encode(payload).decode()
    assert decode_data_url(url, "p", 1000) == payload
    assert decode_data_url("data:;base64," + base64.b64encode(payload).decode(), "p", 1000) == payload
    for bad, message in [("http://x/y.png", "remote URLs are not fetched"), ("file:///etc/passwd", "data: URL"),
                         ("data:image/png,rawtext", "must be base64"), ("data:image/png;base64,@@@", "base64"),
                         (url, "larger than the limit")]:
        with pytest.raises((InvalidArgumentError, InvalidMediaError), match=message):
            decode_data_url(bad, "p", 4 if bad == url else 1000)


def test_probe_image():
    assert probe_image(png(33, 21), 10**6, "p") == (33, 21)
    with pytest.raises(InvalidMediaError, match=r"^p: the image is 33x21 = 693 pixels, above the limit of 100"):
        probe_image(png(33, 21), 100, "p")
    with pytest.raises(InvalidMediaError, match=r"^p: cannot decode the image"):
        probe_image(b"GIF89a-not-really", 10**6, "p")


def test_paths_stay_inside_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.png").write_bytes(png(4, 4))
    (tmp_path / "outside.png").write_bytes(png(4, 4))
    os.symlink(root / "sub", root / "alias")
    os.symlink(tmp_path, root / "escape")
    media = MediaResolver(root, max_media_bytes=10_000, max_pixels=10**6, max_video_frames=8)
    for good in ("sub/ok.png", "alias/ok.png", "./sub/../sub/ok.png", f"file://{root}/sub/ok.png"):
        assert media.image(path=good, where="p").width == 4, good
    for bad in ("../outside.png", "escape/outside.png", str(tmp_path / "outside.png"), "/etc/passwd"):
        with pytest.raises(MediaAccessError, match="outside the gateway's media root"):
            media.image(path=bad, where="p")
    with pytest.raises(InvalidMediaError, match=r"has \d+ bytes, above the limit of 10$"):
        MediaResolver(root, 10, 10**6, 8).image(path="sub/ok.png", where="p")
    with pytest.raises(MediaAccessError, match="no --media-root"):
        MediaResolver(None, 10_000, 10**6, 8).image(path="sub/ok.png", where="p")
