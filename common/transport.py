"""How every splitmesh process binds its server and dials its peers: mutual TLS, or plaintext on loopback.

With certificates every channel is mutual TLS and a client pins the identity it expects (the plan says
which node it dials), so an address taken over by another cluster member is refused in the handshake.
Without certificates gRPC is plaintext: allowed only on loopback (dev mode), or elsewhere with an
explicit ``--insecure``, and always logged as a warning.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import grpc

from common.certs import Identity
from common.grpc_options import CHANNEL_OPTIONS
from common.tls import (
    TlsConfig,
    channel_credentials,
    expect_peer_options,
    insecure_allowed,
    server_credentials,
    warn_plaintext,
)

log = logging.getLogger(__name__)

DEFAULT_ORCHESTRATOR_ID = "orchestrator"  # certificate name of the orchestrator (kind orchestrator)
DEFAULT_CLIENT_ID = "client"  # certificate name the SDK and CLI present (kind client)
DEFAULT_OPERATOR_ID = "operator"  # certificate name the CLI presents to change the mesh (kind operator)
ENV_TLS_DIR = "SPLITMESH_TLS_DIR"
ENV_CLIENT_ID = "SPLITMESH_CLIENT_ID"
ENV_OPERATOR_ID = "SPLITMESH_OPERATOR_ID"
ENV_ORCHESTRATOR_ID = "SPLITMESH_ORCHESTRATOR_ID"
TLS_ENV = (ENV_TLS_DIR, ENV_CLIENT_ID, ENV_OPERATOR_ID, ENV_ORCHESTRATOR_ID, "SPLITMESH_TLS_CA",
           "SPLITMESH_TLS_CERT", "SPLITMESH_TLS_KEY", "SPLITMESH_INSECURE")


class TransportError(ValueError):
    """TLS settings are incomplete, point at missing files, or plaintext is refused on this address."""


def resolve_tls(tls_dir: str, name: str, ca: str = "", cert: str = "", key: str = "") -> TlsConfig | None:
    """The TLS files from config fields: explicit paths win over ``tls_dir``'s layout; nothing set = plaintext."""
    if not (tls_dir or ca or cert or key):
        return None
    base = TlsConfig.from_dir(Path(tls_dir).expanduser(), name) if tls_dir else None
    paths = [Path(p).expanduser() if p else (getattr(base, field) if base else None)
             for p, field in ((ca, "ca"), (cert, "cert"), (key, "key"))]
    if any(p is None for p in paths):
        raise TransportError("TLS needs tls_dir, or all three of tls_ca, tls_cert and tls_key")
    config = TlsConfig(*paths)  # type: ignore[arg-type]  # none is None here
    missing = [str(p) for p in (config.ca, config.cert, config.key) if not p.is_file()]
    if missing:
        raise TransportError(f"TLS files not found: {', '.join(missing)} (create them with `splitmesh certs`)")
    return config


def tls_from_env(env: Mapping[str, str] | None = None) -> TlsConfig | None:
    """The SDK's default: ``SPLITMESH_TLS_DIR`` with the ``SPLITMESH_CLIENT_ID`` certificate (default client)."""
    env = os.environ if env is None else env
    return resolve_tls(env.get(ENV_TLS_DIR, ""), env.get(ENV_CLIENT_ID, DEFAULT_CLIENT_ID))


def bind(server: grpc.aio.Server | grpc.Server, address: str, tls: TlsConfig | None, *,
         insecure: bool = False) -> int:
    """Add the listening port: mutual TLS when configured, else plaintext only where that is allowed."""
    if tls is not None:
        return int(server.add_secure_port(address, server_credentials(tls)))
    if not insecure_allowed(address) and not insecure:
        raise TransportError(f"refusing to serve plaintext gRPC on {address}, which is not loopback: "
                             "configure certificates (--tls-dir) or pass --insecure")
    warn_plaintext(address)
    return int(server.add_insecure_port(address))


@functools.lru_cache(maxsize=16)
def _credentials(tls: TlsConfig) -> grpc.ChannelCredentials:
    return channel_credentials(tls)  # read once per process: channels are long-lived, certs rotate on restart


@functools.lru_cache(maxsize=256)
def _warn_client_plaintext(address: str) -> None:
    if not insecure_allowed(address):
        log.warning("dialling %s in PLAINTEXT: configure certificates for mutual TLS", address)


def _options(tls: TlsConfig | None, peer: Identity | None) -> list[tuple[str, int | str]]:
    options: list[tuple[str, int | str]] = list(CHANNEL_OPTIONS)
    if tls is not None and peer is not None:
        options += expect_peer_options(peer.kind, peer.node_id)
    return options


def aio_channel(address: str, tls: TlsConfig | None, peer: Identity | None = None) -> grpc.aio.Channel:
    """An asyncio channel: mutual TLS expecting ``peer`` (when given), or plaintext."""
    if tls is None:
        _warn_client_plaintext(address)
        return grpc.aio.insecure_channel(address, options=_options(None, None))
    return grpc.aio.secure_channel(address, _credentials(tls), options=_options(tls, peer))


def sync_channel(address: str, tls: TlsConfig | None, peer: Identity | None = None) -> grpc.Channel:
    """The blocking twin of :func:`aio_channel`."""
    if tls is None:
        _warn_client_plaintext(address)
        return grpc.insecure_channel(address, options=_options(None, None))
    return grpc.secure_channel(address, _credentials(tls), options=_options(tls, peer))
