"""The gateway's one link to the mesh: a shared AsyncClient and the name of the model it serves."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import cast

import grpc

from common.proto import splitmesh_pb2 as pb
from splitmesh.client import AsyncClient, TokenEvent, mesh_error
from splitmesh.gateway_errors import ApiError
from splitmesh.gateway_schema import Generation

MODEL_TTL_S = 5.0  # how long a looked-up model name is trusted; the orchestrator is not asked per request
STATUS_TIMEOUT_S = 10.0


class Mesh:
    """Owns the AsyncClient; it is opened inside the server's event loop, as grpc.aio channels require."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._client: AsyncClient | None = None
        self._model = ""
        self._model_at = float("-inf")

    async def open(self) -> None:
        self._client = AsyncClient(self.address)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    @property
    def client(self) -> AsyncClient:
        if self._client is None:
            raise RuntimeError("the gateway's mesh client is not open (is the app running under its lifespan?)")
        return self._client

    async def status(self) -> pb.StatusReply:
        try:
            reply: pb.StatusReply = await self.client.admin.Status(pb.StatusRequest(), timeout=STATUS_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise mesh_error(exc) from exc
        return reply

    async def model_name(self) -> str:
        """The model the mesh serves, asked of the orchestrator at most every MODEL_TTL_S."""
        if time.monotonic() - self._model_at > MODEL_TTL_S:
            self._model = (await self.status()).model_name
            self._model_at = time.monotonic()
        return self._model

    async def check_model(self, requested: str) -> str:
        """A request must name the served model: answering with another would mislead the caller."""
        served = await self.model_name()
        if requested != served:
            raise ApiError(404, f"The model `{requested}` does not exist: this mesh serves `{served}`",
                           param="model", code="model_not_found")
        return served

    def events(self, generation: Generation) -> AsyncGenerator[TokenEvent, None]:
        """The SDK's stream; closing it cancels the gRPC call, which frees the session on every node."""
        g = generation
        # generate is an async generator function (its annotation only says AsyncIterator): it has aclose().
        stream = self.client.generate(g.prompt, max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                                      top_p=g.top_p, top_k=g.top_k, seed=g.seed, stop=g.stop,
                                      ignore_eos=g.ignore_eos)
        return cast(AsyncGenerator[TokenEvent, None], stream)
