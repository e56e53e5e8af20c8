"""`internvl-serve up` given a gateway port another process holds: one line naming the port and why, exit status 2,
no traceback, and nothing it started left running."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from procs import REPO
from stack import processes_mentioning

from tools.launcher import cli_env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def test_a_held_gateway_port_is_one_line_and_exit_2(tiny_checkpoint, tmp_path):
    logs = tmp_path / "logs"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        held = holder.getsockname()[1]
        up = subprocess.run([sys.executable, "-m", "tools.cli", "up", "--model", str(tiny_checkpoint()), "--dtype",
                             "float32", "--gateway-port", str(held), "--http-port", "0", "--metrics-port", "0",
                             "--log-dir", str(logs)],
                            cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=240, check=False)
    assert up.returncode == 2, up.stderr
    assert "Traceback" not in up.stderr
    [line] = up.stderr.splitlines()
    assert line.startswith("internvl-serve up: error: gateway exited with 2 while starting: internvl-serve gateway: "
                           f"error: --port: cannot bind 127.0.0.1:{held}: address in use (its log: "), line
    # Redis and the model services it had started were stopped.
    assert processes_mentioning(str(logs)) == []
