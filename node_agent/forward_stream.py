"""The receiving side of a Forward stream after its open: checked activations out of sealed or plain frames.

Every way a peer can get a frame wrong ends in :class:`StreamError` with the precise status to answer:
a bad tag UNAUTHENTICATED, a replayed/skipped seq ABORTED, a wrong epoch FAILED_PRECONDITION (or
UNAVAILABLE when the sender is ahead), malformed tensors INVALID_ARGUMENT. Nothing here touches other
sessions, so one bad stream never affects the rest of the node.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import torch

from common.frame_crypto import FrameCryptoError
from common.proto import splitmesh_pb2 as pb
from common.sealed_frames import PlaintextFrameError, SealedHopReceiver
from common.tensor_codec import TensorAssembler, TensorError, check_activation


class StreamError(Exception):
    """The stream must end with ``code``; ``details`` says why."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def crypto_status(exc: FrameCryptoError) -> StreamError:
    """The frame-crypto error as the gRPC status its class names (see common/frame_crypto.py)."""
    return StreamError(getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL), str(exc))


class ActivationReader:
    """Yields ``(step, position, activation)`` per complete tensor; ``receiver`` None = a plaintext stream."""

    def __init__(self, receiver: SealedHopReceiver | None, hidden_size: int, max_rows: int,
                 idle_timeout_s: float = 300.0) -> None:
        self._receiver = receiver
        self._idle_timeout_s = idle_timeout_s
        self._hidden_size = hidden_size
        self._max_rows = max_rows
        self._assembler = TensorAssembler()
        self._expected_seq = 0
        self._plain_context = (0, 0)  # (step, position) of the plaintext tensor being assembled

    async def activations(self, requests: AsyncIterator[pb.ForwardRequest],
                          ) -> AsyncIterator[tuple[int, int, torch.Tensor]]:
        expected_step: int | None = None  # a stream opened by a replay starts at the step it resumes
        stream = aiter(requests)
        while True:
            try:
                async with asyncio.timeout(self._idle_timeout_s):  # no task per message, unlike wait_for
                    message = await anext(stream)
            except StopAsyncIteration:
                return
            except TimeoutError:  # an upstream that went quiet must not pin KV caches forever
                raise StreamError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                  f"session idle for {self._idle_timeout_s:.0f}s: its caches are freed") from None
            try:
                got = self._add(message)
            except FrameCryptoError as exc:
                raise crypto_status(exc) from exc
            except PlaintextFrameError as exc:
                raise StreamError(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from exc
            except TensorError as exc:
                raise StreamError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
            if got is None:
                continue
            step, position, tensor = got
            if expected_step is not None and step != expected_step:
                raise StreamError(grpc.StatusCode.INVALID_ARGUMENT, f"step {step}, expected {expected_step}")
            try:
                check_activation(tensor, self._hidden_size, self._max_rows)
            except TensorError as exc:
                raise StreamError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
            expected_step = step + 1
            yield step, position, tensor

    def _add(self, message: pb.ForwardRequest) -> tuple[int, int, torch.Tensor] | None:
        kind = message.WhichOneof("msg")
        if kind == "rekey":
            if self._receiver is None:
                raise StreamError(grpc.StatusCode.INVALID_ARGUMENT, "rekey on a plaintext activation stream")
            self._receiver.rekey(message.rekey.key_envelope)
            return None
        if kind != "frame":
            raise StreamError(grpc.StatusCode.INVALID_ARGUMENT, "only activation frames may follow the open")
        frame = message.frame
        if self._receiver is not None:
            return self._receiver.add(frame)
        if frame.header or frame.ciphertext:
            raise StreamError(grpc.StatusCode.INVALID_ARGUMENT, "sealed frame on a stream opened without a key")
        if frame.seq != self._expected_seq:
            raise StreamError(grpc.StatusCode.ABORTED, f"frame seq {frame.seq}, expected {self._expected_seq}")
        self._expected_seq += 1
        if not self._assembler.in_progress:
            self._plain_context = (frame.step, frame.position)
        elif (frame.step, frame.position) != self._plain_context:
            raise TensorError("chunk step/position differ from the first chunk of its tensor")
        tensor = self._assembler.add(frame.tensor)
        return None if tensor is None else (frame.step, frame.position, tensor)
