"""Tenants on real processes: Redis, a vision service and the LLM service, and two gateways on them with the same
API-key file, one with the defaults (prefix KV cache and embeddings scoped per tenant) and one with
`--shared-prefix-cache --shared-embedding-cache`.

Each tenant's session ids are its own (another's is NOT_FOUND, as a missing one); tenant B's identical request after
A's finds nothing of A's cached by default and finds it with the shared flags; a tenant over its rate is refused
(HTTP 429 with Retry-After, gRPC RESOURCE_EXHAUSTED with retry-after) while another is served; the tenant is on the
gateway's log lines and per-tenant metrics.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import urllib.error
import urllib.request
import uuid
from types import SimpleNamespace

import grpc
import pytest
from helpers import media
from helpers.chat import chat, image_part, text_part
from internvl.gateway.v1 import gateway_pb2_grpc
from procs import redis_server
from stack import start_services

from tools.launcher import metric

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]
# cache-a and cache-b send nothing but the default-scope cache test's requests, so nothing else of theirs is cached.
KEYS = {name: f"{name}-{secrets.token_urlsafe(16)}"
        for name in ("alpha", "beta", "cache-a", "cache-b", "metered", "metered-grpc")}
# One request, then one per 50 s: the second of a test is refused however slow the machine.
METERED = {"rate": 0.02, "burst": 1}


@pytest.fixture(scope="module")
def tenants_stack(checkpoint, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("tenants") / "keys.json"
    keys_file.write_text(json.dumps({"tenants": {
        **{name: {"keys": [KEYS[name]]} for name in ("alpha", "beta", "cache-a", "cache-b")},
        "metered": {"keys": [KEYS["metered"]], **METERED}, "metered-grpc": {"keys": [KEYS["metered-grpc"]], **METERED},
    }}))
    with contextlib.ExitStack() as stack:
        store = stack.enter_context(redis_server())
        common = ["--model", str(checkpoint), "--dtype", "float32", "--redis-url", store.url]
        vision, llm = start_services(stack, [("vision", "vision", common), ("llm", "llm", common)])
        base = ["--vision-target", f"ipv4:{vision.address}", "--llm-target", f"ipv4:{llm.address}", "--redis-url",
                store.url, "--http-port", "0", "--api-keys-file", str(keys_file)]
        scoped, shared = start_services(stack, [
            ("gateway-scoped", "gateway", base),
            ("gateway-shared", "gateway", [*base, "--shared-prefix-cache", "--shared-embedding-cache"])])
        channels = [grpc.insecure_channel(g.address) for g in (scoped, shared)]
        for channel in channels:
            stack.callback(channel.close)
        yield SimpleNamespace(scoped=scoped, shared=shared,
                              scoped_stub=gateway_pb2_grpc.ChatServiceStub(channels[0]),
                              shared_stub=gateway_pb2_grpc.ChatServiceStub(channels[1]))


def key(tenant: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {KEYS[tenant]}")]


def post(gateway, tenant: str, text: str) -> tuple[int, dict, dict]:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 2}
    request = urllib.request.Request(f"http://127.0.0.1:{gateway.http_port}/v1/chat/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {KEYS[tenant]}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def test_another_tenants_session_is_not_found_as_a_missing_one(tenants_stack):
    stub = tenants_stack.scoped_stub
    first = chat(stub, [text_part("Remember the number seven.")], metadata=key("alpha"))
    session = first.finish.session_id
    with pytest.raises(grpc.RpcError) as other:
        chat(stub, [text_part("Which number?")], metadata=key("beta"), session_id=session)
    missing_id = uuid.uuid4().hex
    with pytest.raises(grpc.RpcError) as missing:
        chat(stub, [text_part("Which number?")], metadata=key("beta"), session_id=missing_id)
    assert other.value.code() == missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert other.value.details() == missing.value.details().replace(missing_id, session)
    # Its owner continues it, through either gateway (sessions are shared through Redis).
    assert chat(tenants_stack.shared_stub, [text_part("Which number?")], metadata=key("alpha"),
                session_id=session).finish.session_id == session


def test_tenants_do_not_share_cached_prefixes_or_images_by_default(tenants_stack):
    stub, text = tenants_stack.scoped_stub, f"Describe this picture, case {uuid.uuid4().hex}."
    content = [image_part(media.noise_png(seed=7100)), text_part(text)]
    first = chat(stub, content, metadata=key("cache-a")).finish.usage
    again = chat(stub, content, metadata=key("cache-a")).finish.usage
    other = chat(stub, content, metadata=key("cache-b")).finish.usage
    assert first.encoded_tiles > 0 and first.cached_prompt_tokens == 0
    # The caches work for the tenant itself: the whole prompt but its last token, and every tile.
    assert again.cached_prompt_tokens == again.prompt_tokens - 1 and again.reused_tiles == first.encoded_tiles
    assert other.cached_prompt_tokens == 0 and other.encoded_tiles == first.encoded_tiles and other.reused_tiles == 0


def test_the_shared_flags_share_cached_prefixes_and_images(tenants_stack):
    stub, text = tenants_stack.shared_stub, f"Describe this picture, case {uuid.uuid4().hex}."
    content = [image_part(media.noise_png(seed=7200)), text_part(text)]
    alpha = chat(stub, content, metadata=key("alpha")).finish.usage
    beta = chat(stub, content, metadata=key("beta")).finish.usage
    # (alpha may reuse the system prompt's prefix: every earlier request of the shared scope had it.)
    assert alpha.encoded_tiles > 0 and alpha.cached_prompt_tokens < alpha.prompt_tokens - 1
    assert beta.cached_prompt_tokens == beta.prompt_tokens - 1
    assert beta.encoded_tiles == 0 and beta.reused_tiles == alpha.encoded_tiles


def test_a_tenant_over_its_rate_gets_429_with_retry_after_and_others_are_served(tenants_stack):
    gateway = tenants_stack.scoped
    assert post(gateway, "metered", "Hi")[0] == 200
    status, headers, body = post(gateway, "metered", "Hi")
    assert status == 429 and body["error"]["code"] == "resource_exhausted"
    assert "tenant 'metered' is over its rate of 0.02 requests/s (burst 1)" in body["error"]["message"]
    assert 1 <= int(headers["Retry-After"]) <= 50
    assert post(gateway, "alpha", "Hi")[0] == 200  # the other tenant is unaffected
    metrics = gateway.metrics()
    assert metric(metrics, "internvl_gateway_tenant_limited_total", tenant="metered", limit="rate") == 1
    assert metric(metrics, "internvl_gateway_tenant_requests_total", tenant="metered", code="RESOURCE_EXHAUSTED") == 1
    assert metric(metrics, "internvl_gateway_tenant_requests_total", tenant="alpha", code="OK") >= 1
    assert metric(metrics, "internvl_gateway_requests_total", method="openai.chat_completions",
                  code="RESOURCE_EXHAUSTED") == 1


def test_a_tenant_over_its_rate_gets_resource_exhausted_with_retry_after(tenants_stack):
    stub = tenants_stack.scoped_stub
    assert chat(stub, [text_part("Hi")], metadata=key("metered-grpc")).finish is not None
    with pytest.raises(grpc.RpcError) as refused:
        chat(stub, [text_part("Hi")], metadata=key("metered-grpc"))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tenant 'metered-grpc' is over its rate" in refused.value.details()
    retry_after = dict(refused.value.trailing_metadata())["retry-after"]
    assert 1 <= int(retry_after) <= 50
    assert chat(stub, [text_part("Hi")], metadata=key("beta")).finish is not None


def test_unknown_keys_are_unauthenticated_and_the_tenant_names_log_lines(tenants_stack):
    with pytest.raises(grpc.RpcError) as refused:
        chat(tenants_stack.scoped_stub, [text_part("Hi")], metadata=[("authorization", "Bearer not-a-key-at-all-1")])
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    chat(tenants_stack.scoped_stub, [text_part("Hi")], metadata=key("beta"))
    access = [line for line in tenants_stack.scoped.log_text().splitlines() if "internvl.access: Chat " in line]
    assert any("[tenant=beta]" in line for line in access) and any("UNAUTHENTICATED" in line for line in access)
    assert not any("UNAUTHENTICATED" in line and "[tenant=" in line for line in access)
