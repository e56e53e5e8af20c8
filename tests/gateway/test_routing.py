"""The routing function alone: rendezvous preference, keys moved by a change of membership, the load bound, failover;
the routing key of a conversation; target parsing; a pool discovering replicas by DNS and following their health."""

from __future__ import annotations

import asyncio
import collections
import itertools
import math
import random

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gateway.endpoints import EndpointPool, parse_target
from gateway.routing import Policy, Reason, Router, choose, load_bound, preference
from services.contract.conversation import Conversation, GenerateRequest, ImageRef, Turn, VideoRef
from services.contract.errors import InvalidArgumentError, NotReadyError

KEYS = [f"conversation-{i}".encode() for i in range(10_000)]
THREE = ["10.0.0.1:50053", "10.0.0.2:50053", "10.0.0.3:50053"]
FOUR = [*THREE, "10.0.0.4:50053"]


def first_choices(addresses):
    return {key: preference(key, addresses)[0] for key in KEYS}


def test_preference_is_a_function_of_key_and_addresses_only():
    assert preference(b"k", THREE) == preference(b"k", list(reversed(THREE)))
    assert sorted(preference(b"k", THREE)) == sorted(THREE)
    spread = collections.Counter(first_choices(THREE).values())
    # Rendezvous hashing spreads keys evenly: each of 3 endpoints is first for about a third of them.
    assert all(abs(count / len(KEYS) - 1 / 3) < 0.03 for count in spread.values()), spread


def test_adding_a_fourth_endpoint_moves_about_a_quarter_of_the_keys_all_to_it():
    before, after = first_choices(THREE), first_choices(FOUR)
    moved = [key for key in KEYS if before[key] != after[key]]
    assert 0.15 <= len(moved) / len(KEYS) <= 0.35
    assert {after[key] for key in moved} == {FOUR[3]}


def test_removing_an_endpoint_moves_only_its_keys():
    before, after = first_choices(FOUR), first_choices(THREE)
    moved = [key for key in KEYS if before[key] != after[key]]
    assert moved and all(before[key] == FOUR[3] for key in moved)
    assert all(after[key] == preference(key, FOUR)[1] for key in moved)


def test_affinity_when_idle():
    key = KEYS[0]
    choice = choose(key, dict.fromkeys(THREE, 0), THREE, 0.25)
    assert (choice.address, choice.reason) == (preference(key, THREE)[0], Reason.AFFINITY)


def test_not_ready_first_choice_fails_over_to_the_next_and_back():
    key = KEYS[1]
    first, second, _ = preference(key, THREE)
    ready = {a: 0 for a in THREE if a != first}
    choice = choose(key, ready, THREE, 0.25)
    assert (choice.address, choice.reason) == (second, Reason.FAILOVER)
    # Back again: the key returns to its first choice.
    assert choose(key, dict.fromkeys(THREE, 0), THREE, 0.25).address == first


def test_excluded_endpoints_are_skipped_and_none_ready_is_none():
    key = KEYS[2]
    order = preference(key, THREE)
    assert choose(key, dict.fromkeys(THREE, 0), THREE, 0.25, exclude={order[0]}).address == order[1]
    assert choose(key, {}, THREE, 0.25) is None


def test_an_endpoint_over_the_bound_is_passed_over_for_the_next_choice():
    key = KEYS[3]
    first, second, third = preference(key, THREE)
    loads = {first: 3, second: 0, third: 0}  # bound ceil(1.25 * 4 / 3) + 1 = 3: first would carry 4
    choice = choose(key, loads, THREE, 0.25)
    assert (choice.address, choice.reason) == (second, Reason.OVERLOAD)
    assert load_bound(loads, 0.25) == 3
    # One call over its share is within the slack: the key stays where its cache is.
    assert choose(key, {first: 2, second: 0, third: 0}, THREE, 0.25).address == first


