"""The whole stack on a Redis Cluster: vision, LLM and gateway as real processes given a `redis+cluster://` URL of 3
masters with a replica each (1 s node timeout), on a stack of its own.

* one image, a session's second round (which reuses every tile) and a video answer exactly as on the package's
  single-redis-server stack (greedy, so token for token);
* a master SIGKILLed in the middle of a bounded run of image requests from a few threads: its replica is promoted,
  every request either succeeds or fails UNAVAILABLE (retryable) and then succeeds when sent again, and every request
  started after the promotion succeeds at its first attempt. The embeddings the dead master held are simply misses
  (encoded again), never errors.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from helpers import media
from helpers.chat import chat, image_part, text_part
from internvl.gateway.v1 import gateway_pb2 as G
from stack import running_stack

from tools.launcher import LocalRedisCluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

NAMESPACE = "relcluster"
MAX_NEW = 6
# A caller's retries of UNAVAILABLE in the failover test, 0.25 s apart.
RETRIES = 12


@pytest.fixture(scope="module")
def cluster_stack(checkpoint):
    with running_stack(checkpoint, vision_args=[(), ()], http=False, redis_cluster_masters=3,
                       redis_cluster_replicas=1, namespace=NAMESPACE) as running:
        assert isinstance(running.redis, LocalRedisCluster)
        yield running


def ask(stub, content, **fields):
    answer = chat(stub, content, timeout=60, max_new_tokens=MAX_NEW, **fields)
    assert answer.finish is not None
    return answer


def same(a, b) -> None:
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.finish.usage.prompt_tokens == b.finish.usage.prompt_tokens
    assert list(a.finish.usage.image_tiles) == list(b.finish.usage.image_tiles)


def test_one_image_answers_as_on_one_redis(cluster_stack, stack):
    content = [image_part(media.solid_png(900, 600, seed=11)), text_part("Describe the image.")]
    got, want = ask(cluster_stack.stub, content, max_num=4), ask(stack.stub, content, max_num=4)
    same(got, want)
    assert got.finish.usage.encoded_tiles + got.finish.usage.reused_tiles == sum(got.finish.usage.image_tiles) > 1
    # The embeddings were written to the cluster, spread by key over its masters.
    assert cluster_stack.embedding_keys()


def test_session_second_round_answers_as_on_one_redis(cluster_stack, stack):
    first = [image_part(media.noise_png(96, 64, seed=12)), text_part("What is in the picture?")]
    answers = []
    for running in (cluster_stack, stack):
        one = ask(running.stub, first, max_num=2)
        two = ask(running.stub, [text_part("Tell me more.")], session_id=one.finish.session_id)
        assert two.finish.session_id == one.finish.session_id
        assert two.finish.usage.encoded_tiles == 0
        assert two.finish.usage.reused_tiles == sum(two.finish.usage.image_tiles) > 0
        answers.append((one, two))
    (c1, c2), (s1, s2) = answers
    same(c1, s1)
    same(c2, s2)


def test_video_answers_as_on_one_redis(cluster_stack, stack):
    video = G.VideoInput(data=media.write_video(frames=12, seed=13), num_segments=4)
    content = [G.ContentPart(video=video), text_part("What happens in the video?")]
    got, want = ask(cluster_stack.stub, content), ask(stack.stub, content)
    same(got, want)
    assert list(got.finish.usage.image_tiles) == [1, 1, 1, 1]


def test_master_killed_mid_run_fails_over(cluster_stack):
    """Bounded: 4 threads send single-image requests (a new image each, so each is encoded, written to Redis and
    read back by the LLM) until 4 s after the promotion, 160 requests at most; a master is killed after the first 8."""
    cluster = cluster_stack.redis
    threads, cap, settle_s = 4, 160, 4.0
    outcomes: list[tuple[float, str, float]] = []  # (start, first attempt's status, its seconds)
    retried: list[int] = []
    failures: list[str] = []
    lock = threading.Lock()
    counter = iter(range(cap))
    promoted_at: list[float] = []

    def running() -> bool:
        return not promoted_at or time.monotonic() < promoted_at[0] + settle_s

    def worker() -> None:
        while running():
            with lock:
                n = next(counter, None)
            if n is None:
                return
            content = [image_part(media.noise_png(64, 48, seed=1000 + n)), text_part(f"Request {n}: what is it?")]
            start = time.monotonic()
            for attempt in range(RETRIES):
                try:
                    chat(cluster_stack.stub, content, timeout=60, max_new_tokens=2)
                except grpc.RpcError as exc:
                    if attempt == 0:
                        outcomes.append((start, exc.code().name, time.monotonic() - start))
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        failures.append(f"request {n}: {exc.code().name}: {exc.details()}")
                        break
                    time.sleep(0.25)
                    continue
                if attempt == 0:
                    outcomes.append((start, "OK", time.monotonic() - start))
                else:
                    retried.append(attempt)
                break
            else:
                failures.append(f"request {n}: still UNAVAILABLE after {RETRIES} attempts")

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    deadline = time.monotonic() + 60
    while len(outcomes) < 8 and time.monotonic() < deadline:
        time.sleep(0.02)
    victim = cluster.masters()[0]
    [replica] = cluster.replicas_of(victim)
    killed = time.monotonic()
    cluster.kill(victim)
    while not (cluster.role(replica)[:1] == ["master"] and cluster.healthy()):
        assert time.monotonic() - killed < 20, "the replica was not promoted"
        time.sleep(0.05)
    promoted_at.append(time.monotonic())
    for thread in pool:
        thread.join(120)

    promoted = promoted_at[0] - killed
    first = [status for _, status, _ in outcomes]
    after = [status for start, status, _ in outcomes if start > promoted_at[0]]
    slowest = max(seconds for _, _, seconds in outcomes)
    print(f"redis cluster failover: replica promoted {promoted:.2f}s after the kill; {len(outcomes)} requests, "
          f"first attempts {first.count('OK')} OK, {first.count('UNAVAILABLE')} UNAVAILABLE "
          f"({len(retried)} needed retries, at most {max(retried, default=0)}); slowest first attempt "
          f"{slowest:.2f}s; {len(after)} started after the promotion")
    assert replica in cluster.masters() and victim not in cluster.masters()
    assert not failures, failures
    assert set(first) <= {"OK", "UNAVAILABLE"}, first
    assert after and set(after) == {"OK"}, after
    assert all(service.process.poll() is None for service in cluster_stack.services)
