"""`python -m bench.priorities`: load shedding with priorities, measured against `internvl-serve up`.

One stack (one vision and one LLM replica) with admission control tight enough to saturate on a CPU: the gateway's
`--max-in-flight` slots (`--critical-reserve` of them for critical requests only) and an LLM batch that holds them
all. Two phases:

1. Unloaded: critical requests one after another; their time to first token (TTFT) is the reference.
2. Saturated: closed-loop clients of standard and of sheddable requests (each sends its next request as soon as the
   last ends; after a refusal it waits the advised `retry-after`, as a well-behaved client does, or
   `--refused-pause-s` when that is set, to keep more pressure on), and beside them one client of critical requests,
   one after another, as in phase 1.

Per priority it reports the requests sent, answered, refused UNAVAILABLE (shed) and past their deadline, and the
TTFT of the answered ones; and the gateway's own counters (`admitted`, `shed` by reason). Written as JSON (`--out`)
and printed as a markdown table. What the results should show: sheddable requests are refused while standard ones
wait and are answered, and critical requests keep a TTFT within 2x of phase 1's.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from internvl.common.v1 import common_pb2
from internvl.gateway.v1 import gateway_pb2 as G
from internvl.gateway.v1 import gateway_pb2_grpc

from bench.stack import RunningStack

PRIORITIES = {"critical": common_pb2.PRIORITY_CRITICAL, "standard": common_pb2.PRIORITY_STANDARD,
              "sheddable": common_pb2.PRIORITY_SHEDDABLE}
QUESTION = "Describe a quiet harbour town at dawn in a few sentences."


@dataclass
class Tally:
    """What one priority's requests met: counts by outcome, and the TTFT (seconds) of the answered ones."""

    sent: int = 0
    answered: int = 0
    shed: int = 0
    deadline: int = 0
    other: int = 0
    ttft_s: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def summary(self) -> dict:
        ttft = sorted(self.ttft_s)
        return {"sent": self.sent, "answered": self.answered, "shed": self.shed, "deadline": self.deadline,
                "other": self.other, "ttft_p50_s": _quantile(ttft, 0.5), "ttft_p90_s": _quantile(ttft, 0.9)}


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(q * len(values)))]


def one_chat(stub, priority: int, max_new_tokens: int, timeout_s: float, tally: Tally) -> float:
    """One streamed Chat; its outcome counted in `tally`. 0 when it was answered, else the seconds to wait before
    the next (its `retry-after`, 1 s without one)."""
    request = G.ChatRequest(content=[G.ContentPart(text=QUESTION)], priority=priority,
                            sampling=G.SamplingParams(max_new_tokens=max_new_tokens))
    started = time.perf_counter()
    first = None
    outcome, retry_after = "answered", 0.0
    try:
        for reply in stub.Chat(request, timeout=timeout_s):
            if first is None and reply.HasField("delta") and reply.delta.token_ids:
                first = time.perf_counter() - started
    except grpc.RpcError as exc:
        outcome = {grpc.StatusCode.UNAVAILABLE: "shed",
                   grpc.StatusCode.DEADLINE_EXCEEDED: "deadline"}.get(exc.code(), "other")
        retry_after = float(dict(exc.trailing_metadata() or ()).get("retry-after", 1))
    with tally.lock:
        tally.sent += 1
        setattr(tally, outcome, getattr(tally, outcome) + 1)
        if outcome == "answered" and first is not None:
            tally.ttft_s.append(first)
    return retry_after


def closed_loop(until: float, send: Callable[[], float], refused_pause_s: float | None) -> None:
    """Sends until wall time `until`, each request as soon as the last ended (after a refusal's pause)."""
    while time.time() < until:
        retry_after = send()
        if retry_after:
            time.sleep(retry_after if refused_pause_s is None else refused_pause_s)


