"""Client SDK: ask the orchestrator for the route, then stream a generation from the head node.

The orchestrator is never on the per-token path: tokens flow from the head straight to the caller.
With ``tls=TlsConfig(...)`` (or ``SPLITMESH_TLS_DIR`` in the environment, or the folder of the mesh
``splitmesh up`` runs at that address on this box; with the ``SPLITMESH_CLIENT_ID`` certificate,
default ``client``) every channel is mutual TLS, and the client accepts only the orchestrator's
certificate and, for the stream, the head node's named in the plan.
Changing the mesh (``resplit``, ``drain``, ``policy`` with updates) needs an operator certificate:
``Client(address, tls=TlsConfig.from_dir(folder, "operator"))``; a client's is refused (PERMISSION_DENIED).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from common.certs import Identity
from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from common.request_errors import FIELD_KEY, LIMIT_KEY, field_details
from common.tls import TlsConfig
from common.transport import (
    DEFAULT_CLIENT_ID,
    DEFAULT_ORCHESTRATOR_ID,
    ENV_CLIENT_ID,
    ENV_ORCHESTRATOR_ID,
    aio_channel,
    resolve_tls,
    sync_channel,
    tls_from_env,
)
from splitmesh.local_meshes import MeshRecord

DEFAULT_ADDRESS = "127.0.0.1:50051"
Messages = Sequence[dict[str, str]]
R = TypeVar("R")


class SplitmeshError(Exception):
    """A call failed; ``code`` is the gRPC status name (e.g. INVALID_ARGUMENT).

    ``field`` names the request field at fault when the server said (e.g. ``max_new_tokens``), and
    ``limit`` the bound it crossed (0 when none).
    """

    def __init__(self, code: str, message: str, field: str = "", limit: int = 0) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.field = field
        self.limit = limit


def mesh_error(exc: grpc.RpcError) -> SplitmeshError:
    """The SDK's error for a failed call (sync or asyncio), with the field details of its trailing metadata."""
    call: Any = exc
    details = field_details(call.trailing_metadata())
    limit = details.get(LIMIT_KEY, "0")
    return SplitmeshError(call.code().name, call.details() or "", details.get(FIELD_KEY, ""),
                          int(limit) if limit.isdigit() else 0)


@dataclass(frozen=True)
class TokenEvent:
    index: int  # position of the token among the generated ones
    token_id: int
    text: str  # text this token completed (may be empty)
    finish_reason: str  # "", or on the last event "eos", "stop", "length"
    prompt_tokens: int  # set on the last event
    completion_tokens: int  # set on the last event
    epoch: int  # plan epoch the token was produced under
    session_id: str


def invalid(message: str) -> SplitmeshError:
    """A request the SDK refuses before sending it: the code the server would have answered with."""
    return SplitmeshError("INVALID_ARGUMENT", message)


def message(build: Callable[[], R], what: str) -> R:
    """Build a request message; protobuf's own errors for out-of-range or mistyped fields become ours."""
    try:
        return build()
    except (ValueError, TypeError) as exc:
        raise invalid(f"{what}: {exc}") from exc


def _add_messages(request: pb.GenerateRequest, prompt: Sequence[object]) -> None:
    for i, item in enumerate(prompt):
        if not isinstance(item, dict) or not isinstance(item.get("role"), str) or not isinstance(
                item.get("content"), str):
            raise invalid(f"prompt[{i}] must be a {{'role': str, 'content': str}} dict; a prompt is a string, "
                          "a list of such messages, or a list of token ids")
        request.messages.messages.add(role=item["role"], content=item["content"])
    request.messages.SetInParent()


def build_request(prompt: str | Messages | Sequence[int], max_new_tokens: int, temperature: float, top_p: float,
                  top_k: int, seed: int, stop: Sequence[str], ignore_eos: bool) -> pb.GenerateRequest:
    """A prompt string, chat messages (list of {role, content}) or token ids (list of int).

    Values the wire cannot carry (negative counts, a seed outside uint64, a stop that is no string)
    raise :class:`SplitmeshError` with INVALID_ARGUMENT, as the head would.
    """
    if isinstance(stop, str):
        raise invalid("stop must be a list of strings, not one string")
    request = message(lambda: pb.GenerateRequest(
        max_new_tokens=max_new_tokens, stop=list(stop), ignore_eos=ignore_eos,
        sampling=pb.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)), "generate")
    if isinstance(prompt, str):
        request.prompt = prompt
    elif not isinstance(prompt, Sequence):
        raise invalid(f"prompt must be a string, a list of messages or a list of token ids, "
                      f"not {type(prompt).__name__}")
    elif prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        message(lambda: request.token_ids.ids.extend(prompt), "token ids")  # type: ignore[arg-type]
    else:
        _add_messages(request, prompt)
    return request


