"""Replicas that go away mid-request, on a stack of its own (these tests kill its processes).

Both vision replicas hold each batch for 2.5 s (`--max-wait-ms 2500`), so a request's tiles sit in one replica's
queue long enough to be seen there (its `queue_tiles` gauge) and to cancel the request, or kill that replica, first.

* a cancelled request's tiles leave the vision queue at once and are never encoded;
* a vision replica killed while it holds a request: the gateway tries Encode again, round_robin sends it to the
  other replica, and the caller gets a complete answer;
* the LLM service killed mid-stream: the gRPC caller gets UNAVAILABLE and never a finish message, the HTTP stream
  ends with an error event instead of a finish_reason, and later calls fail UNAVAILABLE (retryable), not INTERNAL;
  once it is restarted on the same address, the same gateway serves again without being restarted itself.
"""

from __future__ import annotations

import http.client
import json
import threading
import time

import grpc
import pytest
from helpers import media
from helpers.chat import assert_no_leak, chat, image_part, text_part
from internvl.gateway.v1 import gateway_pb2 as G
from procs import wait_for, wait_serving
from stack import running_stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

SLOW_BATCH_MS = 2500


@pytest.fixture(scope="module")
def stack(checkpoint):
    slow = ["--max-wait-ms", str(SLOW_BATCH_MS)]
    with running_stack(checkpoint, vision_args=[slow, slow], namespace="relreplica") as running:
        yield running


def holding(stack):
    """The vision replica whose queue holds tiles, if any."""
    return next((v for v in stack.visions if v.process.poll() is None
                 and v.metric("internvl_vision_queue_tiles") > 0), None)


def test_cancelled_request_leaves_the_vision_queue(stack):
    request = G.ChatRequest(content=[image_part(media.noise_png(seed=500)), text_part("?")],
                            sampling=G.SamplingParams(max_new_tokens=2))
    call = stack.stub.Chat(request, timeout=30)
    # Polled well within the 2.5 s a batch waits; the gateway's planning may take seconds on a loaded machine.
    victim = wait_for(lambda: holding(stack), 10, "tiles queued on a vision replica")
    encoded = victim.metric("internvl_vision_tiles_encoded_total")
    cancelled = victim.metric("internvl_vision_requests_total", method="Encode", code="CANCELLED")
    dropped = victim.metric("internvl_vision_tiles_cancelled_total")
    queued = victim.metric("internvl_vision_queue_tiles")
    call.cancel()
    wait_for(lambda: victim.metric("internvl_vision_queue_tiles") == 0, 1.5, "the queue to drop the tiles")
    time.sleep(SLOW_BATCH_MS / 1000 + 0.5)  # past the moment the batch would have run
    assert victim.metric("internvl_vision_tiles_encoded_total") == encoded
    assert victim.metric("internvl_vision_requests_total", method="Encode", code="CANCELLED") == cancelled + 1
    assert victim.metric("internvl_vision_tiles_cancelled_total") == dropped + queued > dropped
    stack.wait_idle()


def test_vision_replica_killed_mid_request(stack):
    data = media.noise_png(72, 64, seed=600)
    outcome: dict = {}

    def ask() -> None:
        try:
            outcome["answer"] = chat(stack.stub, [image_part(data), text_part("Describe it.")], timeout=60)
        except grpc.RpcError as exc:
            outcome["error"] = f"{exc.code().name}: {exc.details()}"

    retries = stack.gateway.metric("internvl_gateway_upstream_retries_total", service="vision", method="Encode")
    thread = threading.Thread(target=ask)
    thread.start()
    victim = wait_for(lambda: holding(stack), 2, "tiles queued on a vision replica")
    victim.kill()
    thread.join(60)
    assert "error" not in outcome, outcome
    answer = outcome["answer"]
    assert answer.finish is not None and answer.finish.usage.encoded_tiles == answer.finish.usage.image_tiles[0]
    assert stack.gateway.metric("internvl_gateway_upstream_retries_total", service="vision",
                                method="Encode") > retries
    # The survivor serves the next requests alone.
    again = chat(stack.stub, [image_part(media.noise_png(seed=601)), text_part("And this?")], timeout=60)
    assert again.finish.usage.encoded_tiles >= 1


def test_llm_killed_mid_stream_then_restarted(stack):
    endless = G.ChatRequest(content=[text_part("Tell me a story that never ends.")],
                            sampling=G.SamplingParams(max_new_tokens=3000))
    call = stack.stub.Chat(endless, timeout=60)
    body = json.dumps({"messages": [{"role": "user", "content": "Another endless story."}], "max_tokens": 3000,
                       "stream": True})
    connection = http.client.HTTPConnection("127.0.0.1", stack.http_port, timeout=60)
    connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    sse = connection.getresponse()
    assert sse.status == 200
    events = [sse.readline() for _ in range(6)]  # the role chunk and a couple of content chunks

    received, finish = [], None
    with pytest.raises(grpc.RpcError) as info:
        for response in call:
            if response.HasField("delta"):
                received.append(response.delta)
                if len(received) == 3:
                    stack.llm.kill()
            else:
                finish = response.finish
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    assert finish is None and len(received) >= 3
    assert_no_leak(info.value.details())

    events += sse.read().splitlines()
    connection.close()
    payloads = [line[len(b"data: "):] for line in events if line.startswith(b"data: ")]
    assert payloads[-1] == b"[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert error["code"] == "unavailable" and "retry" in error["message"], error
    chunks = [json.loads(p) for p in payloads[:-2]]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks), "a cut answer presented as complete"

    # The LLM pool is gone: later calls fail fast and retryably.
    with pytest.raises(grpc.RpcError) as info:
        chat(stack.stub, [text_part("Anyone there?")], timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert_no_leak(info.value.details())

    # Restarted where it was (a pod behind its Service): the gateway reconnects by itself (its reconnect backoff is
    # capped at 5 s), answering UNAVAILABLE until then.
    stack.llm.restart()
    wait_serving([stack.llm])
    answer = wait_for(lambda: _answer_or_none(stack, "Back again?"), timeout_s=30, what="the gateway to reconnect")
    assert answer.finish is not None and answer.token_ids


def _answer_or_none(stack, question: str):
    try:
        return chat(stack.stub, [text_part(question)], timeout=30)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        return None
