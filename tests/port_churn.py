"""Churns loopback ports the way a busy machine does, to try the tests' process start-up against it.

    python tests/port_churn.py [--seconds S] [--held N] [--hold-s H]

Keeps N loopback sockets in use at any moment, each for a random time up to H seconds, then replaced by a new one:
half of them listeners bound to port 0 (servers on ephemeral ports: Linux hands bind(0) the odd ports of the
ephemeral range), half client connections to a listener of its own (connect() takes the even ports first). A program
that picks a "free" port and passes the number to a child loses that port whenever one of these sockets takes it in
between; a child that binds port 0 itself cannot lose it. One thread, no sleeping sockets: the cost is the system
calls. Prints the sockets it cycled per second every 10 seconds; runs for S seconds (default: until interrupted).
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import itertools
import random
import socket
import time

LOOPBACK = "127.0.0.1"


def _open(kind: int, target: tuple[str, int]) -> socket.socket:
    """A listener on port 0 (kind 1) or a connection to `target` under way (kind 0)."""
    sock = socket.socket()
    try:
        if kind:
            sock.bind((LOOPBACK, 0))
            sock.listen(1)
        else:
            sock.setblocking(False)
            sock.connect_ex(target)
    except OSError:
        sock.close()
        raise
    return sock


def churn(seconds: float | None, held: int, hold_s: float, report_every_s: float = 10.0) -> int:
    """Runs the churn (`held` sockets at once) for `seconds` (None: until interrupted); the sockets cycled."""
    server = socket.socket()
    server.bind((LOOPBACK, 0))
    server.listen(4096)
    server.setblocking(False)
    target = server.getsockname()
    rng = random.Random(0)
    sockets: list[tuple[float, int, socket.socket]] = []  # a heap by the time each is closed
    order = itertools.count()
    cycled = reported = 0
    started = next_report = time.monotonic()
    stop = started + seconds if seconds is not None else float("inf")
    try:
        while (now := time.monotonic()) < stop:
            while sockets and sockets[0][0] <= now:
                heapq.heappop(sockets)[2].close()
                cycled += 1
            while len(sockets) < held:
                try:
                    sock = _open(len(sockets) % 2, target)
                except OSError:
                    break  # ports or descriptors exhausted for a moment, as on a busy machine
                heapq.heappush(sockets, (now + rng.uniform(0, hold_s), next(order), sock))
            with contextlib.suppress(BlockingIOError):
                while True:  # the churn's own connections: accepted and closed (the client keeps its port)
                    server.accept()[0].close()
            if now >= next_report:
                print(f"{now - started:6.0f}s: {(cycled - reported) / report_every_s:8.0f} sockets cycled per "
                      f"second, {len(sockets)} held", flush=True)
                reported, next_report = cycled, next_report + report_every_s
            time.sleep(0.001)
    finally:
        for _, _, sock in sockets:
            sock.close()
        server.close()
    return cycled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=None, help="how long to churn (default: until Ctrl-C)")
    parser.add_argument("--held", type=int, default=4000, help="sockets in use at any moment (default 4000)")
    parser.add_argument("--hold-s", type=float, default=1.0, help="longest a socket is held (default 1 s)")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        churn(args.seconds, args.held, args.hold_s)


if __name__ == "__main__":
    main()
