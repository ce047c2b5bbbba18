"""Who may call what: checks against the identity the mutual-TLS handshake proved (never a request field).

On a plaintext server (dev mode on loopback) there is no identity and the checks pass: plaintext is
refused everywhere else, so a deployment always runs them.
"""

from __future__ import annotations

from typing import Any

import grpc

from common.certs import CertificateIdentityError, Identity
from common.tls import peer_identity


async def require_peer(context: Any, *, tls_on: bool, kinds: tuple[str, ...], node_id: str | None = None,
                       what: str) -> Identity | None:
    """The caller's identity if it is one of ``kinds`` (and ``node_id`` when given); else abort the call.

    No certificate on a TLS server is UNAUTHENTICATED; a certificate for someone else is PERMISSION_DENIED.
    """
    if not tls_on:
        return None
    try:
        identity = peer_identity(context)
    except CertificateIdentityError as exc:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{what}: {exc}")
        raise AssertionError("unreachable") from exc
    if identity is None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{what} needs a client certificate")
        raise AssertionError("unreachable")
    if identity.kind not in kinds or (node_id is not None and identity.node_id != node_id):
        wanted = "/".join(kinds) + (f" {node_id}" if node_id is not None else "")
        await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                            f"{what} is allowed only to {wanted}; the caller is {identity.kind} {identity.node_id}")
        raise AssertionError("unreachable")
    return identity