def load_process(address: str, name: str, clients: int, until: float, max_new_tokens: int, timeout_s: float,
                 refused_pause_s: float | None, results) -> None:
    """`clients` closed-loop clients of priority `name` until wall time `until`; puts (name, summary) on `results`."""
    channel = grpc.insecure_channel(address)
    stub = gateway_pb2_grpc.ChatServiceStub(channel)
    tally = Tally()
    threads = [threading.Thread(target=closed_loop, daemon=True, args=(
        until, lambda: one_chat(stub, PRIORITIES[name], max_new_tokens, timeout_s, tally), refused_pause_s))
        for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    channel.close()
    results.put((name, tally.summary()))


def critical_series(stub, n: int, max_new_tokens: int, timeout_s: float, pause_s: float,
                    priority: str = "critical") -> Tally:
    """`n` requests of `priority` one after another (`pause_s` apart)."""
    tally = Tally()
    for _ in range(n):
        one_chat(stub, PRIORITIES[priority], max_new_tokens, timeout_s, tally)
        time.sleep(pause_s)
    return tally


def gateway_counters(text: str) -> dict[str, float]:
    """The gateway's admission counters from its /metrics text, by `name{labels}`."""
    found = {}
    for line in text.splitlines():
        match = re.match(r"^internvl_gateway_(admitted_total|shed_total)\{([^}]*)\} (\S+)$", line)
        if match and float(match.group(3)):
            found[f"{match.group(1)}{{{match.group(2)}}}"] = float(match.group(3))
    return found


def run(args: argparse.Namespace) -> dict:
    model = args.model
    if model is None:
        from services.model.tiny import make_tiny

        model = str(make_tiny(Path(tempfile.mkdtemp(prefix="bench-priorities-")) / "tiny"))
    flags = ["--max-in-flight", str(args.max_in_flight), "--critical-reserve", str(args.critical_reserve),
             "--queue-wait-s", str(args.queue_wait_s), "--max-batch-size", str(args.max_in_flight)]
    with RunningStack(model, "float32", 1, extra_flags=flags) as stack:
        stub = stack.chat
        one_chat(stub, PRIORITIES["critical"], 4, args.timeout_s, Tally())  # warm-up, not counted
        unloaded = critical_series(stub, args.critical_requests, args.critical_tokens, args.timeout_s, args.pause_s,
                                   args.probe_priority)
        # The load's clients run in processes of their own, so that their streams do not hold this process's GIL
        # while the critical client times its first tokens.
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        until = time.time() + args.duration_s
        loaders = [context.Process(target=load_process, daemon=True, args=(
            f"127.0.0.1:{stack.gateway_port}", name, count, until, args.load_tokens, args.timeout_s,
            args.refused_pause_s, results))
            for name, count in (("standard", args.standard_clients), ("sheddable", args.sheddable_clients))]
        for loader in loaders:
            loader.start()
        time.sleep(args.ramp_s)  # the load fills the slots first
        loaded = critical_series(stub, args.critical_requests, args.critical_tokens, args.timeout_s, args.pause_s,
                                 args.probe_priority)
        tallies = dict(results.get(timeout=args.duration_s + args.timeout_s + 60) for _ in loaders)
        for loader in loaders:
            loader.join()
        counters = gateway_counters(stack.metrics("gateway"))
    p50 = unloaded.summary()["ttft_p50_s"]
    result = {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "model": model,
        "load_average": list(os.getloadavg()),
        "cpus": len(os.sched_getaffinity(0)),
        "unloaded_critical": unloaded.summary(),
        "saturated": {"critical": loaded.summary(), **{name: tallies[name] for name in ("standard", "sheddable")}},
        "critical_ttft_ratio_p50": (loaded.summary()["ttft_p50_s"] / p50) if p50 and loaded.ttft_s else None,
        "gateway_counters": counters,
    }
    return result


def markdown(result: dict) -> str:
    rows = ["| phase | priority | sent | answered | shed (503) | deadline | TTFT p50 | TTFT p90 |",
            "|---|---|---|---|---|---|---|---|"]

    def row(phase: str, name: str, s: dict) -> str:
        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v * 1000:.0f} ms"
        return (f"| {phase} | {name} | {s['sent']} | {s['answered']} | {s['shed']} | {s['deadline']} | "
                f"{ms(s['ttft_p50_s'])} | {ms(s['ttft_p90_s'])} |")

    probe = result["settings"]["probe_priority"]
    rows.append(row("unloaded", f"{probe} (timed)", result["unloaded_critical"]))
    for name, summary in result["saturated"].items():
        rows.append(row("saturated", f"{probe} (timed)" if name == "critical" else name, summary))
    ratio = result["critical_ttft_ratio_p50"]
    rows.append("")
    rows.append(f"timed ({probe}) TTFT p50, saturated / unloaded: {ratio:.2f}x" if ratio else "TTFT ratio: -")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.priorities", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the tiny random one, written to a temp "
                                                      "directory)")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    parser.add_argument("--max-in-flight", type=int, default=8, help="the gateway's slots, and the LLM's batch")
    parser.add_argument("--critical-reserve", type=int, default=2)
    parser.add_argument("--queue-wait-s", type=float, default=30.0)
    parser.add_argument("--standard-clients", type=int, default=8)
    parser.add_argument("--sheddable-clients", type=int, default=8)
    parser.add_argument("--load-tokens", type=int, default=64, help="max_new_tokens of the standard and sheddable "
                                                                    "requests")
    parser.add_argument("--critical-tokens", type=int, default=8, help="max_new_tokens of the critical requests")
    parser.add_argument("--critical-requests", type=int, default=20, help="critical requests in each phase")
    parser.add_argument("--probe-priority", choices=sorted(PRIORITIES), default="critical",
                        help="priority of the timed requests ('standard' with --critical-reserve 0: the same load "
                             "without priorities, for comparison)")
    parser.add_argument("--pause-s", type=float, default=0.2, help="between two critical requests")
    parser.add_argument("--refused-pause-s", type=float, default=None,
                        help="pause of a refused load client (default: the refusal's retry-after)")
    parser.add_argument("--ramp-s", type=float, default=3.0)
    parser.add_argument("--duration-s", type=float, default=40.0, help="of the saturating load")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="each request's deadline")
    args = parser.parse_args(argv)
    result = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(json.dumps(result["gateway_counters"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

