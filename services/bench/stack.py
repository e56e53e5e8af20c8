"""The stack under test: `internvl-serve up` as a child process, its children found by /proc, and timed clients
of the gateway's `ChatService.Chat` and the vision service's `Encode`.

Ports and process ids are read from the children's own command lines (`--port`, `--metrics-port`), so the
benchmark depends on `up`'s flags, not on the wording of its banner beyond the line that says it is ready.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import grpc
from internvl.common.v1 import common_pb2
from internvl.gateway.v1 import gateway_pb2 as G
from internvl.gateway.v1 import gateway_pb2_grpc
from internvl.vision.v1 import vision_pb2, vision_pb2_grpc

from services.bench.machine import status_mib
from services.tools.up import die_with_parent, free_port

READY_LINE = "Ctrl-C stops everything"
RPC_TIMEOUT_S = 3600.0
# Large enough for 16-frame videos and 4-tile PNGs.
MAX_MESSAGE_BYTES = 256 * 2**20


class StackStartError(RuntimeError):
    pass


@dataclass
class ServiceProc:
    name: str  # redis, vision-0, vision-1, llm, gateway
    pid: int
    port: int | None
    metrics_port: int | None


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after the last ')'.
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _flag(argv: list[str], name: str) -> int | None:
    return int(argv[argv.index(name) + 1]) if name in argv else None


class RunningStack:
    """`internvl-serve up --model ... --vision-replicas N` until `stop()`."""

    def __init__(self, model: str, dtype: str, replicas: int, log_dir: Path | None = None,
                 startup_timeout_s: float = 1800.0):
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="internvl-bench-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.gateway_port = free_port()
        self.replicas = replicas
        env = {k: v for k, v in os.environ.items() if k != "INTERNVL_API_TOKEN"}
        repo = Path(__file__).resolve().parents[2]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
        argv = [sys.executable, "-m", "services.cli", "up", "--model", model, "--dtype", dtype,
                "--gateway-port", str(self.gateway_port), "--http-port", "0", "--metrics-port", str(free_port()),
                "--vision-replicas", str(replicas), "--log-dir", str(self.log_dir),
                "--startup-timeout", str(startup_timeout_s)]
        self.output: list[str] = []
        self.process = subprocess.Popen(argv, cwd=repo, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True,
                                        preexec_fn=die_with_parent)  # noqa: PLW1509 - libc is loaded before the fork
        started = time.perf_counter()
        for line in self.process.stdout:
            self.output.append(line)
            if READY_LINE in line:
                break
        if READY_LINE not in "".join(self.output):
            self.process.wait(timeout=60)
            tails = "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-2000:]}"
                              for f in sorted(self.log_dir.glob("*.log")))
            raise StackStartError(f"`internvl-serve up` did not come up:\n{''.join(self.output)}\n{tails}")
        self.startup_s = time.perf_counter() - started
        # Keep draining up's stdout so it never blocks on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()
        self.services = self._find_services()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.gateway_port}", options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        self.chat = gateway_pb2_grpc.ChatServiceStub(self.channel)

    def _drain(self) -> None:
        for line in self.process.stdout:
            self.output.append(line)

    def _find_services(self) -> dict[str, ServiceProc]:
        found: dict[str, ServiceProc] = {}
        visions = []
        for pid in _children(self.process.pid):
            argv = _cmdline(pid)
            joined = " ".join(argv)
            port, metrics = _flag(argv, "--port"), _flag(argv, "--metrics-port")
            if "redis-server" in joined:
                found["redis"] = ServiceProc("redis", pid, port, None)
            elif "services.cli" in argv or "services/cli.py" in joined:
                role = next((r for r in ("vision", "llm", "gateway") if r in argv), None)
                if role == "vision":
                    visions.append(ServiceProc("vision", pid, port, metrics))
                elif role:
                    found[role] = ServiceProc(role, pid, port, metrics)
        for i, proc in enumerate(sorted(visions, key=lambda p: p.pid)):
            proc.name = f"vision-{i}"
            found[proc.name] = proc
        missing = {"llm", "gateway", *(f"vision-{i}" for i in range(self.replicas))} - set(found)
        if missing:
            raise StackStartError(f"cannot find the stack's processes {sorted(missing)} under pid {self.process.pid}")
        return found

    @property
    def pids(self) -> dict[str, int]:
        return {name: s.pid for name, s in self.services.items()}

    def rss_mib(self) -> dict[str, float | None]:
        return {name: status_mib(s.pid) for name, s in self.services.items()}

    def metrics(self, name: str) -> str:
        url = f"http://127.0.0.1:{self.services[name].metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()

    def vision_stub(self, index: int = 0) -> vision_pb2_grpc.VisionServiceStub:
        channel = grpc.insecure_channel(f"127.0.0.1:{self.services[f'vision-{index}'].port}", options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        return vision_pb2_grpc.VisionServiceStub(channel)

    def stop(self) -> None:
        self.channel.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def metric_value(text: str, name: str) -> float:
    """Sum of the samples of one metric (all label sets) in Prometheus text format; 0 when absent."""
    total = 0.0
    for match in re.finditer(r"^" + re.escape(name) + r"(?:\{[^}]*\})? ([0-9.eE+-]+)$", text, re.MULTILINE):
        total += float(match.group(1))
    return total


# ------------------------------------------------------------------------------------------------- clients


@dataclass
class ChatTiming:
    started: float
    # (monotonic time, tokens in that delta) for every delta that carried tokens.
    deltas: list[tuple[float, int]] = field(default_factory=list)
    finished: float = 0.0
    token_ids: list[int] = field(default_factory=list)
    usage: dict = field(default_factory=dict)
    session_id: str = ""

    @property
    def ttft_s(self) -> float:
        return self.deltas[0][0] - self.started

    @property
    def total_s(self) -> float:
        return self.finished - self.started

    @property
    def tokens(self) -> int:
        return len(self.token_ids)

    def decode_step_s(self) -> float:
        """Mean time per token after the first delta: (last delta's arrival - first's) / tokens of later deltas."""
        later = sum(n for _, n in self.deltas[1:])
        if later == 0:
            return float("nan")
        return (self.deltas[-1][0] - self.deltas[0][0]) / later


def image_part(data: bytes) -> G.ContentPart:
    return G.ContentPart(image=G.ImageInput(data=data))


def text_part(text: str) -> G.ContentPart:
    return G.ContentPart(text=text)


def video_part(data: bytes, frames: int) -> G.ContentPart:
    return G.ContentPart(video=G.VideoInput(data=data, num_segments=frames))


def chat(stub: gateway_pb2_grpc.ChatServiceStub, content: list[G.ContentPart], max_new_tokens: int,
         session_id: str | None = None, max_num: int | None = None, started: float | None = None) -> ChatTiming:
    """One greedy streamed Chat, timed from `started` (default: now) to the finish message."""
    request = G.ChatRequest(content=content, sampling=G.SamplingParams(max_new_tokens=max_new_tokens))
    if session_id:
        request.session_id = session_id
    if max_num is not None:
        request.max_num = max_num
    timing = ChatTiming(started=started if started is not None else time.perf_counter())
    for response in stub.Chat(request, timeout=RPC_TIMEOUT_S):
        now = time.perf_counter()
        if response.HasField("delta"):
            if response.delta.token_ids:
                timing.deltas.append((now, len(response.delta.token_ids)))
                timing.token_ids.extend(response.delta.token_ids)
        else:
            timing.finished = now
            u = response.finish.usage
            timing.usage = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                            "cached_prompt_tokens": u.cached_prompt_tokens, "image_tiles": list(u.image_tiles),
                            "encoded_tiles": u.encoded_tiles, "reused_tiles": u.reused_tiles}
            timing.session_id = response.finish.session_id
    if not timing.finished:
        timing.finished = time.perf_counter()
    return timing


def encode(stub: vision_pb2_grpc.VisionServiceStub, data: bytes, max_num: int) -> tuple[float, list]:
    """(seconds, items) of one vision `Encode` of one image."""
    request = vision_pb2.EncodeRequest(items=[vision_pb2.EncodeItem(image_bytes=data)],
                                       options=common_pb2.PreprocessOptions(max_num=max_num))
    started = time.perf_counter()
    reply = stub.Encode(request, timeout=RPC_TIMEOUT_S)
    return time.perf_counter() - started, list(reply.items)