@pytest.mark.parametrize("epsilon", [0.0, 0.25, 1.0])
def test_the_load_bound_holds_under_a_skewed_key_distribution(epsilon):
    """Calls arrive for a few hot keys (Zipf-like) and stay in flight; no endpoint ever exceeds the bound."""
    rng = random.Random(7)
    hot = KEYS[:20]
    weights = [1 / (rank + 1) ** 1.5 for rank in range(len(hot))]
    loads = dict.fromkeys(FOUR, 0)
    for calls in range(1, 401):
        choice = choose(rng.choices(hot, weights)[0], loads, FOUR, epsilon)
        loads[choice.address] += 1
        assert max(loads.values()) <= math.ceil((1 + epsilon) * calls / len(FOUR)) + 1
        if rng.random() < 0.3:  # some calls finish
            busiest = max(loads, key=loads.get)
            loads[busiest] -= 1


def test_round_robin_cycles_over_ready_endpoints():
    router = Router(_FakePool(dict.fromkeys(THREE, 0)), "LLM", Policy.ROUND_ROBIN, 0.25)
    picks = [router.pick(KEYS[0]) for _ in range(6)]
    assert sorted(picks[:3]) == sorted(THREE) and picks[:3] == picks[3:]


def test_router_records_reasons_falls_back_to_excluded_and_says_when_nothing_is_ready():
    reasons = []
    pool = _FakePool(dict.fromkeys(THREE[:1], 0), known=THREE)
    router = Router(pool, "LLM", Policy.AFFINITY, 0.25, record=reasons.append)
    # The only ready replica already failed this call: with no other, it is tried again.
    assert router.pick(KEYS[4], exclude={THREE[0]}) == THREE[0]
    assert reasons
    pool.loads = {}
    with pytest.raises(NotReadyError, match="no LLM replica ready"):
        router.pick(KEYS[4])


class _FakePool:
    def __init__(self, loads, known=None):
        self.loads = loads
        self.endpoints = dict.fromkeys(known or loads)

    def ready_loads(self):
        return dict(self.loads)

    def unavailable(self, what):
        return NotReadyError(f"no {what} replica ready")


# ------------------------------------------------------------------------------------------------ routing key


IMAGE = ImageRef("ns:emb:v1:aaaa", 5)


def test_every_turn_of_a_conversation_has_the_key_of_its_first_turn():
    turn1 = Conversation(("<image>\nDescribe.", IMAGE), (), None)
    turn2 = Conversation(("And the colours?",), (Turn(turn1.user_parts, "A cat."),), None)
    turn3 = Conversation(("Why?",), (*turn2.history, Turn(turn2.user_parts, "Grey.")), None)
    assert turn1.prefix_identity() == turn2.prefix_identity() == turn3.prefix_identity()


def test_the_key_depends_on_the_system_message_text_and_images():
    base = Conversation(("Describe.", IMAGE), (), None)
    others = [Conversation(("Describe.", IMAGE), (), ""),
              Conversation(("Describe.", IMAGE), (), "You are terse."),
              Conversation(("Describe!", IMAGE), (), None),
              Conversation(("Describe.", ImageRef("ns:emb:v1:bbbb", 5)), (), None),
              Conversation(("Describe.", VideoRef((IMAGE,))), (), None)]
    keys = {base.prefix_identity(), *(c.prefix_identity() for c in others)}
    assert len(keys) == 1 + len(others)
    # Identical first turns of two users share the key (and their prompts share that prefix).
    assert Conversation(("Describe.", IMAGE), (), None).prefix_identity() == base.prefix_identity()


def test_the_key_depends_on_the_adapter():
    """A prefix computed by one adapter is no prefix for another: the same first turn routes by its adapter."""
    keys = {Conversation(("Describe.", IMAGE), (), None, adapter).prefix_identity() for adapter in ("", "a", "b")}
    assert len(keys) == 3
    turn2 = Conversation(("Why?",), (Turn(("Describe.", IMAGE), "A cat."),), None, "a")
    assert turn2.prefix_identity() == Conversation(("Describe.", IMAGE), (), None, "a").prefix_identity()


