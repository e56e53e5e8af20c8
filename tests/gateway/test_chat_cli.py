"""`internvl-chat` against a gateway in front of fake services: text mode, --json lines, sessions, errors."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
from helpers.fakes import fake_stack
from helpers.media import png, write_video

from gateway.chat_cli import build_parser, chat, main

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]


async def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(chat, build_parser().parse_args(list(argv)), out, err)
    return code, out.getvalue(), err.getvalue()


async def test_json_lines_and_session(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(png(900, 448))
    (tmp_path / "v.mp4").write_bytes(write_video(frames=12, fps=6))
    async with fake_stack() as stack:
        target = stack.address
        code, out, _ = await run_cli("--target", target, "--image", str(tmp_path / "a.png"), "--video",
                                     str(tmp_path / "v.mp4"), "--num-segments", "3", "--top-logprobs", "2",
                                     "--json", "Describe.")
        assert code == 0
        lines = [json.loads(line) for line in out.splitlines()]
        assert [line["token_ids"] for line in lines[:-1]] == [[1], [2], [3]]
        last = lines[-1]
        assert last["text"] == "a b c" and last["token_ids"] == [1, 2, 3] and last["finish_reason"] == "stop"
        assert last["logprobs"][0] == {"token_id": 1, "logprob": -0.5, "top": [[1, -0.5], [9, -1.5]]}
        assert last["usage"]["image_tiles"] == [3, 1, 1, 1]
        assert set(last["usage"]) == {"prompt_tokens", "completion_tokens", "cached_prompt_tokens", "image_tiles",
                                      "encoded_tiles", "reused_tiles"}
        start = stack.llm.starts[-1]
        assert [p.WhichOneof("part") for p in start.user_parts] == ["image", "video", "text"]

        code, out, err = await run_cli("--target", target, "--session", last["session_id"], "And?")
        assert code == 0 and out == "a b c\n"
        assert f"session {last['session_id']}" in err and "0 encoded, 6 reused" in err

        code = await asyncio.to_thread(main, ["--target", target, "--session", "gone", "x"])
        assert code == 1

        code = await asyncio.to_thread(main, ["--target", target, "--model", "no-such-adapter", "x"])
        assert code == 1 and "model 'no-such-adapter' is not served" in capsys.readouterr().err
        code, out, _ = await run_cli("--target", target, "--model", "fake", "x")
        assert code == 0 and out == "a b c\n"
