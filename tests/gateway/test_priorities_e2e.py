"""Load shedding with priorities end to end: `internvl-serve up` on the tiny checkpoint with two gateway slots, one of
them reserved for critical requests (`--max-in-flight 2 --critical-reserve 1`), and an LLM batch of two rows.

A standard request that generates until it is cancelled saturates the standard share. Then, without tight timing:
a sheddable request is refused UNAVAILABLE with `retry-after` (and HTTP 503 with `Retry-After`); a second standard
request queues; a critical request is admitted beside the first and answered while the second still waits; once the
first is cancelled, the second is answered. The gateway's counters say the same. A bad `X-Request-Priority` is a 400.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
from internvl.common.v1 import common_pb2
from internvl.gateway.v1 import gateway_pb2 as G
from stack import up_stack

from services.contract import template
from tools.launcher import metric

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def stack(tiny_checkpoint, tmp_path_factory):
    with up_stack(tiny_checkpoint(), tmp_path_factory.mktemp("up-logs"), "--max-in-flight", "2",
                  "--critical-reserve", "1", "--max-batch-size", "2") as running:
        yield running


def request(text: str, priority: int, max_new_tokens: int = 4, endless: bool = False) -> G.ChatRequest:
    sampling = G.SamplingParams(max_new_tokens=max_new_tokens)
    if endless:  # never the stop token: it generates until cancelled (or the context is full)
        sampling.logit_bias[STOP_TOKEN_ID] = -100.0
    return G.ChatRequest(content=[G.ContentPart(text=text)], priority=priority, sampling=sampling)


STOP_TOKEN_ID = 151645  # the tiny checkpoint's <|im_end|> (its Qwen2 tokenizer's)


class Streamed:
    """A Chat read on a thread of its own: when its first token came, when it ended, and how."""

    def __init__(self, stub, chat: G.ChatRequest):
        self.call = stub.Chat(chat, timeout=120)
        self.first_token_at: float | None = None
        self.ended_at: float | None = None
        self.error: grpc.RpcError | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for reply in self.call:
                if reply.HasField("delta") and self.first_token_at is None:
                    self.first_token_at = time.monotonic()
        except grpc.RpcError as exc:
            self.error = exc
        self.ended_at = time.monotonic()


def wait_until(condition, seconds: float = 60) -> None:
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def gateway(stack, name: str, **labels) -> float:
    return metric(stack.metrics(), f"internvl_gateway_{name}", **labels) or 0.0


def test_sheddable_is_refused_and_critical_goes_before_queued_standard_under_saturation(stack):
    assert template.STOP_TOKEN == "<|im_end|>"
    stub = stack.stub
    blocker = Streamed(stub, request("Count slowly.", common_pb2.PRIORITY_STANDARD, 30_000, endless=True))
    try:
        wait_until(lambda: blocker.first_token_at is not None or blocker.ended_at is not None)
        assert blocker.error is None and blocker.ended_at is None, blocker.error
        # Saturated for anything but critical: a sheddable request is refused at once, with advice.
        with pytest.raises(grpc.RpcError) as info:
            for _ in stub.Chat(request("Shed me.", common_pb2.PRIORITY_SHEDDABLE), timeout=60):
                pass
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "sheddable" in info.value.details()
        assert int(dict(info.value.trailing_metadata())["retry-after"]) >= 1
        shed = _http_chat(stack, "sheddable")
        assert shed[0] == 503 and int(shed[1]["Retry-After"]) >= 1
        # A second standard request waits; a critical one, sent after it, is answered first.
        queued = Streamed(stub, request("Wait for me.", common_pb2.PRIORITY_STANDARD))
        wait_until(lambda: gateway(stack, "queued", priority="standard") == 1)
        critical = Streamed(stub, request("Me first.", common_pb2.PRIORITY_CRITICAL))
        critical.thread.join(60)
        assert critical.error is None and critical.ended_at is not None and critical.first_token_at is not None
        assert queued.first_token_at is None and queued.ended_at is None  # still waiting behind the blocker
    finally:
        blocker.call.cancel()
    queued.thread.join(60)
    assert queued.error is None and queued.first_token_at is not None and queued.first_token_at > critical.ended_at
    assert gateway(stack, "shed_total", priority="sheddable", reason="saturated") == 2
    assert gateway(stack, "admitted_total", priority="critical") >= 1
    assert gateway(stack, "shed_total", priority="standard", reason="queue_wait") == 0


def test_a_bad_priority_header_is_400_naming_the_allowed_values(stack):
    status, _, body = _http_chat(stack, "urgent")
    assert status == 400
    assert body["error"]["message"] == ("X-Request-Priority: 'urgent' is not a priority; use one of critical, "
                                        "standard, sheddable")


def _http_chat(stack, priority: str) -> tuple[int, dict, dict]:
    """(status, headers, body) of one chat completion over HTTP with `X-Request-Priority: priority`."""
    body = json.dumps({"model": stack.model, "max_tokens": 2,
                       "messages": [{"role": "user", "content": "Hi"}]}).encode()
    http = urllib.request.Request(f"http://127.0.0.1:{stack.http_port}/v1/chat/completions", data=body,
                                  headers={"Content-Type": "application/json", "X-Request-Priority": priority})
    try:
        with urllib.request.urlopen(http, timeout=60) as reply:
            return reply.status, dict(reply.headers), json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())