def test_the_key_depends_on_the_cache_salt_and_the_salt_travels():
    """Tenants of other salts hold no KV for each other: the same first turn routes by its salt too, and the salt
    reaches the LLM service (GenerateStart.cache_salt) to scope its prefix cache."""
    keys = {Conversation(("Describe.", IMAGE), (), None, cache_salt=salt).prefix_identity() for salt in ("", "a", "b")}
    assert len(keys) == 3
    assert (Conversation(("Describe.", IMAGE), (), None, "a").prefix_identity()
            != Conversation(("Describe.", IMAGE), (), None, cache_salt="a").prefix_identity())
    salted = Conversation(("Describe.", IMAGE), (Turn(("Hi",), "Hello."),), None, "lora", "s1")
    start = GenerateRequest(salted).to_pb()
    assert start.cache_salt == "s1" and GenerateRequest.from_pb(start).conversation == salted


# ------------------------------------------------------------------------------------------------- targets


@pytest.mark.parametrize(("target", "hosts"), [
    ("dns:///llm-headless:50053", [("llm-headless", 50053)]),
    ("dns://10.0.0.10/llm-headless:50053", [("llm-headless", 50053)]),
    ("dns:llm:1", [("llm", 1)]),
    ("ipv4:127.0.0.1:1,127.0.0.1:2", [("127.0.0.1", 1), ("127.0.0.1", 2)]),
    ("ipv6:[::1]:50053,[fd00::2]:50053", [("::1", 50053), ("fd00::2", 50053)]),
    ("localhost:50053", [("localhost", 50053)]),
])
def test_target_forms(target, hosts):
    assert parse_target(target) == hosts


@pytest.mark.parametrize("target", ["", "llm", "ipv4:", "dns:///llm", "llm:0", "llm:99999", "ipv4:1.2.3.4:x"])
def test_malformed_targets_are_refused_naming_the_target(target):
    with pytest.raises(InvalidArgumentError, match="target"):
        parse_target(target)


# ----------------------------------------------------------------------------------------------------- pool


async def _health_server(serving: bool):
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    await servicer.set("svc", status)
    return server, servicer, port


@pytest.mark.asyncio
async def test_pool_resolves_a_name_and_follows_each_replicas_health():
    server, servicer, port = await _health_server(serving=False)
    changes = []
    pool = EndpointPool("llm", f"dns:///localhost:{port}", "svc",
                        lambda target, host: grpc.aio.insecure_channel(target), resolve_interval_s=0.2,
                        health_interval_s=0.05, on_change=lambda p: changes.append(dict(p.ready_loads())))
    try:
        await pool.start()
        await pool.wait_checked(5)
        address = f"127.0.0.1:{port}"
        assert address in pool.endpoints
        assert pool.ready_loads() == {}
        await servicer.set("svc", health_pb2.HealthCheckResponse.SERVING)
        for _ in itertools.repeat(None, 100):
            if pool.ready_loads():
                break
            await asyncio.sleep(0.05)
        assert pool.ready_loads() == {address: 0}
        with pool.call(address):
            assert pool.ready_loads() == {address: 1}
        await server.stop(0)
        for _ in itertools.repeat(None, 100):
            if not pool.ready_loads():
                break
            await asyncio.sleep(0.05)
        assert pool.ready_loads() == {}
        assert "none serving" in str(pool.unavailable("LLM"))
    finally:
        await pool.close()
        await server.stop(0)


@pytest.mark.asyncio
async def test_a_target_that_resolves_to_nothing_says_so():
    pool = EndpointPool("llm", "dns:///no-such-host.invalid:50053", "svc",
                        lambda target, host: grpc.aio.insecure_channel(target))
    try:
        await pool.start()
        assert pool.endpoints == {}
        error = pool.unavailable("LLM")
        assert "no LLM replica ready" in str(error) and "dns:///no-such-host.invalid:50053 resolves to no address" \
            in str(error)
    finally:
        await pool.close()


