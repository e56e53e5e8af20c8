"""`internvl-serve up --redis-cluster 3 --llm-replicas 2`: a local Redis Cluster of three masters and two LLM
processes behind one gateway, as real processes. The banner names the cluster URL and every replica, requests are
answered (by both LLM replicas, with `--llm-routing round_robin` passed through to the gateway), and Ctrl-C stops
every process, the Redis nodes included."""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import grpc
import pytest
from internvl.gateway.v1 import gateway_pb2 as G
from internvl.gateway.v1 import gateway_pb2_grpc
from procs import REPO, free_port
from reliability import media

from tools.launcher import UP_READY_LINE, cli_env, processes, read_banner, read_metrics, spawn

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def finished(metrics_port: int) -> float:
    text = read_metrics(metrics_port)
    return sum(float(v) for v in re.findall(r"^internvl_llm_finished_requests_total\{[^}]*\} (\S+)$", text, re.MULTILINE))


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def test_up_with_a_redis_cluster_and_two_llm_replicas(tiny_checkpoint, tmp_path):
    checkpoint, logs = tiny_checkpoint(), tmp_path / "logs"
    port = free_port()
    up = spawn("up", [sys.executable, "-m", "tools.cli", "up", "--model", str(checkpoint), "--dtype", "float32",
                      "--gateway-port", str(port), "--http-port", "0", "--metrics-port", str(free_port()),
                      "--redis-cluster", "3", "--llm-replicas", "2", "--llm-routing", "round_robin",
                      "--log-dir", str(logs)],
               None, cwd=REPO, env=cli_env(drop=("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"))).process
    try:
        output = read_banner(up)
        assert UP_READY_LINE in output, output
        assert re.search(r"redis: redis\+cluster://127\.0\.0\.1:\d+(,127\.0\.0\.1:\d+){2};", output), output
        assert "llm-0 ready on" in output and "llm-1 ready on" in output
        llm_metrics = [int(p) for p in re.findall(r"llm-\d http://127\.0\.0\.1:(\d+)/metrics", output)]
        assert len(llm_metrics) == 2 and re.search(r"services: vision-0 [\d.:]+, llm-0 [\d.:]+, llm-1 [\d.:]+", output)
        # The model services share this machine's cores: up shortens libgomp's spin-wait for them, not the gateway's.
        spin = {role: environ(p.pid).get("GOMP_SPINCOUNT") for p in processes() if p.ppid == up.pid
                for role in ("vision", "llm", "gateway") if role in p.argv}
        assert spin == {"vision": "2000", "llm": "2000", "gateway": None}, spin

        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = gateway_pb2_grpc.ChatServiceStub(channel)
            for i in range(4):
                request = G.ChatRequest(content=[G.ContentPart(image=G.ImageInput(data=media.noise_png(seed=40 + i))),
                                                 G.ContentPart(text="What is it?")],
                                        sampling=G.SamplingParams(max_new_tokens=2))
                responses = list(stub.Chat(request, timeout=60))
                assert responses[-1].HasField("finish")
        assert all(finished(p) >= 1 for p in llm_metrics), [finished(p) for p in llm_metrics]
    finally:
        up.send_signal(signal.SIGINT)
        rest, _ = up.communicate(timeout=90)
    assert up.returncode == 0 and "stopped" in rest, rest
    # redis-server's argv names its directory under the log directory; the services' their checkpoint.
    assert [p.pid for p in processes() if p.pid != os.getpid() and str(logs) in " ".join(p.argv)] == []
    assert [p.pid for p in processes() if p.pid != os.getpid() and str(checkpoint) in " ".join(p.argv)] == []