def history_request(limit: int, kinds: Sequence[str]) -> pb.HistoryRequest:
    if isinstance(kinds, str):
        kinds = [kinds]
    return message(lambda: pb.HistoryRequest(limit=limit, kinds=list(kinds)), "history")


def resplit_request(boundaries: Sequence[int], placement: Sequence[str], dry_run: bool) -> pb.ResplitRequest:
    return message(lambda: pb.ResplitRequest(boundaries=list(boundaries), placement=list(placement), dry_run=dry_run),
                   "resplit")


def set_policy_request(updates: dict[str, str]) -> pb.SetPolicyRequest:
    values = {str(k): v if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)
              for k, v in updates.items()}
    return message(lambda: pb.SetPolicyRequest(set=values), "policy")


def _event(event: pb.GenerateEvent) -> TokenEvent:
    return TokenEvent(index=event.index, token_id=event.token_id, text=event.text, finish_reason=event.finish_reason,
                      prompt_tokens=event.usage.prompt_tokens, completion_tokens=event.usage.completion_tokens,
                      epoch=event.epoch, session_id=event.session_id)


def _head(signed: pb.SignedPlan) -> tuple[str, str]:
    """(node id, address) of the head node of a plan."""
    plan = pb.Plan()
    plan.ParseFromString(signed.plan_bytes)
    head = plan.segments[0].node_id
    return head, next(n.address for n in plan.nodes if n.node_id == head)


def default_tls(address: str) -> TlsConfig | None:
    """``SPLITMESH_TLS_DIR``'s certificates, else those of the mesh ``splitmesh up`` runs at ``address`` on this
    box (see splitmesh.local_meshes), else None (plaintext)."""
    configured = tls_from_env()
    if configured is not None:
        return configured
    record = MeshRecord.load(address)
    if record is None or not record.tls_dir:
        return None
    return resolve_tls(record.tls_dir, os.environ.get(ENV_CLIENT_ID) or DEFAULT_CLIENT_ID)


def _security(address: str, tls: TlsConfig | None, orchestrator_id: str | None) -> tuple[TlsConfig | None, Identity]:
    """Explicit settings, else the defaults; the orchestrator identity the channel pins under TLS."""
    name = orchestrator_id or os.environ.get(ENV_ORCHESTRATOR_ID, DEFAULT_ORCHESTRATOR_ID)
    return (tls if tls is not None else default_tls(address)), Identity("orchestrator", name)


