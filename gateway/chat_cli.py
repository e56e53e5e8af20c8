"""`internvl-chat`: ask the gateway a question about images or a video, from the terminal.

    internvl-chat --image photo.jpg "What is in this picture?"
    internvl-chat --video clip.mp4 --num-segments 8 "What happens?"
    internvl-chat --session SESSION_ID "And what colour is it?"
    internvl-chat --tls-ca ca.pem --token-file token "Hello"    # a gateway with TLS and a bearer token

Images and videos are read here and sent as bytes. By default the answer streams to stdout and the session id and
usage go to stderr; with `--json` each delta is one JSON line and the last line is the whole answer: `text`,
`token_ids`, `finish_reason`, `logprobs` (with `--top-logprobs`), `usage` and `session_id`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import grpc
from internvl.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from services.contract.errors import InternVLError
from services.runtime.tls import ClientTls

ENV_API_TOKEN = "INTERNVL_API_TOKEN"

FINISH = {gateway_pb2.FINISH_REASON_STOP: "stop", gateway_pb2.FINISH_REASON_LENGTH: "length",
          gateway_pb2.FINISH_REASON_CANCELLED: "cancelled"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="internvl-chat", description=__doc__.splitlines()[0])
    parser.add_argument("question", help="the question (may contain <image> placeholders)")
    parser.add_argument("--target", default="localhost:50051", help="gateway address (default localhost:50051)")
    parser.add_argument("--image", action="append", default=[], metavar="PATH", help="an image (repeatable)")
    parser.add_argument("--video", metavar="PATH", help="a video")
    parser.add_argument("--num-segments", type=int, default=None, help="frames sampled from the video (default 8)")
    parser.add_argument("--video-bound", type=float, nargs=2, metavar=("START", "END"),
                        help="only sample the video between these times (seconds)")
    parser.add_argument("--video-max-num", type=int, default=None, help="tiles per video frame (default 1)")
    parser.add_argument("--max-num", type=int, default=None, help="most tiles per image (default 12)")
    parser.add_argument("--combined", action="store_true",
                        help="put all images' tiles under one placeholder (the original's combined mode)")
    parser.add_argument("--session", metavar="ID", help="continue this session")
    parser.add_argument("--model", default="", help="the base model's id or a LoRA adapter's (default: the base, "
                                                    "or the session's model)")
    parser.add_argument("--system", help="replace the default system message")
    parser.add_argument("--max-tokens", type=int, default=0, help="most tokens to generate (default: server's)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    parser.add_argument("--top-p", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--repetition-penalty", type=float, default=0.0)
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--top-logprobs", type=int, default=0, help="alternatives to report per token")
    parser.add_argument("--timeout", type=float, default=600.0, help="deadline in seconds (default 600)")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    parser.add_argument("--tls-ca", metavar="PEM",
                        help="CA bundle that signed the gateway's certificate; connects with TLS")
    parser.add_argument("--tls-cert", metavar="PEM", help="client certificate, for a gateway requiring mutual TLS")
    parser.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    parser.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's CAs")
    parser.add_argument("--token-file", metavar="PATH",
                        help=f"file holding the gateway's bearer token (default: ${ENV_API_TOKEN} when set)")
    return parser


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    """A plaintext channel, or TLS (mutual with --tls-cert/--tls-key) when any TLS option is given."""
    tls = ClientTls.from_files(args.tls_ca, args.tls_cert, args.tls_key)
    if tls is None and args.tls:
        tls = ClientTls()
    if tls is None:
        return grpc.insecure_channel(args.target)
    return grpc.secure_channel(args.target, tls.credentials())


def call_metadata(args: argparse.Namespace, environ=None) -> list[tuple[str, str]]:
    environ = os.environ if environ is None else environ
    token = Path(args.token_file).read_text().strip() if args.token_file else environ.get(ENV_API_TOKEN, "").strip()
    return [("authorization", f"Bearer {token}")] if token else []


def build_request(args: argparse.Namespace) -> gateway_pb2.ChatRequest:
    content = [gateway_pb2.ContentPart(image=gateway_pb2.ImageInput(data=Path(p).read_bytes())) for p in args.image]
    if args.video:
        video = gateway_pb2.VideoInput(data=Path(args.video).read_bytes())
        if args.num_segments is not None:
            video.num_segments = args.num_segments
        if args.video_bound:
            video.bound.start_s, video.bound.end_s = args.video_bound
        if args.video_max_num is not None:
            video.max_num = args.video_max_num
        content.append(gateway_pb2.ContentPart(video=video))
    content.append(gateway_pb2.ContentPart(text=args.question))
    request = gateway_pb2.ChatRequest(
        content=content,
        sampling=gateway_pb2.SamplingParams(
            max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            repetition_penalty=args.repetition_penalty, stop_strings=args.stop, seed=args.seed,
            top_logprobs=args.top_logprobs),
        multi_image_mode=(gateway_pb2.MULTI_IMAGE_MODE_COMBINED if args.combined
                          else gateway_pb2.MULTI_IMAGE_MODE_UNSPECIFIED),
        model=args.model)
    if args.max_num is not None:
        request.max_num = args.max_num
    if args.session:
        request.session_id = args.session
    if args.system is not None:
        request.system_message = args.system
    return request


def usage_dict(usage: gateway_pb2.Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "cached_prompt_tokens": usage.cached_prompt_tokens, "image_tiles": list(usage.image_tiles),
            "encoded_tiles": usage.encoded_tiles, "reused_tiles": usage.reused_tiles}


def logprob_dicts(delta: gateway_pb2.ChatDelta) -> list[dict]:
    return [{"token_id": lp.token_id, "logprob": lp.logprob, "top": [[t.token_id, t.logprob] for t in lp.top]}
            for lp in delta.logprobs]


def chat(args: argparse.Namespace, out=sys.stdout, err=sys.stderr) -> int:
    request = build_request(args)
    text, token_ids, logprobs = [], [], []
    with open_channel(args) as channel:
        stub = gateway_pb2_grpc.ChatServiceStub(channel)
        for response in stub.Chat(request, timeout=args.timeout, metadata=call_metadata(args)):
            if response.HasField("delta"):
                delta = response.delta
                text.append(delta.text)
                token_ids += delta.token_ids
                logprobs += logprob_dicts(delta)
                if args.json:
                    print(json.dumps({"text": delta.text, "token_ids": list(delta.token_ids),
                                      "logprobs": logprob_dicts(delta)}, ensure_ascii=False), file=out, flush=True)
                else:
                    print(delta.text, end="", file=out, flush=True)
                continue
            finish = response.finish
            summary = {"text": "".join(text), "token_ids": token_ids, "finish_reason": FINISH.get(finish.reason, ""),
                       "logprobs": logprobs, "usage": usage_dict(finish.usage), "session_id": finish.session_id}
            if args.json:
                print(json.dumps(summary, ensure_ascii=False), file=out, flush=True)
            else:
                print(file=out)
                u = summary["usage"]
                print(f"[session {finish.session_id}; {summary['finish_reason']}; prompt {u['prompt_tokens']} tokens "
                      f"({u['cached_prompt_tokens']} cached), {u['completion_tokens']} generated; tiles "
                      f"{u['image_tiles']}: {u['encoded_tiles']} encoded, {u['reused_tiles']} reused]", file=err)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return chat(args)
    except (OSError, InternVLError) as exc:
        print(f"internvl-chat: error: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"internvl-chat: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
