"""TLS and mutual TLS for every gRPC server and client of the project, in one place.

Servers: `--tls-cert` and `--tls-key` (PEM) switch the port to TLS; `--tls-client-ca` additionally requires every
client to present a certificate signed by that CA (mutual TLS), so only holders of such a certificate (the gateway,
say) can call an internal service. Clients: `ClientTls` names the CA that signs the servers' certificates and,
for mutual TLS, the client's own certificate and key.

Each path may also come from the environment (`INTERNVL_TLS_CERT`, ... below), read only when a service's config is
built from its command line (the flags are the fields of `ServerTlsFlags` and `UpstreamTlsFlags`). Files are read when the config is built too, so a missing or unreadable file fails at
start-up with a one-line message, not at the first call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import grpc

from services.contract.errors import InvalidArgumentError
from services.runtime.flags import flag

ENV_TLS_CERT = "INTERNVL_TLS_CERT"
ENV_TLS_KEY = "INTERNVL_TLS_KEY"
ENV_TLS_CLIENT_CA = "INTERNVL_TLS_CLIENT_CA"
ENV_UPSTREAM_TLS_CA = "INTERNVL_UPSTREAM_TLS_CA"
ENV_UPSTREAM_TLS_CERT = "INTERNVL_UPSTREAM_TLS_CERT"
ENV_UPSTREAM_TLS_KEY = "INTERNVL_UPSTREAM_TLS_KEY"


def _read(path: str, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgumentError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from None
    if b"-----BEGIN" not in data:
        raise InvalidArgumentError(f"{flag} {path}: not a PEM file")
    return data


@dataclass(frozen=True)
class ServerTls:
    """A server's certificate chain and key (PEM bytes), and the CA its clients must be signed by, if any."""

    certificate_chain: bytes = field(repr=False)
    private_key: bytes = field(repr=False)
    # Set: mutual TLS, a client without a certificate signed by this CA is refused during the handshake.
    client_ca: bytes | None = field(default=None, repr=False)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.private_key, self.certificate_chain)],
                                           root_certificates=self.client_ca,
                                           require_client_auth=self.client_ca is not None)

    @classmethod
    def from_files(cls, cert: str | None, key: str | None, client_ca: str | None,
                   flags: tuple[str, str, str] = ("--tls-cert", "--tls-key", "--tls-client-ca")) -> ServerTls | None:
        """None when neither cert nor key is given (plaintext); both are needed for TLS."""
        if not cert and not key:
            if client_ca:
                raise InvalidArgumentError(f"{flags[2]} needs {flags[0]} and {flags[1]}: mutual TLS is TLS first")
            return None
        if not (cert and key):
            raise InvalidArgumentError(f"{flags[0]} and {flags[1]} go together")
        return cls(_read(cert, flags[0]), _read(key, flags[1]), _read(client_ca, flags[2]) if client_ca else None)


@dataclass(frozen=True)
class ClientTls:
    """What a client needs to call a TLS server: the CA of the servers' certificates, and for mutual TLS its own."""

    # None: the system's trust store.
    root_certificates: bytes | None = field(default=None, repr=False)
    certificate_chain: bytes | None = field(default=None, repr=False)
    private_key: bytes | None = field(default=None, repr=False)
    # Overrides the name checked against the server's certificate (when the target's host name is not in it).
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    @classmethod
    def from_files(cls, ca: str | None, cert: str | None, key: str | None, server_name: str | None = None,
                   flags: tuple[str, str, str] = ("--tls-ca", "--tls-cert", "--tls-key")) -> ClientTls | None:
        """None when no file is named (plaintext)."""
        if not (ca or cert or key):
            return None
        if bool(cert) != bool(key):
            raise InvalidArgumentError(f"{flags[1]} and {flags[2]} go together")
        return cls(_read(ca, flags[0]) if ca else None, _read(cert, flags[1]) if cert else None,
                   _read(key, flags[2]) if key else None, server_name or None)


def secure_or_insecure_channel(target: str, options: list, tls: ClientTls | None) -> grpc.aio.Channel:
    """An aio channel to `target`: TLS when `tls` is given, plaintext otherwise."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, tls.credentials(), options=[*options, *tls.channel_options()])


# ---------------------------------------------------------------------------------------------------- flags


@dataclass(frozen=True)
class ServerTlsFlags:
    """A server's TLS flags: PEM paths, each defaulting to its environment variable."""

    tls_cert: str | None = flag(
        None, f"PEM certificate chain of this server; with --tls-key serves TLS (env {ENV_TLS_CERT})", env=ENV_TLS_CERT)
    tls_key: str | None = flag(None, f"PEM private key of --tls-cert (env {ENV_TLS_KEY})", env=ENV_TLS_KEY)
    tls_client_ca: str | None = flag(
        None, "PEM CA bundle; clients must present a certificate it signed (mutual TLS) "
              f"(env {ENV_TLS_CLIENT_CA})", env=ENV_TLS_CLIENT_CA)

    def load(self) -> ServerTls | None:
        return ServerTls.from_files(self.tls_cert, self.tls_key, self.tls_client_ca)


@dataclass(frozen=True)
class UpstreamTlsFlags:
    """The gateway's TLS flags towards the vision and LLM services: PEM paths, each defaulting to its variable."""

    upstream_tls_ca: str | None = flag(
        None, "PEM CA bundle that signed the services' certificates; enables TLS to them "
              f"(env {ENV_UPSTREAM_TLS_CA})", env=ENV_UPSTREAM_TLS_CA)
    upstream_tls_cert: str | None = flag(
        None, f"PEM client certificate for services requiring mutual TLS (env {ENV_UPSTREAM_TLS_CERT})",
        env=ENV_UPSTREAM_TLS_CERT)
    upstream_tls_key: str | None = flag(
        None, f"PEM private key of --upstream-tls-cert (env {ENV_UPSTREAM_TLS_KEY})", env=ENV_UPSTREAM_TLS_KEY)
    upstream_tls_server_name: str | None = flag(
        None, "name to check the services' certificates against, when it is not the target's host")

    def load(self) -> ClientTls | None:
        return ClientTls.from_files(self.upstream_tls_ca, self.upstream_tls_cert, self.upstream_tls_key,
                                    self.upstream_tls_server_name,
                                    flags=("--upstream-tls-ca", "--upstream-tls-cert", "--upstream-tls-key"))
