"""`internvl-serve up --redis-cluster 3 --llm-replicas 2`: a local Redis Cluster of three masters and two LLM
processes behind one gateway, as real processes. The banner names the cluster URL and every replica, requests are
answered (by both LLM replicas, with `--llm-routing round_robin` passed through to the gateway), and Ctrl-C stops
every process, the Redis nodes included."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import media
from helpers.chat import chat, image_part, text_part
from stack import up_stack

from tools.launcher import metric, processes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def test_up_with_a_redis_cluster_and_two_llm_replicas(tiny_checkpoint, tmp_path):
    # up_stack checks on leaving that Ctrl-C stopped every process: the Redis nodes (their directory is under the
    # log directory) and the services (they name the checkpoint).
    with up_stack(tiny_checkpoint(), tmp_path / "logs", "--redis-cluster", "3", "--llm-replicas", "2",
                  "--llm-routing", "round_robin", http=False, drop_env=("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")) as stack:
        output = stack.banner
        assert re.search(r"redis: redis\+cluster://127\.0\.0\.1:\d+(,127\.0\.0\.1:\d+){2};", output), output
        assert "llm-0 ready on" in output and "llm-1 ready on" in output
        llms = [name for name in stack.metrics_ports if name.startswith("llm-")]
        assert llms == ["llm-0", "llm-1"] and re.search(
            r"services: vision-0 [\d.:]+, llm-0 [\d.:]+, llm-1 [\d.:]+", output)
        # The model services share this machine's cores: up shortens libgomp's spin-wait for them, not the gateway's.
        spin = {role: environ(p.pid).get("GOMP_SPINCOUNT") for p in processes() if p.ppid == stack.process.pid
                for role in ("vision", "llm", "gateway") if role in p.argv}
        assert spin == {"vision": "2000", "llm": "2000", "gateway": None}, spin

        for i in range(4):
            answer = chat(stack.stub, [image_part(media.noise_png(seed=40 + i)), text_part("What is it?")],
                          max_new_tokens=2)
            assert answer.finish is not None
        finished = [metric(stack.metrics(name), "internvl_llm_finished_requests_total") for name in llms]
        assert all(count >= 1 for count in finished), finished
