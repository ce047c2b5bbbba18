"""Mutual-TLS credentials for every splitmesh gRPC endpoint, and the peer identity they prove.

A peer's identity is read only from the certificate the TLS handshake verified (the gRPC auth
context), never from a field the peer fills in itself.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from common.certs import Identity, identity_dns_name, identity_from_cert

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsConfig:
    """Paths of one process's TLS material, as written by ``splitmesh certs``."""

    ca: Path  # the cluster CA certificate: the only root trusted for peers
    cert: Path  # this process's certificate (PEM)
    key: Path  # this process's private key (PEM, mode 0600)

    @classmethod
    def from_dir(cls, directory: Path, node_id: str) -> TlsConfig:
        """The layout ``splitmesh certs issue`` writes: ca.crt, NODE_ID.crt, NODE_ID.key."""
        return cls(directory / "ca.crt", directory / f"{node_id}.crt", directory / f"{node_id}.key")


def server_credentials(cfg: TlsConfig) -> grpc.ServerCredentials:
    """Server side: present our certificate and require a client certificate signed by the cluster CA."""
    return grpc.ssl_server_credentials([(cfg.key.read_bytes(), cfg.cert.read_bytes())],
                                       root_certificates=cfg.ca.read_bytes(), require_client_auth=True)


def channel_credentials(cfg: TlsConfig) -> grpc.ChannelCredentials:
    """Client side: trust only the cluster CA and present our certificate."""
    return grpc.ssl_channel_credentials(root_certificates=cfg.ca.read_bytes(), private_key=cfg.key.read_bytes(),
                                        certificate_chain=cfg.cert.read_bytes())


def expect_peer_options(kind: str, node_id: str) -> list[tuple[str, str]]:
    """Channel options that make the handshake accept only the named peer (whatever address it is dialled at)."""
    return [("grpc.ssl_target_name_override", identity_dns_name(kind, node_id))]


def peer_identity(context: Any) -> Identity | None:
    """(kind, node_id) of the peer of a sync or asyncio servicer context; None on an unauthenticated channel.

    Raises ``CertificateIdentityError`` for a verified certificate that carries no splitmesh identity.
    """
    auth = context.auth_context()
    if auth.get("transport_security_type") != [b"ssl"]:
        return None
    pems = auth.get("x509_pem_cert")
    if not pems:
        return None
    return identity_from_cert(pems[0])


def _host(address: str) -> str:
    if address.startswith("unix:") or address.startswith("unix-abstract:"):
        return address
    if address.startswith("["):
        return address[1:].partition("]")[0]
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or ":" in host:  # no port, or a bare IPv6 address
        return address
    return host


def insecure_allowed(address: str) -> bool:
    """Plaintext gRPC is allowed only on loopback or a unix socket (dev mode); warn whenever it is used."""
    host = _host(address)
    if host.startswith("unix"):
        return True
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_plaintext(address: str) -> None:
    log.warning("gRPC on %s is PLAINTEXT (dev mode, loopback only); configure certificates for mutual TLS", address)
