"""Scale-out on the vLLM engine: Redis, a vision replica, three LLM replicas on vLLM and three gateways as real
processes (make-tiny's `small` shape: vLLM's CPU attention needs a head size of 32).

Gateways `a` and `b` route by affinity over the three replicas, `single` sees only the first. Conversations of three
turns with an image (gRPC sessions whose turns alternate between `a` and `b`, and stateless OpenAI conversations that
resend their history) must find their earlier turns in vLLM's prefix cache, as on the transformers engine
(tests/gateway/test_scaled_pool.py): at least 95% of later turns. vLLM caches whole blocks of 128 tokens, so a
later turn counts as a hit when its cached prompt covers every whole block of the previous turn's prompt (a prompt
of 1,000 tokens: its first 896); the transformers engine's bar is the whole previous prompt. Every answer equals the
single-replica answer token for token.
"""

from __future__ import annotations

import pytest
from helpers.pool import TURNS, http_conversation, prefix_hits, running_pool, session_turns

from services.model.tiny import make_tiny

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

SESSIONS = 12
BLOCK = 128  # vLLM's KV block on a CPU: the unit its prefix cache hits in
# Each replica's KV pool (32 MiB: running sequences and the prefix cache share it; thousands of tokens of the small
# shape, so no session's prefix is evicted here) and context, instead of 80% of the free memory each.
VLLM_FLAGS = ("--engine", "vllm", "--kv-budget-mb", "16", "--kv-cache-budget-mb", "16", "--max-context-tokens", "4096")


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    checkpoint = make_tiny(tmp_path_factory.mktemp("vllm-pool") / "small-qwen2", llm="qwen2", vision="300m",
                           preset="small")
    gateways = {"a": ["--llm-target", "{llms}", "--http-port", "0"], "b": ["--llm-target", "{llms}"],
                "single": ["--llm-target", "{llm0}"]}
    with running_pool(checkpoint, visions=1, llms=3, gateways=gateways, llm_args=VLLM_FLAGS) as running:
        yield running


@pytest.fixture(scope="module")
def affinity_sessions(pool):
    """12 sessions; turns alternate between gateways a and b (their routing must agree)."""
    before = pool.generate_counts()
    sessions = [session_turns(pool, seed, ("a", "b", "a")) for seed in range(SESSIONS)]
    return sessions, pool.served_since(before, SESSIONS * len(TURNS))


def assert_blocks_to_hit(conversations) -> None:
    """Every earlier turn's prompt holds whole blocks, so the hit rule asks for a cached prefix, never for 0."""
    assert all(turn.prompt_tokens >= BLOCK for turns in conversations for turn in turns[:-1])


def test_affinity_keeps_each_sessions_prefix_in_vllms_cache_across_two_gateways(affinity_sessions):
    sessions, served = affinity_sessions
    assert_blocks_to_hit(sessions)
    assert prefix_hits(sessions, BLOCK) >= 0.95
    assert all(turn.cached_prompt_tokens % BLOCK == 0 for turns in sessions for turn in turns)
    assert sum(served) == SESSIONS * len(TURNS)
    # Spread over the pool: 12 conversations' keys leave one of 3 replicas without any 2.3% of the time (3 (2/3)^12),
    # all on one replica 6e-6 of the time.
    assert sum(count > 0 for count in served) >= 2, f"one replica served everything: {served}"


def test_every_answer_equals_the_single_replica_answer(pool, affinity_sessions):
    sessions, _ = affinity_sessions
    single = [session_turns(pool, seed, ("single", "single", "single")) for seed in range(SESSIONS)]
    assert [[t.token_ids for t in s] for s in single] == [[t.token_ids for t in s] for s in sessions]
    assert prefix_hits(single, BLOCK) >= 0.95


def test_stateless_openai_conversations_keep_their_prefix(pool):
    before = pool.generate_counts()
    conversations = [http_conversation(pool, seed) for seed in range(SESSIONS)]
    served = pool.served_since(before, SESSIONS * len(TURNS))
    assert_blocks_to_hit(conversations)
    assert prefix_hits(conversations, BLOCK) >= 0.95
    assert sum(count > 0 for count in served) >= 2, f"one replica served everything: {served}"
