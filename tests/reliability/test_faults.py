"""Faults on the package's shared stack (real Redis, two vision replicas, the LLM service, the gateway):

* an embedding evicted between Encode and Generate is re-encoded transparently (the LLM answers FAILED_PRECONDITION
  with the missing key, the gateway re-encodes and retries once), proved by deleting the key in Redis the moment the
  vision service writes it;
* a client that cancels (gRPC, and an HTTP client that disconnects) or whose deadline passes stops the work in every
  service: the LLM's running sequences, queue and running KV memory and the gateway's in-flight gauge return to 0;
* an unexpected server error reaches the caller as INTERNAL "internal error", with no traceback or internal detail;
* Redis restarted under load: every request completes or fails UNAVAILABLE, every UNAVAILABLE succeeds on retry,
  and the services reconnect by themselves (none is restarted).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import threading
import time
from typing import Self

import grpc
import pytest
from helpers import media
from helpers.chat import assert_no_leak, chat, image_part, text_part
from internvl.gateway.v1 import gateway_pb2 as G

from tools.launcher import metric

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def vision_total(stack, name: str) -> float:
    return sum(v.metric(name) for v in stack.visions)


def llm_finished(stack, reason: str) -> float:
    return stack.llm.metric("internvl_llm_finished_requests_total", finish_reason=reason)


# ----------------------------------------------------------------------------------------------------- eviction


class EvictOnFirstWrite:
    """Deletes each embedding key the moment it is first written (keyspace notifications): the evictions that
    happen between Encode and Generate under memory pressure, made certain."""

    def __init__(self, stack):
        self.client = stack.redis.client()
        self.client.config_set("notify-keyspace-events", "K$")
        self.pubsub = self.client.pubsub()
        self.pubsub.psubscribe(f"__keyspace@0__:{stack.namespace}:emb:*")
        self.deleter = stack.redis.client()
        self.seen: set[bytes] = set()
        self.deleted: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self.pubsub.get_message(timeout=0.05)
            if message and message["type"] == "pmessage" and message["data"] == b"set":
                key = message["channel"].split(b":", 1)[1]
                if key not in self.seen:
                    self.seen.add(key)
                    self.deleter.delete(key)
                    self.deleted.append(key)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self.pubsub.close()
        self.client.config_set("notify-keyspace-events", "")
        self.client.close()
        self.deleter.close()


def test_embedding_evicted_between_encode_and_generate_is_reencoded(stack):
    question = "Describe the picture in one word."
    with EvictOnFirstWrite(stack) as evictor:
        # The deletion races the LLM's read (it wins by milliseconds); a few fresh images make one certain.
        for seed in range(5):
            data = media.noise_png(96, 64, seed=100 + seed)
            retries = stack.gateway.metric("internvl_gateway_missing_embeddings_retries_total")
            encoded = vision_total(stack, "internvl_vision_tiles_encoded_total")
            answer = chat(stack.stub, [image_part(data), text_part(question)], max_new_tokens=6)
            if stack.gateway.metric("internvl_gateway_missing_embeddings_retries_total") == retries + 1:
                break
        else:
            pytest.fail(f"no Generate was retried after {len(evictor.deleted)} evictions")
    assert answer.finish is not None and answer.finish.reason in (G.FINISH_REASON_STOP, G.FINISH_REASON_LENGTH)
    tiles = answer.finish.usage.image_tiles[0]
    assert answer.finish.usage.encoded_tiles == tiles
    # Encoded twice: once before the eviction, once by the gateway's retry.
    assert vision_total(stack, "internvl_vision_tiles_encoded_total") - encoded == 2 * tiles
    # The same answer as with the embeddings in place, now read from the cache.
    again = chat(stack.stub, [image_part(data), text_part(question)], max_new_tokens=6)
    assert again.token_ids == answer.token_ids
    assert again.finish.usage.reused_tiles == tiles and again.finish.usage.encoded_tiles == 0


# ------------------------------------------------------------------------------------ cancellation and deadline


LONG = 3000  # tokens: ~30 s of decoding on the tiny model, so only a cancellation ends these requests early


def long_request(text: str) -> G.ChatRequest:
    return G.ChatRequest(content=[text_part(text)], sampling=G.SamplingParams(max_new_tokens=LONG, top_k=1,
                                                                              temperature=1.0, seed=1))


def llm_cancelled_calls(stack) -> float:
    return stack.llm.metric("internvl_llm_requests_total", method="Generate", code="CANCELLED")


# A step of the tiny model takes milliseconds; the rest is the gauges' scrape interval and a loaded machine.
IDLE_AFTER_CANCEL_S = 5


def test_grpc_cancellation_stops_the_work(stack):
    cancelled = llm_finished(stack, "cancelled")
    llm_calls = llm_cancelled_calls(stack)
    gateway_cancelled = stack.gateway.metric("internvl_gateway_requests_total", method="Chat", code="CANCELLED")
    tokens = stack.llm.metric("internvl_llm_generated_tokens_total")
    call = stack.stub.Chat(long_request("Tell me a very long story."), timeout=120)
    deltas = 0
    for response in call:
        deltas += response.HasField("delta")
        if deltas == 3:
            call.cancel()
            break
    started = time.monotonic()
    stack.wait_idle(timeout_s=10)
    idle_s = time.monotonic() - started
    print(f"\nidle {idle_s:.2f} s after the gRPC cancel")
    assert idle_s < IDLE_AFTER_CANCEL_S
    assert llm_finished(stack, "cancelled") == cancelled + 1
    # Every hop saw the cancel as a cancel: the gateway's Chat and the LLM's Generate both ended CANCELLED.
    assert stack.gateway.metric("internvl_gateway_requests_total", method="Chat",
                                code="CANCELLED") == gateway_cancelled + 1
    assert llm_cancelled_calls(stack) == llm_calls + 1
    assert stack.llm.metric("internvl_llm_generated_tokens_total") - tokens < LONG / 4


def test_http_client_disconnect_stops_the_work(stack):
    cancelled = llm_finished(stack, "cancelled")
    llm_calls = llm_cancelled_calls(stack)
    method = "openai.chat_completions"
    gateway_cancelled = stack.gateway.metric("internvl_gateway_requests_total", method=method, code="CANCELLED")
    tokens = stack.llm.metric("internvl_llm_generated_tokens_total")
    body = json.dumps({"messages": [{"role": "user", "content": "Tell me an endless story."}],
                       "max_tokens": LONG, "temperature": 0, "stream": True})
    connection = http.client.HTTPConnection("127.0.0.1", stack.http_port, timeout=30)
    connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    chunks = 0
    while chunks < 4:
        line = response.readline()
        chunks += line.startswith(b"data: ")
    connection.sock.shutdown(2)  # the client goes away mid-stream
    connection.close()
    started = time.monotonic()
    stack.wait_idle(timeout_s=10)
    idle_s = time.monotonic() - started
    print(f"\nidle {idle_s:.2f} s after the HTTP disconnect")
    assert idle_s < IDLE_AFTER_CANCEL_S
    assert llm_finished(stack, "cancelled") == cancelled + 1
    assert stack.gateway.metric("internvl_gateway_requests_total", method=method,
                                code="CANCELLED") == gateway_cancelled + 1
    assert llm_cancelled_calls(stack) == llm_calls + 1
    assert stack.llm.metric("internvl_llm_generated_tokens_total") - tokens < LONG / 4


def test_deadline_expiry_stops_the_work(stack):
    cancelled = llm_finished(stack, "cancelled")
    tokens = stack.llm.metric("internvl_llm_generated_tokens_total")
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        for _ in stack.stub.Chat(long_request("Count to a million."), timeout=1.5):
            pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5
    stack.wait_idle(timeout_s=10)
    assert llm_finished(stack, "cancelled") == cancelled + 1
    assert stack.llm.metric("internvl_llm_generated_tokens_total") - tokens < LONG / 4


# ------------------------------------------------------------------------------------------------ internal errors


def test_an_internal_error_leaks_nothing(stack):
    """A value of the wrong Redis type under an embedding key makes the LLM service's read fail in a way no code
    expects: the caller gets INTERNAL "internal error", the traceback stays in the service's log."""
    data = media.noise_png(80, 60, seed=200)
    content = [image_part(data), text_part("What is it?")]
    before = set(stack.embedding_keys())
    chat(stack.stub, content)
    [key] = set(stack.embedding_keys()) - before
    with contextlib.closing(stack.redis.client()) as client:
        client.delete(key)
        client.rpush(key, b"not an embedding")
        with pytest.raises(grpc.RpcError) as info:
            chat(stack.stub, content)
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert info.value.details() == "internal error"
        assert "Traceback" in stack.llm.log_text() and "WRONGTYPE" in stack.llm.log_text()

        url = "data:image/png;base64," + base64.b64encode(data).decode()
        connection = http.client.HTTPConnection("127.0.0.1", stack.http_port, timeout=30)
        connection.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"},
                           body=json.dumps({"max_tokens": 2, "messages": [{"role": "user", "content": [
                               {"type": "text", "text": "What is it?"}, {"type": "image_url",
                                                                         "image_url": {"url": url}}]}]}))
        response = connection.getresponse()
        reply = json.loads(response.read())
        connection.close()
        assert response.status == 500 and reply["error"]["message"] == "internal error", reply
        assert_no_leak(json.dumps(reply))
        client.delete(key)
    # Served again once the bad value is gone (re-encoded).
    assert chat(stack.stub, content).finish.usage.encoded_tiles >= 1


