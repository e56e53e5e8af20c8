"""`host:port` as every address in the project is written (`[v6-address]:port` for IPv6), split once."""

from __future__ import annotations


def split_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """(host, port) of `text`; ValueError when it is not `host[:port]` (the port required unless `default_port`)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r} is not host:port")
        port = rest[1:]
    else:
        host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    if not port and default_port is not None:
        port = str(default_port)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not host:port")
    return host, int(port)
