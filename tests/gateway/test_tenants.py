"""Tenants in single modules: the API-key file (and its refusal at start-up), the token bucket and the limits on a fake
clock, the caller's tenant from each source (mutual TLS on an in-process server), the cache salts (sessions owned by their tenant: tests/gateway/test_sessions.py)."""

from __future__ import annotations

import contextlib
import io
import json

import grpc
import pytest
from internvl.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from prometheus_client import generate_latest
from reliability.certs import Authority

from gateway import tenants
from gateway.auth import CERTIFICATE_MESSAGE, Access, TenantInterceptor
from gateway.metrics import GatewayMetrics
from gateway.tenant_limits import CONCURRENCY_RETRY_S, TenantLimitError, TenantLimits, TokenBucket
from gateway.tenants import Tenant, load_keys_file, parse_keys
from services.contract.errors import (
    HTTP_BY_CODE,
    STATUS_BY_CODE,
    InvalidArgumentError,
    RpcStatus,
    retry_after,
)
from services.contract.priority import Priority
from services.contract.service_names import GATEWAY_SERVICE
from services.runtime.grpc_server import GrpcServer, ServerOptions
from services.runtime.tls import ServerTls
from tools import cli
from tools.launcher import metric

pytestmark = pytest.mark.timeout(60)
KEY_A, KEY_B, KEY_A2 = "alpha-key-0123456789", "beta-key-0123456789", "alpha-key-second-one"


def keys_text(**tenants_settings) -> str:
    return json.dumps({"tenants": tenants_settings})


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------------------------------------ the key file


def test_a_key_file_names_each_keys_tenant_with_its_settings():
    directory = parse_keys(keys_text(
        alpha={"keys": [KEY_A, KEY_A2], "rate": 2.5, "burst": 5, "max_concurrent": 3, "priority": "critical"},
        beta={"keys": [KEY_B]}))
    assert directory.find(KEY_A) == directory.find(KEY_A2) == Tenant("alpha", 2.5, 5, 3, Priority.CRITICAL)
    assert directory.find(KEY_B) == Tenant("beta")  # no limits, the gateway's default priority
    assert directory.find("alpha-key-012345678") is None and directory.find(KEY_A + "x") is None
    assert [t.name for t in directory.tenants] == ["alpha", "beta"]
    assert Tenant("x", rate=2.5).bucket_size == 3 and Tenant("x", rate=0.1).bucket_size == 1


BAD_FILES = [
    ("{", "not valid JSON"),
    ("[]", 'expected one object {"tenants"'),
    (json.dumps({"tenants": {}, "other": 1}), 'expected one object {"tenants"'),
    (keys_text(), "names no tenant"),
    (keys_text(**{"bad name": {"keys": [KEY_A]}}), "tenant name 'bad name' must be 1-64 letters"),
    (keys_text(anonymous={"keys": [KEY_A]}), "(and not 'anonymous')"),
    (keys_text(alpha=[KEY_A]), "tenant 'alpha': expected an object of settings, got list"),
    (keys_text(alpha={"keys": [KEY_A], "rps": 3}), "tenant 'alpha': unknown setting(s) rps; known: burst, keys"),
    (keys_text(alpha={"rate": 1}), "tenant 'alpha': 'keys' must be a non-empty list of strings"),
    (keys_text(alpha={"keys": []}), "'keys' must be a non-empty list"),
    (keys_text(alpha={"keys": ["short"]}), "each key must be a string of at least 16 printable characters"),
    (keys_text(alpha={"keys": ["has a space in it ok"]}), "without spaces"),
    (keys_text(alpha={"keys": [KEY_A]}, beta={"keys": [KEY_A]}), ("tenant 'beta': a key is listed twice (also under "
                                                                  "'alpha')")),
    (keys_text(alpha={"keys": [KEY_A], "rate": 0}), "'rate' must be a number > 0, got 0"),
    (keys_text(alpha={"keys": [KEY_A], "rate": "5"}), "'rate' must be a number > 0, got '5'"),
    (keys_text(alpha={"keys": [KEY_A], "rate": True}), "'rate' must be a number > 0, got True"),
    (keys_text(alpha={"keys": [KEY_A], "rate": 1, "burst": 0}), "'burst' must be an integer >= 1, got 0"),
    (keys_text(alpha={"keys": [KEY_A], "rate": 1, "burst": 1.5}), "'burst' must be an integer >= 1, got 1.5"),
    (keys_text(alpha={"keys": [KEY_A], "burst": 2}), "'burst' needs a 'rate'"),
    (keys_text(alpha={"keys": [KEY_A], "max_concurrent": 0}), "'max_concurrent' must be an integer >= 1, got 0"),
    (keys_text(alpha={"keys": [KEY_A], "priority": "urgent"}), ("'priority' must be one of critical, standard, "
                                                               "sheddable, got 'urgent'")),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES, ids=[m[:30] for _, m in BAD_FILES])
