"""`internvl-serve llm --engine vllm` as a process whose vLLM engine core is killed: the request in flight ends
UNAVAILABLE (retryable), the replica's readiness on grpc.health.v1 turns NOT_SERVING while it restarts its engine
(liveness stays SERVING, new calls are UNAVAILABLE), then SERVING again, and it serves."""

from __future__ import annotations

import threading

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.llm_wire import start_message
from internvl.common.v1 import common_pb2
from internvl.llm.v1 import llm_pb2, llm_pb2_grpc
from procs import run_service, wait_for

from services.contract.service_names import LLM_SERVICE
from services.model.tiny import make_tiny
from services.runtime.grpc_errors import error_detail

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
STOP_TOKEN = 151645  # <|im_end|> of the Qwen2 tokenizer


def tokens(stub, text: str, **sampling) -> list[int]:
    ids = []
    for response in stub.Generate(iter([start_message(llm_pb2.ContentPart(text=text), **sampling)]), timeout=120):
        ids += response.delta.token_ids
    return ids


def test_the_replica_is_not_serving_while_its_engine_restarts_then_serves(tmp_path):
    checkpoint = make_tiny(tmp_path / "small", preset="small")
    with run_service("llm", "--model", str(checkpoint), "--engine", "vllm", "--dtype", "float32", "--device", "cpu",
                     "--kv-budget-mb", "16", "--kv-cache-budget-mb", "16", "--max-context-tokens", "4096",
                     timeout_s=600) as llm, grpc.insecure_channel(llm.address) as channel:
        health, stub = health_pb2_grpc.HealthStub(channel), llm_pb2_grpc.LLMServiceStub(channel)

        def status(name: str = LLM_SERVICE):
            return health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status

        before = tokens(stub, "Hello there.", max_new_tokens=4)
        assert status() == SERVING and len(before) == 4
        endless = stub.Generate(iter([start_message(llm_pb2.ContentPart(text="Count to a thousand."),
                                                    max_new_tokens=2000, logit_bias={STOP_TOKEN: -100.0})]))
        first = next(endless)
        assert first.delta.token_ids
        [core] = [p for p in psutil.Process(llm.pid).children(recursive=True) if "EngineCore" in " ".join(
            [p.name(), *p.cmdline()])]
        seen: list[int] = []
        watching = threading.Event()

        def watch() -> None:  # every readiness the replica reports, from the kill on
            while not watching.is_set():
                seen.append(status())
                if seen[-1] == SERVING and NOT_SERVING in seen:
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        core.kill()
        with pytest.raises(grpc.RpcError) as lost:
            for _ in endless:
                pass
        assert lost.value.code() == grpc.StatusCode.UNAVAILABLE and "retry" in lost.value.details()
        wait_for(lambda: NOT_SERVING in seen, 30, "readiness NOT_SERVING")
        with pytest.raises(grpc.RpcError) as refused:
            tokens(stub, "Anyone there?")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_detail(refused.value).code == common_pb2.ERROR_CODE_NOT_READY
        assert status("") == SERVING  # liveness: the process is fine
        watcher.join(600)
        watching.set()
        assert seen[-1] == SERVING, "the replica did not come back"
        assert tokens(stub, "Hello there.", max_new_tokens=4) == before  # the same weights, greedy
        assert "starting a new engine" in llm.log_text() and "the new vLLM engine serves" in llm.log_text()
