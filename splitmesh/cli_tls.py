"""Which certificate the CLI presents to which mesh, and what to say when a connection fails.

``splitmesh up`` records each local mesh it starts (address -> its TLS folder) under
``~/.cache/splitmesh/meshes`` (``SPLITMESH_MESHES_DIR``), so a command that dials that address
finds the mesh's certificates with no flag. Explicit settings win: ``--tls-dir``, then
``SPLITMESH_TLS_DIR``. Commands that change the mesh present the ``operator`` certificate
(``SPLITMESH_OPERATOR_ID``), the others the ``client`` one (``SPLITMESH_CLIENT_ID``); ``--tls-id``
names one for every command.
"""

from __future__ import annotations

import os
import socket

import grpc

from common.certs import Identity
from common.tls import TlsConfig
from common.transport import (
    DEFAULT_CLIENT_ID,
    DEFAULT_OPERATOR_ID,
    DEFAULT_ORCHESTRATOR_ID,
    ENV_CLIENT_ID,
    ENV_OPERATOR_ID,
    ENV_ORCHESTRATOR_ID,
    ENV_TLS_DIR,
    resolve_tls,
    sync_channel,
)
from splitmesh.local_meshes import MeshRecord

READY_TIMEOUT_S = 3.0


def certificate_name(explicit: str | None, operator: bool) -> str:
    """``--tls-id``, else the operator or client name from the environment, else the default."""
    if explicit:
        return explicit
    if operator:
        return os.environ.get(ENV_OPERATOR_ID) or DEFAULT_OPERATOR_ID
    return os.environ.get(ENV_CLIENT_ID) or DEFAULT_CLIENT_ID


def tls_folder(explicit: str | None, address: str) -> tuple[str, str]:
    """(folder, where it came from); folder "" = plaintext."""
    if explicit:
        return explicit, "--tls-dir"
    if os.environ.get(ENV_TLS_DIR):
        return os.environ[ENV_TLS_DIR], ENV_TLS_DIR
    record = MeshRecord.load(address)
    if record is not None:
        return record.tls_dir, f"the mesh `splitmesh up` runs at {address}"
    return "", ""


def resolve(explicit_dir: str | None, explicit_id: str | None, address: str, operator: bool) -> TlsConfig | None:
    """The TLS files to present to ``address``, or None for plaintext (TransportError when files are missing)."""
    folder, _ = tls_folder(explicit_dir, address)
    return resolve_tls(folder, certificate_name(explicit_id, operator))


def _listening(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=2):
            return True
    except (OSError, ValueError):
        return False


def connection_problem(address: str, tls: TlsConfig | None, what: str = "the orchestrator") -> str | None:
    """Why no channel to ``address`` comes up, or None when it does (the failure was the server's answer)."""
    orchestrator = Identity("orchestrator", os.environ.get(ENV_ORCHESTRATOR_ID) or DEFAULT_ORCHESTRATOR_ID)
    with sync_channel(address, tls, orchestrator) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=READY_TIMEOUT_S)
            return None
        except grpc.FutureTimeoutError:
            pass
    if not _listening(address):
        return f"cannot reach {what} at {address} (is the mesh up?)"
    if tls is None:
        return (f"{address} accepts connections but not in plaintext: it serves mutual TLS. Point --tls-dir or "
                f"{ENV_TLS_DIR} at a folder with its ca.crt and your certificate "
                f"(`splitmesh up` prints the folder of a local mesh)")
    return (f"the TLS handshake with {address} failed: check that {tls.ca} is that mesh's CA, that {tls.cert} "
            f"was issued by it, and that the mesh serves TLS")
