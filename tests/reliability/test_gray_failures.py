"""Gray failures on real processes: replicas and a Redis that stop answering without dying (SIGSTOP, then SIGCONT).

One stack for the module: Redis, two vision replicas, two LLM replicas and a gateway whose timeouts are short so that
each test stays under a minute: a vision call attempt gives up after `ATTEMPT_S` (the README's 20 s default is meant
for a replica answering after 30 s; here a replica paused for `VISION_STOP_S`), a breaker opens on the first failure
and lets a probe through after `COOLDOWN_S`. Health checks are the gateway's fixed ones (every second, 2 s timeout).

* an LLM replica paused for 10 s: a Generate waiting for its first token there fails over to the other replica and is
  answered while the replica is still paused; a call with a short deadline ends at its deadline; the paused replica's
  breaker opens; once resumed, its conversation comes back to it (affinity) and its breaker closes;
* a vision replica paused: an Encode (or Lookup) sent to it gives up after the attempt timeout and the other replica
  answers; once resumed, the image's key comes back to it;
* Redis paused: a request with a new image (the embedding cache) and a text request (the session store) each fail
  UNAVAILABLE within a bounded time with a message naming Redis, not a hang; once resumed, all is answered again.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import grpc
import pytest
from helpers import media
from helpers.chat import chat, image_part, text_part
from internvl.gateway.v1 import gateway_pb2_grpc
from procs import redis_server, wait_for
from stack import start_services

from tools.launcher import Child, RedisServer

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]  # the first test also starts the stack

NAMESPACE = "relgray"
ATTEMPT_S = 6.0  # above Redis's 5 s reply timeout, so a paused Redis is named as the cause (as by default)
COOLDOWN_S = 2.0
LLM_STOP_S = 10.0
VISION_STOP_S = 14.0
GATEWAY = "internvl_gateway_"


@dataclass
class GrayStack:
    redis: RedisServer
    visions: list[Child]
    llms: list[Child]
    gateway: Child
    channel: grpc.Channel

    @property
    def stub(self) -> gateway_pb2_grpc.ChatServiceStub:
        return gateway_pb2_grpc.ChatServiceStub(self.channel)

    def gw(self, name: str, **labels: str) -> float:
        return self.gateway.metric(GATEWAY + name, **labels)

    def ready(self, pool: str) -> float:
        return self.gw("endpoints", pool=pool, state="ready")


@pytest.fixture(scope="module")
def stack(checkpoint):
    with contextlib.ExitStack() as stack:
        store = stack.enter_context(redis_server())
        common = ["--model", str(checkpoint), "--dtype", "float32", "--redis-url", store.url]
        services = start_services(stack, [*((f"vision-{i}", "vision", [*common, "--namespace", NAMESPACE])
                                            for i in range(2)),
                                          *((f"llm-{i}", "llm", common) for i in range(2))], timeout_s=300)
        visions, llms = services[:2], services[2:]
        [gateway] = start_services(stack, [("gateway", "gateway", [
            "--vision-target", "ipv4:" + ",".join(v.address for v in visions),
            "--llm-target", "ipv4:" + ",".join(llm.address for llm in llms),
            "--redis-url", store.url, "--namespace", NAMESPACE, "--http-port", "0",
            "--vision-attempt-timeout-s", str(ATTEMPT_S), "--circuit-failure-threshold", "1",
            "--circuit-cooldown-s", str(COOLDOWN_S)])])
        channel = stack.enter_context(grpc.insecure_channel(gateway.address))
        yield GrayStack(store, visions, llms, gateway, channel)


@contextlib.contextmanager
def paused(child: Child):
    """`child` stopped (SIGSTOP) for the block, resumed (SIGCONT) after it, whatever happens inside."""
    os.kill(child.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(child.pid, signal.SIGCONT)


def ok_count(child: Child, method: str) -> float:
    family = "internvl_llm_requests_total" if child.name.startswith("llm") else "internvl_vision_requests_total"
    return child.metric(family, method=method, code="OK")


def served_by(children: list[Child], method: str, ask, timeout_s: float = 10) -> tuple[object, Child]:
    """Runs `ask()` and names the one replica of `children` whose `method` count of OK calls went up."""
    before = [ok_count(c, method) for c in children]
    result = ask()
    deadline = time.monotonic() + timeout_s
    while True:  # a replica counts a call once its stream has closed, a moment after the caller has the answer
        grew = [c for c, b in zip(children, before, strict=True) if ok_count(c, method) > b]
        if grew or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(grew) == 1, [c.name for c in grew]
    return result, grew[0]


def in_thread(ask) -> tuple[threading.Thread, dict]:
    """`ask()` started in a thread; the dict gets `answer` or `error` (code, details) and `seconds`."""
    outcome: dict = {}

    def run() -> None:
        start = time.monotonic()
        try:
            outcome["answer"] = ask()
        except grpc.RpcError as exc:
            outcome["error"] = (exc.code(), exc.details())
        outcome["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def wait_both_ready(stack: GrayStack, pool: str) -> None:
    wait_for(lambda: stack.ready(pool) == 2, 15, f"the gateway to see both {pool} replicas ready again",
             interval_s=0.1)


def drop_embeddings(stack: GrayStack) -> None:
    """Every cached embedding deleted, so that the next request with an image encodes it again."""
    client = stack.redis.client()
    keys = stack.redis.scan_keys(f"{NAMESPACE}:emb:*")
    if keys:
        client.delete(*keys)


# ------------------------------------------------------------------------------------------------------------ LLM


def test_a_paused_llm_replica_is_routed_around_and_gets_its_conversation_back(stack):
    prompt = [text_part("Tell me about the sea.")]
    first, home = served_by(stack.llms, "Generate", lambda: chat(stack.stub, prompt, timeout=30))
    other = next(llm for llm in stack.llms if llm is not home)
    other_before = ok_count(other, "Generate")
    retries = stack.gw("upstream_retries_total", service="llm", method="Generate")
    with paused(home):
        stopped = time.monotonic()
        # Routed to the paused replica (its health checks have not failed yet) and waiting for its first token.
        thread, outcome = in_thread(lambda: chat(stack.stub, prompt, timeout=30))
        short, late = in_thread(lambda: chat(stack.stub, [text_part("Tell me about the sea.")], timeout=1.0))
        thread.join(LLM_STOP_S)
        answered_after = time.monotonic() - stopped
        short.join(LLM_STOP_S)
        # During the pause: both calls are over, and a new conversation is answered at once by the other replica.
        assert "answer" in outcome, outcome
        assert answered_after < LLM_STOP_S - 1, answered_after
        assert outcome["answer"].token_ids == first.token_ids  # the same greedy answer, from the other replica
        assert late.get("error", (None,))[0] == grpc.StatusCode.DEADLINE_EXCEEDED, late
        assert late["seconds"] < 3, late  # ended at its deadline, not when the replica came back
        start = time.monotonic()
        chat(stack.stub, [text_part("And about the mountains?")], timeout=10)
        assert time.monotonic() - start < 5
        assert stack.gw("upstream_retries_total", service="llm", method="Generate") > retries
        assert stack.gw("endpoint_circuit_state", pool="llm", endpoint=home.address) == 2  # open
        assert stack.ready("llm") == 1
        wait_for(lambda: ok_count(other, "Generate") >= other_before + 2, 5,
                 "the other replica to count both answers")
        time.sleep(max(0.0, LLM_STOP_S - (time.monotonic() - stopped)))
    wait_both_ready(stack, "llm")
    # Back: the conversation returns to its replica, whose breaker lets the probe through and closes.
    again, served = served_by(stack.llms, "Generate", lambda: chat(stack.stub, prompt, timeout=30))
    assert served is home and again.token_ids == first.token_ids
    assert stack.gw("endpoint_circuit_state", pool="llm", endpoint=home.address) == 0
    assert stack.gw("endpoint_circuit_transitions_total", pool="llm", endpoint=home.address, state="closed") >= 1


# --------------------------------------------------------------------------------------------------------- vision


def test_a_paused_vision_replica_times_out_per_attempt_and_gets_its_key_back(stack):
    image = media.noise_png(64, 64, seed=2500)

    def ask(timeout: float = 30):
        return chat(stack.stub, [image_part(image), text_part("Describe it.")], timeout=timeout)

    drop_embeddings(stack)
    first, home = served_by(stack.visions, "Encode", ask)
    other = next(v for v in stack.visions if v is not home)
    drop_embeddings(stack)
    encoded = ok_count(other, "Encode")
    with paused(home):
        stopped = time.monotonic()
        thread, outcome = in_thread(ask)
        thread.join(VISION_STOP_S)
        answered_after = time.monotonic() - stopped
        assert "answer" in outcome, outcome
        assert answered_after < VISION_STOP_S - 1, answered_after  # not waiting for the replica to come back
        assert outcome["answer"].token_ids == first.token_ids
        assert outcome["answer"].finish.usage.encoded_tiles >= 1
        wait_for(lambda: ok_count(other, "Encode") > encoded, 5, "the other replica's Encode to be counted")
        # A call went to the paused replica first (Encode by the image's key, or Lookup in turn) and was cut off by
        # the attempt timeout, not by the request's deadline.
        assert f"within {ATTEMPT_S:g} s" in stack.gateway.log_text()
        time.sleep(max(0.0, VISION_STOP_S - (time.monotonic() - stopped)))
    wait_both_ready(stack, "vision")
    drop_embeddings(stack)
    _, served = served_by(stack.visions, "Encode", ask)
    assert served is home


# ---------------------------------------------------------------------------------------------------------- Redis


def http_text(stack: GrayStack, text: str, timeout: float = 30) -> dict:
    body = json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": 4}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{stack.gateway.http_port}/v1/chat/completions", body,
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def test_a_paused_redis_fails_calls_in_bounded_time_naming_redis(stack):
    image = media.noise_png(64, 64, seed=2600)
    with paused(stack.redis):
        thread, outcome = in_thread(lambda: chat(stack.stub, [image_part(image), text_part("What is it?")],
                                                 timeout=60))
        thread.join(45)
        assert not thread.is_alive(), "a call hung on a paused Redis"
        code, details = outcome.get("error", (None, ""))
        assert code == grpc.StatusCode.UNAVAILABLE, outcome
        assert "Redis did not answer in time" in details and "retry later" in details, details
        assert outcome["seconds"] < 40, outcome
        # A text request needs no embedding, but every answer is recorded in the session store (Redis): 503 after
        # the reply timeout, naming it, rather than a hang.
        start = time.monotonic()
        with pytest.raises(urllib.error.HTTPError) as refused:
            http_text(stack, "Hello there.")
        assert time.monotonic() - start < 15
        assert refused.value.code == 503
        error = json.loads(refused.value.read())["error"]
        assert "session store is unreachable (Redis did not answer in time)" in error["message"], error
    # Resumed: the same request is answered (the clients reconnect by themselves).
    answer = wait_for(lambda: _answered(stack, image), 20, "a request with an image to be answered again",
                      interval_s=0.5)
    assert answer.finish.usage.encoded_tiles >= 1


def _answered(stack: GrayStack, image: bytes):
    try:
        return chat(stack.stub, [image_part(image), text_part("What is it?")], timeout=15)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
        return None

