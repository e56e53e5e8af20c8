"""A scaled-out stack for the tests of routing and the prefix cache: Redis, vision replicas, LLM replicas and several
gateways as real processes, and the conversations they are driven with (gRPC sessions of three turns, stateless OpenAI
conversations that resend their history), with the share of later turns that found their prefix cached.
"""

from __future__ import annotations

import base64
import contextlib
import io
import itertools
import json
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from internvl.gateway.v1 import gateway_pb2 as G
from internvl.gateway.v1 import gateway_pb2_grpc
from PIL import Image
from procs import redis_server
from stack import start_services

from helpers.chat import chat
from tools.launcher import Child, metric

TURNS = ("Describe the picture.", "What colour dominates?", "Say it in one word.")
MAX_NEW = 4
GENERATE = "Generate"


@dataclass
class Pool:
    visions: list[Child]
    llms: list[Child]
    gateways: dict[str, Child]
    channels: dict[str, grpc.Channel]
    model: str  # the base model's id, what the OpenAI `model` field names

    def stub(self, gateway: str) -> gateway_pb2_grpc.ChatServiceStub:
        return gateway_pb2_grpc.ChatServiceStub(self.channels[gateway])

    def generate_counts(self) -> list[float]:
        """Generate calls each LLM replica answered OK (0 for one that is down)."""
        return [metric(llm.metrics(), "internvl_llm_requests_total", method=GENERATE, code="OK") if llm.running()
                else 0.0 for llm in self.llms]

    def served_since(self, before: list[float], calls: int, timeout_s: float = 10) -> list[float]:
        """Generate calls per replica since `before`, once `calls` of them are counted (a replica counts a call
        when its stream has closed, a moment after the caller has the answer)."""
        deadline = time.monotonic() + timeout_s
        while True:
            served = [after - b for after, b in zip(self.generate_counts(), before, strict=True)]
            if sum(served) >= calls or time.monotonic() > deadline:
                return served
            time.sleep(0.02)

    def tiles_encoded(self) -> float:
        return sum(metric(v.metrics(), "internvl_vision_tiles_encoded_total") for v in self.visions)


@contextlib.contextmanager
def running_pool(checkpoint: Path, *, visions: int, llms: int, gateways: dict[str, Sequence[str]],
                 llm_args: Sequence[str] = (), namespace: str = "scale"):
    """Redis, `visions` vision and `llms` LLM replicas (the latter with `llm_args`) on `checkpoint` in float32, then
    one gateway per entry of `gateways` (name -> its own flags, `{llms}` in them standing for an `ipv4:` target of
    every LLM replica and `{llm0}` for the first one's), each with every vision replica and Redis."""
    with contextlib.ExitStack() as stack:
        store = stack.enter_context(redis_server())
        common = ["--model", str(checkpoint), "--dtype", "float32", "--redis-url", store.url]
        services = start_services(stack, [*((f"vision-{i}", "vision", [*common, "--namespace", namespace])
                                            for i in range(visions)),
                                          *((f"llm-{i}", "llm", [*common, *llm_args]) for i in range(llms))],
                                  timeout_s=300)
        vision_pool, llm_pool = services[:visions], services[visions:]
        targets = {"{llms}": "ipv4:" + ",".join(llm.address for llm in llm_pool),
                   "{llm0}": f"ipv4:{llm_pool[0].address}"}
        base = ["--vision-target", "ipv4:" + ",".join(v.address for v in vision_pool), "--redis-url", store.url,
                "--namespace", namespace, "--resolve-interval-s", "1"]
        specs = [(f"gateway-{name}", "gateway", [*base, *(targets.get(a, a) for a in args)])
                 for name, args in gateways.items()]
        started = dict(zip(gateways, start_services(stack, specs), strict=True))
        channels = {name: stack.enter_context(grpc.insecure_channel(g.address)) for name, g in started.items()}
        yield Pool(vision_pool, llm_pool, started, channels, checkpoint.name)


def picture(seed: int) -> bytes:
    """A small distinct PNG per conversation (two colours, 500x300)."""
    image = Image.new("RGB", (500, 300), ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    image.paste(((seed * 11) % 256, 200, 40), (0, 0, 250, 300))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


@dataclass
class Turn:
    token_ids: list[int]
    prompt_tokens: int
    cached_prompt_tokens: int
    session_id: str


def grpc_turn(stub, content, session_id: str | None = None) -> Turn:
    answer = chat(stub, content, max_new_tokens=MAX_NEW, timeout=120,
                  **({} if session_id is None else {"session_id": session_id}))
    finish = answer.finish
    assert finish is not None
    return Turn(answer.token_ids, finish.usage.prompt_tokens, finish.usage.cached_prompt_tokens, finish.session_id)


def session_turns(pool: Pool, seed: int, gateways: tuple[str, ...]) -> list[Turn]:
    """One session of three turns, turn n through gateway gateways[n]; the image goes with the first turn."""
    image = G.ContentPart(image=G.ImageInput(data=picture(seed)))
    turns = [grpc_turn(pool.stub(gateways[0]), [image, G.ContentPart(text=TURNS[0])])]
    for number in (1, 2):
        turns.append(grpc_turn(pool.stub(gateways[number]), [G.ContentPart(text=TURNS[number])],
                               turns[0].session_id))
    return turns


def http_conversation(pool: Pool, seed: int, gateway: str = "a") -> list[Turn]:
    """A stateless OpenAI conversation: each turn resends the whole history, no session."""
    url = "data:image/png;base64," + base64.b64encode(picture(1000 + seed)).decode()
    messages: list[dict] = []
    turns = []
    for number, question in enumerate(TURNS):
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}] \
            if number == 0 else question
        messages.append({"role": "user", "content": content})
        body = json.dumps({"model": pool.model, "messages": messages, "max_tokens": MAX_NEW,
                           "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{pool.gateways[gateway].http_port}/v1/chat/completions",
                                         body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            reply = json.loads(response.read())
        usage = reply["usage"]
        turns.append(Turn([], usage["prompt_tokens"],
                          usage["prompt_tokens_details"]["cached_tokens"], ""))
        messages.append({"role": "assistant", "content": reply["choices"][0]["message"]["content"]})
    return turns


def prefix_hits(conversations: list[list[Turn]], block: int = 1) -> float:
    """Share of later turns whose cached prompt covers the previous turn's prompt: all of it, or with a cache that
    keeps whole blocks of `block` tokens (vLLM's), every whole block of it."""
    later = [(prev, turn) for turns in conversations for prev, turn in itertools.pairwise(turns)]
    return sum(turn.cached_prompt_tokens >= prev.prompt_tokens // block * block for prev, turn in later) / len(later)
