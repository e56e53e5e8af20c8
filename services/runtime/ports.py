"""The ports a server binds: a refusal in one line, and the report of the ports it got.

A server given port 0 binds whatever free port the kernel hands it, so nothing can take the port between a choice and
the bind. Whoever started it learns the ports from the file it names with `--port-file`: a JSON object such as
`{"port": 43117, "metrics_port": 40211, "http_port": 39003}`, written once everything is bound (to a temporary name,
then renamed, so a reader never sees half of it).
"""

from __future__ import annotations

import errno
import json
import os
import socket
from collections.abc import Mapping
from pathlib import Path

from services.contract.errors import InternVLError

# Words for the errno of a failed bind; any other errno is described by os.strerror.
_REASONS = {errno.EADDRINUSE: "address in use", errno.EADDRNOTAVAIL: "address not available on this machine",
            errno.EACCES: "permission denied"}


class PortBindError(InternVLError):
    """A server cannot bind the address it was given (taken by another process, not this machine's, privileged)."""


def bind_error(flag: str, host: str, port: int, cause: BaseException | None = None) -> PortBindError:
    """'FLAG: cannot bind HOST:PORT: REASON', the reason read from `cause` (an OSError) or found by trying the
    address again; 'address in use' when neither says more."""
    reason = _reason(cause) or _reason(_try_bind(host, port)) or _REASONS[errno.EADDRINUSE]
    return PortBindError(f"{flag}: cannot bind {host}:{port}: {reason}")


def check_bindable(flag: str, host: str, port: int) -> None:
    """PortBindError now if `host:port` cannot be bound (nothing to check for port 0, which any free port serves).

    gRPC reports a failed bind with a line of its own on stderr and no reason; this check makes the usual case, a
    port somebody else holds, one line with the reason. (A port taken between this check and the bind still fails
    the bind, with gRPC's line.)"""
    if port != 0:
        failure = _try_bind(host, port)
        if failure is not None:
            raise bind_error(flag, host, port, failure)


def _try_bind(host: str, port: int) -> OSError | None:
    """The error of binding `host:port` with the options a server binds with (SO_REUSEADDR), or None (also when
    the host does not resolve: the server's own bind says so)."""
    try:  # gRPC takes IPv6 addresses in brackets, the socket API without
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    except OSError:
        return None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return exc
    return None


def _reason(cause: BaseException | None) -> str | None:
    if isinstance(cause, OSError) and cause.errno is not None:
        return _REASONS.get(cause.errno) or os.strerror(cause.errno).lower()
    return None


def write_port_file(path: str | Path, ports: Mapping[str, int]) -> None:
    """`ports` as JSON at `path`, atomically (a reader sees the whole file or none)."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(dict(ports)) + "\n")
    os.replace(partial, path)


def read_port_file(path: str | Path) -> dict[str, int] | None:
    """The ports a server reported at `path`, or None while it has not."""
    try:
        return {name: int(port) for name, port in json.loads(Path(path).read_text()).items()}
    except FileNotFoundError:
        return None
