"""Ports in process: a server on port 0 reports the ports it bound in its port file, and a port it cannot bind (held
by a plain socket, or by another gRPC server) is a PortBindError of one line naming the flag, the address and why;
the CLI turns it into that line and exit status 2."""

from __future__ import annotations

import asyncio
import json
import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.runtime.grpc_server import GrpcServer, ServerOptions
from services.runtime.ports import PortBindError, bind_error, read_port_file, write_port_file
from services.runtime.request_metrics import RequestMetrics
from tools.cli import main
from tools.launcher import read_metrics

LOOPBACK = "127.0.0.1"
GATEWAY = ["gateway", "--vision-target", "127.0.0.1:1", "--llm-target", "127.0.0.1:2", "--host", LOOPBACK]


@pytest.fixture
def held_port():
    """A loopback port a plain listening socket holds for the test."""
    with socket.socket() as holder:
        holder.bind((LOOPBACK, 0))
        holder.listen()
        yield holder.getsockname()[1]


def server(**options) -> GrpcServer:
    return GrpcServer(ServerOptions(host=LOOPBACK, **options), ["test.Service"], requests=RequestMetrics("ports_"))


@pytest.mark.asyncio
async def test_port_zero_binds_and_reports_what_it_bound(tmp_path):
    port_file = tmp_path / "ports.json"
    served = server(port=0, metrics_port=0, port_file=str(port_file))
    port = await served.start()
    try:
        assert read_port_file(port_file) is None  # nothing until the process says everything is bound
        served.report_ports(http_port=12345)
        reported = json.loads(port_file.read_text())
        assert reported == {"port": port, "metrics_port": served.metrics_port, "http_port": 12345}
        assert 0 not in (port, served.metrics_port) and port != served.metrics_port
        async with grpc.aio.insecure_channel(f"{LOOPBACK}:{reported['port']}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        page = await asyncio.to_thread(read_metrics, reported["metrics_port"])
        assert "ports_request" in page
    finally:
        await served.stop()


@pytest.mark.asyncio
async def test_a_held_grpc_port_is_one_line(held_port):
    with pytest.raises(PortBindError) as refused:
        await server(port=held_port).start()
    assert str(refused.value) == f"--port: cannot bind 127.0.0.1:{held_port}: address in use"


@pytest.mark.asyncio
async def test_a_port_another_grpc_server_serves_is_not_shared(tmp_path):
    # gRPC's default SO_REUSEPORT would let the second server bind it too and take half of the first one's calls.
    first = server(port=0)
    port = await first.start()
    try:
        with pytest.raises(PortBindError, match=f"^--port: cannot bind 127.0.0.1:{port}: address in use$"):
            await server(port=port).start()
    finally:
        await first.stop()


@pytest.mark.asyncio
async def test_a_held_metrics_port_is_one_line(held_port):
    with pytest.raises(PortBindError) as refused:
        await server(port=0, metrics_port=held_port).start()
    assert str(refused.value) == f"--metrics-port: cannot bind 127.0.0.1:{held_port}: address in use"


def test_the_reason_comes_from_the_address():
    # 192.0.2.1 (TEST-NET-1) is no address of this machine.
    assert str(bind_error("--port", "192.0.2.1", 1234)) == \
        "--port: cannot bind 192.0.2.1:1234: address not available on this machine"


def test_a_port_file_is_whole_or_absent(tmp_path):
    path = tmp_path / "p.json"
    assert read_port_file(path) is None
    write_port_file(path, {"port": 1, "metrics_port": 2})
    write_port_file(path, {"port": 3})
    assert read_port_file(path) == {"port": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]  # no partial file left behind


@pytest.mark.parametrize("flag", ["--port", "--metrics-port", "--http-port"])
def test_the_cli_says_a_held_port_in_one_line_and_exits_2(flag, held_port, capfd):
    # capfd, not capsys: gRPC's core writes its own bind failures straight to file descriptor 2.
    code = main(["--log-level", "error", *GATEWAY, "--port", "0", flag, str(held_port)])
    err = capfd.readouterr().err
    assert code == 2
    line = f"internvl-serve gateway: error: {flag}: cannot bind 127.0.0.1:{held_port}: address in use"
    assert err.splitlines() == [line], err
