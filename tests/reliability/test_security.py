"""Security: TLS and mutual TLS on every hop, the gateway's bearer token, no pickle anywhere, and the config checks.

The stack here runs with certificates the test makes (tests/reliability/certs.py): the vision and LLM services
require client certificates signed by the test CA (mutual TLS), the gateway presents one to them, serves its public
gRPC port over TLS and requires a bearer token on gRPC and HTTP. Health checks stay open (probes carry no token).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import secrets
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import media
from helpers.chat import chat, image_part, text_part
from internvl.gateway.v1 import gateway_pb2_grpc
from internvl.vision.v1 import vision_pb2, vision_pb2_grpc
from procs import REPO, redis_server
from stack import start_services

from gateway import chat_cli
from gateway import config as gateway_config
from reliability.certs import Authority
from services.contract.errors import InvalidArgumentError
from services.contract.service_names import GATEWAY_SERVICE, LLM_SERVICE, VISION_SERVICE
from services.runtime.tls import ClientTls, ServerTls
from tools import up

# The tests on tls_stack are marked e2e one by one: the configuration and source checks start nothing.
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca, rogue = Authority(directory, "internvl-test-ca"), Authority(directory, "rogue-ca")
    token = secrets.token_urlsafe(24)
    (directory / "token").write_text(token + "\n")
    return SimpleNamespace(
        ca=ca, server=ca.issue("server", "internvl-service", client=False),
        gateway=ca.issue("gateway", "internvl-gateway", server=False),
        rogue=rogue.issue("rogue", "intruder", server=False), token=token, token_file=directory / "token")


def creds(pki, client=None) -> grpc.ChannelCredentials:
    cert, key = client.read() if client is not None else (None, None)
    return grpc.ssl_channel_credentials(pki.ca.pem.read_bytes(), key, cert)


@pytest.fixture(scope="module")
def tls_stack(checkpoint, pki):
    with contextlib.ExitStack() as stack:
        store = stack.enter_context(redis_server())
        media_root = Path(tempfile.mkdtemp(prefix="rel-tls-media-"))
        stack.callback(shutil.rmtree, media_root, True)
        mutual = ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
                  "--tls-client-ca", str(pki.ca.pem)]
        common = ["--model", str(checkpoint), "--dtype", "float32", "--redis-url", store.url, *mutual]
        internal = creds(pki, pki.gateway)
        vision, llm = start_services(stack, [("vision", "vision", common), ("llm", "llm", common)], internal)
        gateway_args = ["--vision-target", f"ipv4:{vision.address}", "--llm-target", f"ipv4:{llm.address}",
                        "--redis-url", store.url, "--media-root", str(media_root), "--http-port", "0",
                        "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
                        "--upstream-tls-ca", str(pki.ca.pem), "--upstream-tls-cert", str(pki.gateway.cert),
                        "--upstream-tls-key", str(pki.gateway.key), "--api-token-file", str(pki.token_file)]
        [gateway] = start_services(stack, [("gateway", "gateway", gateway_args)], creds(pki))
        channel = grpc.secure_channel(gateway.address, creds(pki))
        stack.callback(channel.close)
        yield SimpleNamespace(vision=vision, llm=llm, gateway=gateway, http_port=gateway.http_port,
                              stub=gateway_pb2_grpc.ChatServiceStub(channel))


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@pytest.mark.e2e
def test_chat_over_tls_and_mutual_tls_with_the_token(tls_stack, pki):
    answer = chat(tls_stack.stub, [image_part(media.noise_png(seed=900)), text_part("What is it?")],
                  metadata=bearer(pki.token))
    assert answer.finish is not None and answer.finish.usage.encoded_tiles >= 1  # vision and LLM reached via mTLS
    # "Bearer" is case-insensitive (RFC 6750), the token is not.
    assert chat(tls_stack.stub, [text_part("Hi")], metadata=[("authorization", f"bearer {pki.token}")]).finish


@pytest.mark.e2e
@pytest.mark.parametrize("metadata", [None, bearer("wrong-token-of-some-length"), [("authorization", "Basic xyz")],
                                      bearer(" ")], ids=["none", "wrong", "basic", "empty"])
def test_calls_without_the_token_are_unauthenticated(tls_stack, metadata):
    with pytest.raises(grpc.RpcError) as info:
        chat(tls_stack.stub, [text_part("Hi")], metadata=metadata)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "bearer token" in info.value.details()


@pytest.mark.e2e
def test_health_needs_no_token_and_plaintext_is_refused(tls_stack, pki):
    with grpc.secure_channel(tls_stack.gateway.address, creds(pki)) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=GATEWAY_SERVICE),
                                                          timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(tls_stack.gateway.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            chat(gateway_pb2_grpc.ChatServiceStub(channel), [text_part("Hi")], metadata=bearer(pki.token), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.e2e
@pytest.mark.parametrize("who", ["plaintext", "tls-without-client-cert", "rogue-client-cert", "gateway-cert"])
@pytest.mark.parametrize("service", ["vision", "llm"])
def test_internal_services_require_a_client_certificate(tls_stack, pki, who, service):
    target = getattr(tls_stack, service).address
    if who == "plaintext":
        channel = grpc.insecure_channel(target)
    else:
        client = {"tls-without-client-cert": None, "rogue-client-cert": pki.rogue, "gateway-cert": pki.gateway}[who]
        channel = grpc.secure_channel(target, creds(pki, client))
    with channel:
        name = VISION_SERVICE if service == "vision" else LLM_SERVICE
        call = lambda: health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=name), timeout=5)
        if who == "gateway-cert":
            assert call().status == health_pb2.HealthCheckResponse.SERVING
            if service == "vision":
                info = vision_pb2_grpc.VisionServiceStub(channel).GetModelInfo(vision_pb2.GetModelInfoRequest())
                assert info.model_info.fingerprint
        else:
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.e2e
def test_internvl_chat_with_tls_and_a_token_file(tls_stack, pki):
    base = ["--target", tls_stack.gateway.address, "--tls-ca", str(pki.ca.pem), "--max-tokens", "2", "--json"]
    out, err = io.StringIO(), io.StringIO()
    args = chat_cli.build_parser().parse_args([*base, "--token-file", str(pki.token_file), "Hello"])
    assert chat_cli.chat(args, out=out, err=err) == 0
    assert json.loads(out.getvalue().splitlines()[-1])["finish_reason"] in ("stop", "length")
    with contextlib.redirect_stderr(io.StringIO()) as stderr:
        assert chat_cli.main([*base, "Hello"]) == 1
    assert "UNAUTHENTICATED" in stderr.getvalue()


def http(url: str, token: str | None = None, body: dict | None = None) -> tuple[int, dict, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body else None, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


@pytest.mark.e2e
def test_http_api_requires_the_token(tls_stack, pki):
    base = f"http://127.0.0.1:{tls_stack.http_port}"
    status, headers, body = http(f"{base}/v1/models")
    assert status == 401 and body["error"]["code"] == "unauthenticated" and "Bearer" in headers["WWW-Authenticate"]
    assert http(f"{base}/v1/models", token="nope-nope-nope-nope")[0] == 401
    assert http(f"{base}/v1/models", token=pki.token)[0] == 200
    assert http(f"{base}/health")[0] == 200  # probes carry no token
    request = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    assert http(f"{base}/v1/chat/completions", body=request)[0] == 401
    status, _, reply = http(f"{base}/v1/chat/completions", token=pki.token, body=request)
    assert status == 200 and reply["choices"][0]["finish_reason"] in ("stop", "length")


# ------------------------------------------------------------------------------------------------ configuration


def gateway_args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    gateway_config.add_arguments(parser)
    return parser.parse_args(["--vision-target", "v:1", "--llm-target", "l:1", *extra])


def test_token_and_tls_configuration(pki, tmp_path):
    config = gateway_config.GatewayConfig.from_args(gateway_args("--api-token-file", str(pki.token_file)), {})
    assert config.api_token == pki.token and pki.token not in repr(config)
    from_env = gateway_config.GatewayConfig.from_args(gateway_args(), {"INTERNVL_API_TOKEN": "t" * 20})
    assert from_env.api_token == "t" * 20
    assert gateway_config.GatewayConfig.from_args(gateway_args(), {}).api_token is None
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "not-pem").write_text("hello")
    for argv, message in [
        (["--api-token-file", str(tmp_path / "empty")], "is empty"),
        (["--api-token-file", str(tmp_path / "missing")], "cannot read it"),
        (["--tls-cert", str(pki.server.cert)], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", str(pki.ca.pem)], "mutual TLS is TLS first"),
        (["--tls-cert", str(tmp_path / "not-pem"), "--tls-key", str(pki.server.key)], "not a PEM file"),
        (["--upstream-tls-cert", str(pki.gateway.cert)], "--upstream-tls-cert and --upstream-tls-key go together"),
    ]:
        with pytest.raises(InvalidArgumentError, match=message):
            gateway_config.GatewayConfig.from_args(gateway_args(*argv), {})
    with pytest.raises(InvalidArgumentError, match="at least 16"):
        gateway_config.GatewayConfig.from_args(gateway_args(), {"INTERNVL_API_TOKEN": "short"})
    env_tls = gateway_config.GatewayConfig.from_args(gateway_args(), {
        "INTERNVL_TLS_CERT": str(pki.server.cert), "INTERNVL_TLS_KEY": str(pki.server.key),
        "INTERNVL_UPSTREAM_TLS_CA": str(pki.ca.pem)})
    assert isinstance(env_tls.server.tls, ServerTls) and env_tls.server.tls.client_ca is None
    assert isinstance(env_tls.upstream_tls, ClientTls) and env_tls.upstream_tls.certificate_chain is None
    assert b"PRIVATE KEY" not in repr(env_tls).encode()


def test_up_passes_tls_and_the_token_down(pki):
    parser = argparse.ArgumentParser()
    up.add_arguments(parser)
    args = parser.parse_args(["--model", "m", "--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-ca", "ca.pem",
                              "--tls-client-ca", "ca.pem", "--api-token-file", "t"])
    stack = up.Stack(args)
    assert stack.tls_server_args(mutual=True) == ["--tls-cert", "c.pem", "--tls-key", "k.pem",
                                                  "--tls-client-ca", "ca.pem"]
    assert stack.tls_server_args(mutual=False) == ["--tls-cert", "c.pem", "--tls-key", "k.pem"]
    assert stack.tls_upstream_args() == ["--upstream-tls-ca", "ca.pem", "--upstream-tls-cert", "c.pem",
                                         "--upstream-tls-key", "k.pem"]
    assert "--tls-ca ca.pem --token-file t" in up._client_flags(args)
    plain = up.Stack(parser.parse_args(["--model", "m"]))
    assert plain.tls_server_args(mutual=True) == plain.tls_upstream_args() == []
    shutil.rmtree(stack.log_dir, ignore_errors=True)
    shutil.rmtree(plain.log_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------- pickle


# Modules that deserialise executable object graphs, and calls that do.
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve", "jsonpickle"}
UNSAFE_CALLS = {"torch.load", "numpy.load", "np.load", "yaml.load", "yaml.unsafe_load", "yaml.full_load",
                "pandas.read_pickle", "pd.read_pickle", "torch.jit.load"}


def test_nothing_is_deserialised_with_pickle():
    """Source and tests: no pickle-family import, no torch.load / np.load / yaml.load (weights are safetensors,
    cached embeddings a JSON header and raw bytes)."""
    problems = []
    for path in sorted([*REPO.glob("services/**/*.py"), *REPO.glob("gateway/**/*.py"), *REPO.glob("tests/**/*.py"),
                        *REPO.glob("deploy/**/*.py"), *REPO.glob("protos/*.py")]):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            for name in names:
                if name in UNSAFE_MODULES:
                    problems.append(f"{path.relative_to(REPO)}:{node.lineno}: imports {name}")
            if isinstance(node, ast.Call):
                func = ast.unparse(node.func)
                if func in UNSAFE_CALLS and not (func.startswith("yaml") and any(
                        k.arg == "Loader" and "Safe" in ast.unparse(k.value) for k in node.keywords)):
                    problems.append(f"{path.relative_to(REPO)}:{node.lineno}: calls {func}")
    assert problems == []
