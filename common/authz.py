"""Who may call what: one table from every RPC to the certificate kinds allowed to call it, enforced in one
server interceptor installed on every splitmesh server.

The caller's kind and id come only from the certificate the mutual-TLS handshake verified (never from a
request field). A rule that also depends on a request field (a node may register and report only as itself,
activations only from the plan's predecessor) is checked by the servicer that reads that field; the table
names it in ``also`` so that every rule is listed here. A method missing from the table is refused.

On a plaintext server (dev mode on loopback, an explicit opt-out) there is no identity and every call passes.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from common.certs import CertificateIdentityError, Identity
from common.grpc_options import SERVER_OPTIONS
from common.request_decoding import MalformedRequests
from common.tls import peer_identity

log = logging.getLogger(__name__)

NODE, ORCHESTRATOR, OPERATOR, CLIENT = "node", "orchestrator", "operator", "client"
EVERYONE = frozenset({NODE, ORCHESTRATOR, OPERATOR, CLIENT})
READERS = frozenset({OPERATOR, CLIENT})  # people and programs that read the mesh's state or generate


@dataclass(frozen=True)
class Rule:
    kinds: frozenset[str]  # certificate kinds allowed to call the method
    also: str = ""  # a further own-identity rule, checked by the servicer where the identity is in the request


_ORCH = "/splitmesh.v1.Orchestrator/"
_FILES = "/splitmesh.v1.ModelFiles/"
_ADMIN = "/splitmesh.v1.Admin/"
_NODE = "/splitmesh.v1.Node/"
_HEALTH = "/grpc.health.v1.Health/"

TABLE: Mapping[str, Rule] = {
    # orchestrator: what nodes tell it and what clients ask before a generation
    _ORCH + "Register": Rule(frozenset({NODE}), "request.node_id is the certificate's id (OrchestratorServicer)"),
    _ORCH + "Report": Rule(frozenset({NODE}), "every report's node_id is the certificate's id (OrchestratorServicer)"),
    _ORCH + "GetPlan": Rule(READERS),
    _ORCH + "WeightKeys": Rule(frozenset({NODE}), "request.node_id is the certificate's id, and a plan gives it "
                               "segments (OrchestratorServicer)"),
    _FILES + "GetManifest": Rule(frozenset({NODE})),
    _FILES + "FetchBlob": Rule(frozenset({NODE})),
    # admin: reading is open to operators and clients, changing the mesh only to operators, nodes get nothing
    _ADMIN + "Status": Rule(READERS),
    _ADMIN + "History": Rule(READERS),
    _ADMIN + "GetPolicy": Rule(READERS),
    _ADMIN + "Resplit": Rule(frozenset({OPERATOR})),
    _ADMIN + "Drain": Rule(frozenset({OPERATOR})),
    _ADMIN + "SetPolicy": Rule(frozenset({OPERATOR})),
    # node: generation for clients and operators, the data plane for nodes, plans only from the orchestrator
    _NODE + "Generate": Rule(READERS),
    _NODE + "Cancel": Rule(READERS | {ORCHESTRATOR}, "only the identity that opened the session (NodeServicer)"),
    _NODE + "Forward": Rule(frozenset({NODE}), "the caller is the plan's predecessor of the segment (NodeServicer)"),
    _NODE + "Deliver": Rule(frozenset({NODE}), "the caller is the plan's tail, this node its head, and the session "
                            "waits here with no token stream yet (NodeServicer)"),
    _NODE + "Rows": Rule(frozenset({NODE}), "each row reaches only a session whose own stream this caller opened "
                         "(node_agent/row_routes.py)"),
    _NODE + "Prepare": Rule(frozenset({ORCHESTRATOR})),
    _NODE + "Commit": Rule(frozenset({ORCHESTRATOR})),
    _NODE + "Abort": Rule(frozenset({ORCHESTRATOR})),
    _NODE + "Info": Rule(EVERYONE),
    _NODE + "Probe": Rule(frozenset({NODE})),
    # the standard health service: container and cluster probes present whatever certificate their box holds
    _HEALTH + "Check": Rule(EVERYONE),
    _HEALTH + "Watch": Rule(EVERYONE),
    _HEALTH + "List": Rule(EVERYONE),
}


def denial(method: str, identity: Identity | None, pinned: Mapping[str, str]) -> tuple[grpc.StatusCode, str] | None:
    """Why ``identity`` may not call ``method`` (status and message), or None when it may.

    ``pinned`` maps a kind to the one id of that kind this server accepts (a node takes plans only from the
    orchestrator it is configured with). No certificate on a TLS server is UNAUTHENTICATED; any other refusal
    is PERMISSION_DENIED.
    """
    if identity is None:
        return grpc.StatusCode.UNAUTHENTICATED, f"{method} needs a client certificate"
    rule = TABLE.get(method)
    if rule is None:
        return grpc.StatusCode.PERMISSION_DENIED, f"{method} is not in the authorization table"
    if identity.kind not in rule.kinds:
        allowed = "/".join(sorted(rule.kinds))
        return (grpc.StatusCode.PERMISSION_DENIED,
                f"{method} is allowed only to {allowed}; the caller is {identity.kind} {identity.node_id}")
    want = pinned.get(identity.kind)
    if want is not None and identity.node_id != want:
        return (grpc.StatusCode.PERMISSION_DENIED,
                f"{method}: this server accepts {identity.kind} {want} only, not {identity.node_id}")
    return None


Behaviour = Callable[[Any, Any], Any]


class Authorizer(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # untyped in grpc's stubs
    """Checks :data:`TABLE` before any servicer code runs (the request is not even read on a refusal)."""

    def __init__(self, *, tls_on: bool, pinned: Mapping[str, str] | None = None) -> None:
        self.tls_on = tls_on
        self.pinned = dict(pinned or {})

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or not self.tls_on:
            return handler
        method: str = details.method
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behaviour = getattr(handler, kind)
            if behaviour is not None:
                wrapped = self._wrap(method, behaviour)
                return handler._replace(**{kind: wrapped})
        return handler

    async def _check(self, method: str, context: Any) -> None:
        try:
            identity = peer_identity(context)
        except CertificateIdentityError as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{method}: {exc}")
            raise AssertionError("unreachable") from exc
        refused = denial(method, identity, self.pinned)
        if refused is not None:
            log.warning("refused %s", refused[1])
            await context.abort(*refused)

    def _wrap(self, method: str, behaviour: Behaviour) -> Behaviour:
        if inspect.isasyncgenfunction(behaviour):
            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                await self._check(method, context)
                async for item in behaviour(request, context):
                    yield item
            return stream

        async def call(request: Any, context: Any) -> Any:
            await self._check(method, context)
            return await behaviour(request, context)
        return call


def authorized_server(*, tls_on: bool, pinned: Mapping[str, str] | None = None) -> grpc.aio.Server:
    """The one way a splitmesh process makes its gRPC server: shared options, :class:`Authorizer` installed, and
    undecodable requests answered INVALID_ARGUMENT (:class:`MalformedRequests`)."""
    return grpc.aio.server(options=SERVER_OPTIONS,
                           interceptors=[Authorizer(tls_on=tls_on, pinned=pinned), MalformedRequests()])