def test_a_bad_key_file_is_refused_naming_the_problem(tmp_path, text, message):
    path = tmp_path / "keys.json"
    path.write_text(text)
    with pytest.raises(InvalidArgumentError) as info:
        load_keys_file(str(path))
    assert str(info.value).startswith(f"--api-keys-file {path}: ") and message in str(info.value)


def test_a_bad_key_file_stops_the_gateway_at_start_up_with_one_line(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(keys_text(alpha={"keys": ["short"]}))
    base = ["gateway", "--vision-target", "127.0.0.1:1", "--llm-target", "127.0.0.1:1"]
    runs = {"bad": [*base, "--api-keys-file", str(path)], "missing": [*base, "--api-keys-file", str(tmp_path / "no")]}
    good = tmp_path / "good.json"
    good.write_text(keys_text(alpha={"keys": [KEY_A]}))
    token = tmp_path / "token"
    token.write_text("t" * 20)
    runs["both"] = [*base, "--api-keys-file", str(good), "--api-token-file", str(token)]
    expected = {"bad": "each key must be a string of at least 16", "missing": "cannot read it",
                "both": "--api-keys-file and --api-token-file (or $INTERNVL_API_TOKEN) exclude each other"}
    for name, argv in runs.items():
        with contextlib.redirect_stderr(io.StringIO()) as err:
            assert cli.main(argv) == 2, name
        assert err.getvalue().startswith("internvl-serve gateway: error: --api-keys-file"), err.getvalue()
        assert expected[name] in err.getvalue() and "Traceback" not in err.getvalue()


# ------------------------------------------------------------------------------------------------ limits


def test_the_bucket_admits_its_size_at_once_then_the_rate():
    clock = Clock()
    bucket = TokenBucket(rate=2.0, size=3, clock=clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5)  # one token comes in 1/rate seconds; nothing was taken
    clock.now += 0.25
    assert bucket.take() == pytest.approx(0.25)
    clock.now += 0.25
    assert bucket.take() == 0.0 and bucket.take() == pytest.approx(0.5)
    clock.now += 100  # refills to its size, no further
    assert [bucket.take() for _ in range(4)][-1] == pytest.approx(0.5)


def test_limits_refuse_over_the_rate_with_when_to_retry_and_leave_other_tenants_alone():
    clock = Clock()
    limits = TenantLimits(clock)
    metered, other = Tenant("metered", rate=0.5, burst=2), Tenant("other", rate=0.5, burst=1)
    for _ in range(2):
        with limits.admit(metered):
            pass
    with pytest.raises(TenantLimitError) as info:
        limits.admit(metered)
    assert info.value.limit == "rate" and info.value.retry_after_s == pytest.approx(2.0)
    assert str(info.value) == "tenant 'metered' is over its rate of 0.5 requests/s (burst 2); retry in 2 s"
    with limits.admit(other):  # its own bucket
        pass
    clock.now += 2.0
    with limits.admit(metered):
        pass


def test_limits_refuse_over_the_concurrency_without_taking_a_token():
    clock = Clock()
    limits = TenantLimits(clock)
    tenant = Tenant("busy", rate=1.0, burst=2, max_concurrent=1)
    with limits.admit(tenant):
        assert limits.running("busy") == 1
        with pytest.raises(TenantLimitError) as info:
            limits.admit(tenant)
        assert info.value.limit == "concurrency" and info.value.retry_after_s == CONCURRENCY_RETRY_S
        assert "already has 1 requests running, its limit (max_concurrent)" in str(info.value)
    assert limits.running("busy") == 0
    with limits.admit(tenant):  # the refused request took no token: the second is still there
        pass
    with limits.admit(Tenant("free")), limits.admit(Tenant("free")):  # no limits
        assert limits.running("free") == 2


def test_a_limit_error_is_resource_exhausted_429_with_a_whole_retry_after():
    exc = TenantLimitError("over", 0.2, "rate")
    assert STATUS_BY_CODE[exc.code] == RpcStatus.RESOURCE_EXHAUSTED and HTTP_BY_CODE[exc.code] == 429
    assert retry_after(exc) == "1"
    assert retry_after(TenantLimitError("over", 2.01, "rate")) == "3"
    assert retry_after(InvalidArgumentError("bad")) is None and retry_after(ValueError()) is None


# ------------------------------------------------------------------------------------------------ who calls


def test_the_tenant_comes_from_the_first_configured_source():
    directory = parse_keys(keys_text(alpha={"keys": [KEY_A]}))
    keyed = Access(keys=directory, client_certificates=True)
    assert keyed.identify(f"Bearer {KEY_A}").name == "alpha"
    assert keyed.identify(f"bearer  {KEY_A} ").name == "alpha"
    for refused in (None, KEY_A, f"Basic {KEY_A}", "Bearer ", f"Bearer {KEY_B}"):
        assert keyed.identify(refused, [b"alpha"]) is None, refused
    token = Access(token="t" * 20, client_certificates=True)
    assert token.identify("Bearer " + "t" * 20).name == tenants.DEFAULT and token.identify("Bearer x") is None
    certificates = Access(client_certificates=True)
    assert certificates.identify(None, [b"search.internal"]).name == "search.internal"
    assert certificates.identify(None, [b"with space"]) is None and certificates.identify(None, [b"a", b"b"]) is None
    assert certificates.identify("Bearer anything", None).name == tenants.ANONYMOUS  # no certificate: HTTP
    assert Access().identify(None).name == tenants.ANONYMOUS


def test_salts_are_per_tenant_and_anonymous_is_unsalted():
    assert tenants.salt(tenants.ANONYMOUS) == ""
    alpha, beta = tenants.salt("alpha"), tenants.salt("beta")
    assert len(alpha) == 32 and alpha != beta and "alpha" not in alpha
    assert tenants.salt("alpha") == alpha  # the same on every gateway replica


# ------------------------------------------------------------------------------------------------ mutual TLS


class WhoAmI(gateway_pb2_grpc.ChatServiceServicer):
    """Answers ListModels with the caller's tenant, as the gateway's handlers see it."""

    async def ListModels(self, request, context):
        return gateway_pb2.ListModelsResponse(models=[gateway_pb2.ServedModel(id=tenants.current().name)])


@pytest.mark.asyncio
async def test_under_mutual_tls_the_client_certificates_cn_is_the_tenant(tmp_path):
    ca = Authority(tmp_path, "tenants-test-ca")
    server_cert = ca.issue("server", "gateway", client=False)
    metrics = GatewayMetrics()
    tls = ServerTls(*server_cert.read(), client_ca=ca.pem.read_bytes())
    server = GrpcServer(ServerOptions(port=0, host="127.0.0.1", tls=tls, drain_seconds=0), [GATEWAY_SERVICE],
                        [TenantInterceptor(Access(client_certificates=True), TenantLimits(), metrics)],
                        requests=metrics.requests)
    server.add(gateway_pb2_grpc.add_ChatServiceServicer_to_server, WhoAmI())
    await server.start()
    try:
        async def call(common_name: str) -> gateway_pb2.ListModelsResponse:
            cert, key = ca.issue(common_name.replace(" ", "_"), common_name, server=False).read()
            credentials = grpc.ssl_channel_credentials(ca.pem.read_bytes(), key, cert)
            async with grpc.aio.secure_channel(f"127.0.0.1:{server.port}", credentials) as channel:
                return await gateway_pb2_grpc.ChatServiceStub(channel).ListModels(gateway_pb2.ListModelsRequest(),
                                                                                 timeout=10)

        assert [m.id for m in (await call("search.internal")).models] == ["search.internal"]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call("no spaces here")
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert refused.value.details() == CERTIFICATE_MESSAGE
    finally:
        await server.stop()
    assert metric(generate_latest(metrics.registry).decode(), "internvl_gateway_tenant_requests_total",
                  tenant="search.internal", code="OK") == 1