# ------------------------------------------------------------------------------------------------- Redis restart


def test_redis_restart_under_load(stack):
    images = [media.noise_png(64, 48, seed=300 + i) for i in range(6)]
    outage_s, run_s = 3.5, 10.0
    first_attempt: list[str] = []
    retried: list[int] = []
    failures: list[str] = []
    stop_at = time.monotonic() + run_s

    def worker(n: int) -> None:
        i = 0
        while time.monotonic() < stop_at:
            content = ([image_part(images[(n + i) % len(images)])] if i % 2 == 0 else []) + [
                text_part(f"Worker {n}, request {i}: what now?")]
            for attempt in range(60):
                try:
                    answer = chat(stack.stub, content, timeout=30)
                except grpc.RpcError as exc:
                    if attempt == 0:
                        first_attempt.append(exc.code().name)
                    if exc.code() != UNAVAILABLE:
                        failures.append(f"{exc.code().name}: {exc.details()}")
                        break
                    time.sleep(0.25)
                    continue
                if answer.finish is None:
                    failures.append("a stream ended without its finish message")
                if attempt == 0:
                    first_attempt.append("OK")
                else:
                    retried.append(attempt)
                break
            else:
                failures.append("still UNAVAILABLE after 60 attempts")
            i += 1

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(2.0)
    stack.redis.kill()
    time.sleep(outage_s)
    stack.redis.restart()
    for thread in threads:
        thread.join(60)
    print(f"redis restart: first attempts {sorted(set(first_attempt))} "
          f"({first_attempt.count('OK')} OK of {len(first_attempt)}), {len(retried)} requests needed retries "
          f"(at most {max(retried, default=0)})")
    assert not failures, failures
    assert set(first_attempt) <= {"OK", "UNAVAILABLE"}
    # Every service is the same process as before: they reconnected by themselves.
    assert all(service.process.poll() is None for service in stack.services)
    stack.wait_idle()
    # After the restart (every key lost): a new image, a new session and its next round, first time.
    fresh = chat(stack.stub, [image_part(media.noise_png(seed=399)), text_part("And now?")])
    assert fresh.finish.usage.encoded_tiles >= 1
    follow = chat(stack.stub, [text_part("Go on.")], session_id=fresh.finish.session_id)
    assert follow.finish.session_id == fresh.finish.session_id
    assert metric(stack.gateway.metrics(), "internvl_gateway_in_flight_requests", method="Chat") == 0
