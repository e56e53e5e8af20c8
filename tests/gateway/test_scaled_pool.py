"""Scale-out end to end: Redis, two vision replicas, three LLM replicas and four gateways as real processes.

Gateways `a` and `b` route by affinity over all three LLM replicas, `rr` round-robins over them, `single` sees only
the first replica. Conversations of three turns with an image (gRPC sessions, and stateless OpenAI conversations
that resend their history) must find their earlier turns in the prefix KV cache (`cached_prompt_tokens` covering
the previous turn's prompt) when routed by affinity, from either gateway, and lose it with round_robin; every answer
must equal the single-replica answer token for token. Killing a replica moves only its conversations, and restarting
it gives them back. Two gateways encoding the same new image at the same moment run the encoder once for it.
"""

from __future__ import annotations

import threading
import time

import pytest
from helpers.pool import (
    TURNS,
    Pool,
    grpc_turn,
    http_conversation,
    picture,
    prefix_hits,
    running_pool,
    session_turns,
)
from internvl.gateway.v1 import gateway_pb2 as G
from procs import wait_serving

from services.contract.tiling import count_tiles
from tools.launcher import metric

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

SESSIONS = 12


@pytest.fixture(scope="module")
def pool(tiny_checkpoint):
    gateways = {"a": ["--llm-target", "{llms}", "--http-port", "0"],
                "b": ["--llm-target", "{llms}"],
                "rr": ["--llm-target", "{llms}", "--llm-routing", "round_robin"],
                "single": ["--llm-target", "{llm0}"]}
    with running_pool(tiny_checkpoint(), visions=2, llms=3, gateways=gateways) as running:
        yield running


@pytest.fixture(scope="module")
def affinity_sessions(pool):
    """12 sessions; turns alternate between gateways a and b (their routing must agree)."""
    before = pool.generate_counts()
    sessions = [session_turns(pool, seed, ("a", "b", "a")) for seed in range(SESSIONS)]
    served = pool.served_since(before, SESSIONS * len(TURNS))
    return sessions, served


def test_affinity_keeps_each_sessions_prefix_across_two_gateways(affinity_sessions):
    sessions, served = affinity_sessions
    assert prefix_hits(sessions) >= 0.95
    assert sum(served) == SESSIONS * len(TURNS)
    # Spread over the pool: 12 conversations' keys leave one of 3 replicas without any 2.3% of the time (3 (2/3)^12),
    # all on one replica 6e-6 of the time.
    assert sum(count > 0 for count in served) >= 2, f"one replica served everything: {served}"


def test_round_robin_loses_the_prefix_and_answers_the_same(pool, affinity_sessions):
    sessions, _ = affinity_sessions
    rr = [session_turns(pool, seed, ("rr", "rr", "rr")) for seed in range(SESSIONS)]
    assert prefix_hits(rr) < 0.5, "round_robin should rarely land a turn where its prefix is"
    assert [[t.token_ids for t in s] for s in rr] == [[t.token_ids for t in s] for s in sessions]


def test_every_answer_equals_the_single_replica_answer(pool, affinity_sessions):
    sessions, _ = affinity_sessions
    single = [session_turns(pool, seed, ("single", "single", "single")) for seed in range(SESSIONS)]
    assert [[t.token_ids for t in s] for s in single] == [[t.token_ids for t in s] for s in sessions]
    assert prefix_hits(single) >= 0.95


def test_stateless_openai_conversations_keep_their_prefix(pool):
    before = pool.generate_counts()
    conversations = [http_conversation(pool, seed) for seed in range(SESSIONS)]
    served = pool.served_since(before, SESSIONS * len(TURNS))
    assert prefix_hits(conversations) >= 0.95
    # Spread over the pool: 12 conversations' keys leave one of 3 replicas without any 2.3% of the time (3 (2/3)^12),
    # all on one replica 6e-6 of the time.
    assert sum(count > 0 for count in served) >= 2, f"one replica served everything: {served}"


def test_two_gateways_encoding_one_new_image_at_once_encode_it_once(pool):
    for seed in range(4):
        data = picture(5000 + seed)
        barrier, results = threading.Barrier(2), {}
        before = pool.tiles_encoded()

        def ask(gateway: str, data=data, barrier=barrier, results=results) -> None:
            barrier.wait()
            results[gateway] = grpc_turn(pool.stub(gateway), [G.ContentPart(image=G.ImageInput(data=data)),
                                                             G.ContentPart(text="What is it?")])

        threads = [threading.Thread(target=ask, args=(name,)) for name in ("a", "b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert set(results) == {"a", "b"}
        # Encoded once for both gateways.
        assert pool.tiles_encoded() - before == count_tiles(500, 300)


def _served_by(pool: Pool, ask) -> tuple[object, int]:
    """Runs `ask()` and says which LLM replica served its one Generate."""
    before = pool.generate_counts()
    result = ask()
    delta = pool.served_since(before, 1)
    assert sorted(delta) == [0, 0, 1], delta
    return result, delta.index(1)


def test_killing_a_replica_moves_only_its_conversations_and_restarting_gives_them_back(pool):
    """Runs last in this module: it kills and restarts a replica."""
    stub = pool.stub("a")
    seeds = range(100, 100 + SESSIONS)
    first = {}
    for seed in seeds:
        image = G.ContentPart(image=G.ImageInput(data=picture(seed)))
        first[seed] = _served_by(pool, lambda image=image: grpc_turn(stub, [image, G.ContentPart(text=TURNS[0])]))
    homes = {seed: replica for seed, (_, replica) in first.items()}
    victim = max(range(3), key=lambda r: sum(home == r for home in homes.values()))
    assert any(home == victim for home in homes.values())

    pool.llms[victim].kill()
    second = {seed: _served_by(pool, lambda seed=seed: grpc_turn(stub, [G.ContentPart(text=TURNS[1])],
                                                                 first[seed][0].session_id))
              for seed in seeds}
    for seed, (turn, replica) in second.items():
        if homes[seed] == victim:
            assert replica != victim
            assert turn.cached_prompt_tokens < first[seed][0].prompt_tokens  # one full prefill elsewhere
        else:
            assert replica == homes[seed], "a conversation of a live replica moved"
            assert turn.cached_prompt_tokens >= first[seed][0].prompt_tokens

    pool.llms[victim].restart()
    wait_serving([pool.llms[victim]])
    _wait_routable(pool, victim)
    third = {seed: _served_by(pool, lambda seed=seed: grpc_turn(stub, [G.ContentPart(text=TURNS[2])],
                                                                first[seed][0].session_id))
             for seed in seeds}
    assert {seed: replica for seed, (_, replica) in third.items()} == homes


def _wait_routable(pool: Pool, replica: int, timeout_s: float = 30) -> None:
    """Until gateway a's metrics show every LLM replica ready again (its health loop checks each second)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = pool.gateways["a"].metrics()
        if metric(text, "internvl_gateway_endpoints", pool="llm", state="ready") == 3:
            return
        time.sleep(0.2)
    raise AssertionError(f"LLM replica {replica} not ready at the gateway after {timeout_s}s")