class Client:
    """Synchronous client. ``generate`` yields :class:`TokenEvent` objects as tokens arrive.

    Every failure, a request refused before it is sent included, raises :class:`SplitmeshError`.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout_s: float = 600.0, *, tls: TlsConfig | None = None,
                 orchestrator_id: str | None = None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.tls, orchestrator = _security(address, tls, orchestrator_id)
        self._channel = sync_channel(address, self.tls, orchestrator)
        self.admin = pb_grpc.AdminStub(self._channel)
        self._orchestrator = pb_grpc.OrchestratorStub(self._channel)
        self._heads: dict[str, grpc.Channel] = {}

    def close(self) -> None:
        for channel in self._heads.values():
            channel.close()
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def signed_plan(self) -> pb.SignedPlan:
        signed: pb.SignedPlan = self._call(self._orchestrator.GetPlan, pb.GetPlanRequest())
        return signed

    def plan(self) -> pb.Plan:
        plan = pb.Plan()
        plan.ParseFromString(self.signed_plan().plan_bytes)
        return plan

    def status(self) -> pb.StatusReply:
        reply: pb.StatusReply = self._call(self.admin.Status, pb.StatusRequest())
        return reply

    def resplit(self, boundaries: Sequence[int] = (), placement: Sequence[str] = (),
                dry_run: bool = False) -> pb.ResplitReply:
        reply: pb.ResplitReply = self._call(self.admin.Resplit, resplit_request(boundaries, placement, dry_run))
        return reply

    def history(self, limit: int = 50, kinds: Sequence[str] = ()) -> list[pb.DecisionRecord]:
        """The newest ``limit`` decisions (only ``kinds``, when given), oldest first."""
        reply: pb.HistoryReply = self._call(self.admin.History, history_request(limit, kinds))
        return list(reply.decisions)

    def drain(self, node_id: str, undo: bool = False) -> pb.DrainReply:
        reply: pb.DrainReply = self._call(self.admin.Drain, message(
            lambda: pb.DrainRequest(node_id=node_id, undo=undo), "drain"))
        return reply

    def policy(self, updates: dict[str, str] | None = None) -> dict[str, str]:
        """The policy; with ``updates`` (name -> text), changes those values first (that needs an operator
        certificate)."""
        if updates:
            reply: pb.PolicyReply = self._call(self.admin.SetPolicy, set_policy_request(updates))
        else:
            reply = self._call(self.admin.GetPolicy, pb.GetPolicyRequest())
        return dict(reply.values)

    def _call(self, method: Callable[..., R], request: object) -> R:
        try:
            return method(request, timeout=min(self.timeout_s, 120.0))
        except grpc.RpcError as exc:
            raise mesh_error(exc) from exc

    def _head(self) -> pb_grpc.NodeStub:
        node_id, address = _head(self.signed_plan())
        key = f"{node_id}@{address}"
        if key not in self._heads:
            self._heads[key] = sync_channel(address, self.tls, Identity("node", node_id))
        return pb_grpc.NodeStub(self._heads[key])

    def generate(self, prompt: str | Messages | Sequence[int], max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int = 0, stop: Sequence[str] = (),
                 ignore_eos: bool = False) -> Generator[TokenEvent, None, None]:
        request = build_request(prompt, max_new_tokens, temperature, top_p, top_k, seed, stop, ignore_eos)
        stream = self._head().Generate(request, timeout=self.timeout_s)
        try:
            for event in stream:
                yield _event(event)
        except grpc.RpcError as exc:
            raise mesh_error(exc) from exc
        finally:
            stream.cancel()

    def generate_text(self, prompt: str | Messages | Sequence[int], **kwargs: object) -> str:
        return "".join(e.text for e in self.generate(prompt, **kwargs))  # type: ignore[arg-type]


class AsyncClient:
    """The asyncio twin of :class:`Client`: the same methods, awaited (``generate`` is an async iterator)."""

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout_s: float = 600.0, *, tls: TlsConfig | None = None,
                 orchestrator_id: str | None = None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.tls, orchestrator = _security(address, tls, orchestrator_id)
        self._channel = aio_channel(address, self.tls, orchestrator)
        self._orchestrator = pb_grpc.OrchestratorStub(self._channel)
        self.admin = pb_grpc.AdminStub(self._channel)
        self._heads: dict[str, grpc.aio.Channel] = {}

    async def close(self) -> None:
        for channel in self._heads.values():
            await channel.close()
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: Callable[..., Awaitable[R]], request: object) -> R:
        try:
            return await method(request, timeout=min(self.timeout_s, 120.0))
        except grpc.aio.AioRpcError as exc:
            raise mesh_error(exc) from exc

    async def signed_plan(self) -> pb.SignedPlan:
        signed: pb.SignedPlan = await self._call(self._orchestrator.GetPlan, pb.GetPlanRequest())
        return signed

    async def plan(self) -> pb.Plan:
        plan = pb.Plan()
        plan.ParseFromString((await self.signed_plan()).plan_bytes)
        return plan

    async def status(self) -> pb.StatusReply:
        reply: pb.StatusReply = await self._call(self.admin.Status, pb.StatusRequest())
        return reply

    async def resplit(self, boundaries: Sequence[int] = (), placement: Sequence[str] = (),
                      dry_run: bool = False) -> pb.ResplitReply:
        reply: pb.ResplitReply = await self._call(self.admin.Resplit,
                                                  resplit_request(boundaries, placement, dry_run))
        return reply

    async def history(self, limit: int = 50, kinds: Sequence[str] = ()) -> list[pb.DecisionRecord]:
        reply: pb.HistoryReply = await self._call(self.admin.History, history_request(limit, kinds))
        return list(reply.decisions)

    async def drain(self, node_id: str, undo: bool = False) -> pb.DrainReply:
        reply: pb.DrainReply = await self._call(self.admin.Drain, message(
            lambda: pb.DrainRequest(node_id=node_id, undo=undo), "drain"))
        return reply

    async def policy(self, updates: dict[str, str] | None = None) -> dict[str, str]:
        if updates:
            reply: pb.PolicyReply = await self._call(self.admin.SetPolicy, set_policy_request(updates))
        else:
            reply = await self._call(self.admin.GetPolicy, pb.GetPolicyRequest())
        return dict(reply.values)

    async def generate_text(self, prompt: str | Messages | Sequence[int], **kwargs: object) -> str:
        return "".join([e.text async for e in self.generate(prompt, **kwargs)])  # type: ignore[arg-type]

    async def generate(self, prompt: str | Messages | Sequence[int], max_new_tokens: int = 128,
                       temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                       stop: Sequence[str] = (), ignore_eos: bool = False) -> AsyncIterator[TokenEvent]:
        request = build_request(prompt, max_new_tokens, temperature, top_p, top_k, seed, stop, ignore_eos)
        try:
            signed = await self._orchestrator.GetPlan(pb.GetPlanRequest(), timeout=30)
            node_id, address = _head(signed)
            key = f"{node_id}@{address}"
            if key not in self._heads:
                self._heads[key] = aio_channel(address, self.tls, Identity("node", node_id))
            call = pb_grpc.NodeStub(self._heads[key]).Generate(request, timeout=self.timeout_s)
            try:
                async for event in call:
                    yield _event(event)
            finally:
                call.cancel()  # a caller that stops early frees the session on every node
        except grpc.aio.AioRpcError as exc:
            raise mesh_error(exc) from exc