@pytest.mark.asyncio
async def test_replicas_that_appear_in_dns_are_used_and_the_gateway_follows_readiness():
    """The name first resolves to nothing (gateway NOT_SERVING, naming the target), then to a serving replica."""
    from gateway.server import _follow_pools

    server, _, port = await _health_server(serving=True)
    addresses: list[str] = []

    async def resolve(host, port):
        return list(addresses)

    pool = EndpointPool("llm", f"dns:///llm-headless:{port}", "svc",
                        lambda target, host: grpc.aio.insecure_channel(target), resolve_interval_s=0.05,
                        health_interval_s=0.05, resolve=resolve)
    states = []

    class Server:
        async def mark_ready(self):
            states.append("SERVING")

        async def mark_not_ready(self):
            states.append("NOT_SERVING")

    follow = None
    try:
        await pool.start()
        assert "llm-headless" in str(pool.unavailable("LLM")) and "resolves to no address" in str(
            pool.unavailable("LLM"))
        follow = asyncio.ensure_future(_follow_pools(Server(), pool, interval_s=0.05))
        for _ in itertools.repeat(None, 100):
            if states:
                break
            await asyncio.sleep(0.02)
        assert states == ["NOT_SERVING"]
        addresses.append("127.0.0.1")
        for _ in itertools.repeat(None, 200):
            if states[-1] == "SERVING":
                break
            await asyncio.sleep(0.02)
        assert states == ["NOT_SERVING", "SERVING"]
        assert pool.ready_loads() == {f"127.0.0.1:{port}": 0}
    finally:
        if follow is not None:
            follow.cancel()
        await pool.close()
        await server.stop(0)


@pytest.mark.asyncio
async def test_a_replica_serving_another_model_gets_no_calls():
    (server_a, _, port_a), (server_b, _, port_b) = await _health_server(True), await _health_server(True)
    models = {f"ipv4:127.0.0.1:{port_a}": "model-a", f"ipv4:127.0.0.1:{port_b}": "model-b"}
    channels = {}

    def channel(target, host):
        channels[target] = grpc.aio.insecure_channel(target)
        return channels[target]

    async def fingerprint(replica):
        return next(models[t] for t, c in channels.items() if c is replica)

    pool = EndpointPool("llm", f"ipv4:127.0.0.1:{port_a}", "svc", channel, health_interval_s=0.05,
                        fingerprint=fingerprint)
    try:
        await pool.start()
        await pool.wait_checked(5)
        assert pool.ready_loads() == {f"127.0.0.1:{port_a}": 0} and pool.model == "model-a"
        # The other replica joins (as a scaled-up pod would): it is known, but never ready.
        pool.hosts.append(("127.0.0.1", port_b))
        await pool.refresh()
        await pool.wait_checked(5)
        await asyncio.sleep(0.2)
        assert f"127.0.0.1:{port_b}" in pool.endpoints
        assert pool.ready_loads() == {f"127.0.0.1:{port_a}": 0}
    finally:
        await pool.close()
        await server_a.stop(0)
        await server_b.stop(0)


def test_a_key_moved_by_the_load_bound_stays_where_it_went_but_one_moved_by_failover_returns():
    key = KEYS[5]
    first, second, _ = preference(key, THREE)
    pool = _FakePool(dict.fromkeys(THREE, 0) | {first: 3})
    router = Router(pool, "LLM", Policy.AFFINITY, 0.25)
    assert router.pick(key) == second  # overload: moved
    pool.loads = dict.fromkeys(THREE, 0)  # the burst is over; its latest prefix is on `second` now
    assert router.pick(key) == second
    pool.loads = dict.fromkeys(THREE, 0) | {second: 3}  # `second` is busy: back to the first choice, forgotten
    assert router.pick(key) == first
    pool.loads = dict.fromkeys(THREE, 0)
    assert router.pick(key) == first

    pool.loads = {a: 0 for a in THREE if a != first}  # first choice down: failover, not remembered
    assert router.pick(key) == second
    pool.loads = dict.fromkeys(THREE, 0)
    assert router.pick(key) == first
