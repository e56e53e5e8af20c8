"""Where the time goes: py-spy samples of each service while the benchmark's slow paths run through the stack.

    python -m bench.profile [--out bench/results] [--checkpoint-dir checkpoints/bench-1b-shape]

Needs `py-spy` (`pip install py-spy`, not a project dependency) and the benchmark's 1B-shape checkpoint (written by
`make bench`). First, three cold image requests stage by stage: each stage's milliseconds from the services' own
metrics (the gateway's Chat, the vision Encode call and its encoder forward, the LLM Generate call, its time to first
token and its decode steps; the gateway's own share is what its Chat spent outside the two calls). Then recordings
of one process each, while the request runs:

* the LLM service during a single-stream decode of 64 tokens (the decode step against its bandwidth floor);
* vision replica 0 during a cold 5-tile Encode (the encoder tile against its matmul floor);
* the gateway during one cold image request (what the split adds);
* the LLM service and vision replica 0 during the concurrency scenario (8 image requests of 64 tokens at once).

Writes `<stamp>-profile.txt`: per recording, the share of samples by the innermost frame in this project or in
transformers/torch's Python (where torch's kernels are entered), and the top whole stacks.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import workload as W
from bench.machine import choose_device, choose_dtype
from bench.settings import REPO
from bench.stack import RunningStack, chat, encode, image_part, metric_value, text_part

RATE_HZ = 50
# The seed namespace of the profile's images (`workload.seed`): no scenario's.
PROFILE_SEEDS = 99
# Functions a thread waits in (selectors, locks, queues, executors' idle workers).
_WAITS = frozenset({"select", "poll", "wait", "_worker", "run_forever", "get", "acquire"})


class Recording:
    """`py-spy record` attached to one process until `stop()` (SIGINT makes it write what it sampled)."""

    def __init__(self, py_spy: str, pid: int, out: Path):
        self.out = out
        self.process = subprocess.Popen(
            [py_spy, "record", "--pid", str(pid), "--rate", str(RATE_HZ), "--format", "raw", "--output",
             str(out), "--idle", "--duration", "3600"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)  # attached before the request starts

    def stop(self) -> collections.Counter:
        self.process.send_signal(signal.SIGINT)
        _, err = self.process.communicate(timeout=60)
        if not self.out.exists():
            raise RuntimeError(f"py-spy wrote nothing: {err[-2000:]}")
        stacks: collections.Counter = collections.Counter()
        for line in self.out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            stacks[stack] += int(count)
        return stacks


def _frame(frame: str) -> str:
    """`function (path/to/file.py:line)` shortened to `function (file.py:line)`."""
    name, _, where = frame.partition(" (")
    return f"{name} ({Path(where.rstrip(')')).name})" if where else name


def _busy(stacks: collections.Counter) -> collections.Counter:
    """Samples that were computing, not waiting on a socket, a lock or the event loop's selector (a thread whose
    innermost Python frame is `Thread.run` is a C extension's thread, gRPC's poller, waiting in native code)."""
    def waiting(stack: str) -> bool:
        qualname = stack.split(";")[-1].split(" (")[0]
        return qualname == "Thread.run" or qualname.rsplit(".", 1)[-1] in _WAITS

    return collections.Counter({s: n for s, n in stacks.items() if not waiting(s)})


def summarise(title: str, stacks: collections.Counter, top: int = 15) -> str:
    total = sum(stacks.values()) or 1
    busy = _busy(stacks)
    leaves: collections.Counter = collections.Counter()
    for stack, n in busy.items():
        leaves[_frame(stack.split(";")[-1])] += n
    computing = sum(busy.values())
    lines = [f"## {title}", f"{total} samples of all threads at {RATE_HZ} Hz, {computing} of them computing",
             "", "innermost Python frame (share of computing samples):"]
    lines += [f"  {100 * n / max(computing, 1):5.1f}%  {leaf}" for leaf, n in leaves.most_common(top)]
    lines += ["", "top stacks (outermost first, last 6 frames):"]
    for stack, n in busy.most_common(5):
        frames = [_frame(f) for f in stack.split(";")][-6:]
        lines.append(f"  {100 * n / max(computing, 1):5.1f}%  " + " > ".join(frames))
    return "\n".join(lines) + "\n"


# (service, metric, labels, what it is) of the stages one cold Chat goes through, from the services' own metrics.
_STAGES = (
    ("gateway", "internvl_gateway_request_seconds_sum", {"method": "Chat"}, "gateway Chat, as the gateway saw it"),
    ("vision-0", "internvl_vision_request_seconds_sum", {"method": "Encode"}, "vision Encode call"),
    ("vision-0", "internvl_vision_encode_seconds_sum", {}, "  of which the encoder forward"),
    ("llm", "internvl_llm_request_seconds_sum", {"method": "Generate"}, "LLM Generate call"),
    ("llm", "internvl_llm_time_to_first_token_seconds_sum", {}, "  of which arrival to first token (fetch, prefill)"),
    ("llm", "internvl_llm_inter_token_latency_seconds_sum", {}, "  of which first to last token (decode steps)"),
)


def breakdown(stack: RunningStack, repeats: int = 3, new_tokens: int = 32) -> str:
    """Where the milliseconds of one cold image request go, stage by stage: the mean over `repeats` cold requests
    (a fresh 448x448 image each, `new_tokens` tokens) of each stage's seconds from the services' metrics."""
    def read() -> dict[str, float]:
        texts = {name: stack.metrics(name) for name in {stage[0] for stage in _STAGES}}
        return {what: metric_value(texts[name], metric, **labels) for name, metric, labels, what in _STAGES}

    totals: collections.Counter = collections.Counter()
    client = 0.0
    for i in range(repeats):
        before = read()
        t = chat(stack.chat, [image_part(W.image_png(W.seed(PROFILE_SEEDS, 4, i), 448)),
                              text_part(W.QUESTIONS[0])], new_tokens)
        client += t.total_s
        time.sleep(0.5)  # a stream's request metrics are recorded when the server closes it, just after the client
        after = read()
        for what in after:
            totals[what] += after[what] - before[what]
    lines = [f"## one cold image request, stage by stage (mean of {repeats}; 448x448 image, {new_tokens} tokens)",
             f"  {1e3 * client / repeats:8.1f} ms  end to end, as the client saw it"]
    lines += [f"  {1e3 * totals[what] / repeats:8.1f} ms  {what}" for _, _, _, what in _STAGES]
    gateway_own = totals[_STAGES[0][3]] - totals[_STAGES[1][3]] - totals[_STAGES[3][3]]
    lines.append(f"  {1e3 * gateway_own / repeats:8.1f} ms  the gateway's own (its Chat less the Encode and "
                 "Generate calls)")
    return "\n".join(lines) + "\n"


def _concurrent(stack: RunningStack, n: int, new_tokens: int) -> list:
    """The benchmark's concurrency scenario once: `n` requests with their own 448² image, started together."""
    images = [W.image_png(W.seed(PROFILE_SEEDS, 3, i), 448) for i in range(n)]
    started = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda data: chat(stack.chat, [image_part(data), text_part(W.QUESTIONS[0])], new_tokens,
                                               started=started), images))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--checkpoint-dir", default=str(REPO / "checkpoints" / "bench-1b-shape"))
    parser.add_argument("--dtype", default=None, help="default: the benchmark's (bfloat16 where the CPU has bf16 "
                        "units or on a GPU, else float32)")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or choose_dtype(None, choose_device())[0]
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        parser.error("py-spy is not installed (pip install py-spy)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="internvl-profile-"))
    sections = []
    with RunningStack(args.checkpoint_dir, args.dtype, replicas=1) as stack:
        chat(stack.chat, [image_part(W.image_png(W.seed(PROFILE_SEEDS, 0), 448)), text_part("Hello")], 2)  # warm-up
        sections.append(breakdown(stack))

        rec = Recording(py_spy, stack.pids["llm"], scratch / "llm.txt")
        t = chat(stack.chat, [text_part(W.DECODE_PROMPT + " (profile)")], 64)
        sections.append(summarise(f"LLM service, single-stream decode ({t.tokens} tokens, "
                                  f"{1e3 * t.decode_step_s():.0f} ms/step)", rec.stop()))

        rec = Recording(py_spy, stack.pids["vision-0"], scratch / "vision.txt")
        seconds, items = encode(stack.vision_stub(0), W.image_png(W.seed(PROFILE_SEEDS, 1), 896), 4)
        sections.append(summarise(f"vision service, cold Encode of {items[0].num_tiles} tiles ({seconds:.1f} s)",
                                  rec.stop()))

        rec = Recording(py_spy, stack.pids["gateway"], scratch / "gateway.txt")
        t = chat(stack.chat, [image_part(W.image_png(W.seed(PROFILE_SEEDS, 2), 448)), text_part(W.QUESTIONS[0])], 32)
        sections.append(summarise(f"gateway, one cold image request ({t.total_s:.1f} s end to end)", rec.stop()))

        llm = Recording(py_spy, stack.pids["llm"], scratch / "llm-8.txt")
        vision = Recording(py_spy, stack.pids["vision-0"], scratch / "vision-8.txt")
        timings = _concurrent(stack, 8, 64)
        start = min(t.started for t in timings)
        wall = max(t.finished for t in timings) - start
        ttfts = ", ".join(f"{t.deltas[0][0] - start:.0f}" for t in sorted(timings, key=lambda t: t.deltas[0][0]))
        what = (f"8 concurrent image requests of 64 tokens ({sum(t.tokens for t in timings) / wall:.2f} tok/s, "
                f"{wall:.0f} s; first tokens at {ttfts} s)")
        sections.append(summarise(f"LLM service, {what}", llm.stop()))
        sections.append(summarise(f"vision service, {what}", vision.stop()))
    stamp = datetime.date.today().isoformat()
    path = out_dir / f"{stamp}-profile.txt"
    path.write_text(f"# py-spy profile of the stack, {stamp} ({args.checkpoint_dir}, {args.dtype}; "
                    f"raw stacks in {scratch})\n\n"
                    + "\n".join(sections))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
