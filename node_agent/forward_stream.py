"""The receiving side of a Forward stream after its open: checked activations out of sealed or plain frames.

Every way a peer can get a frame wrong ends in :class:`StreamError` with the precise status to answer:
a bad tag UNAUTHENTICATED, a replayed/skipped seq ABORTED, a wrong epoch FAILED_PRECONDITION (or
UNAVAILABLE when the sender is ahead), malformed tensors INVALID_ARGUMENT, a node whose tensor buffers
are full RESOURCE_EXHAUSTED, a sender that goes quiet DEADLINE_EXCEEDED. Nothing here touches other
sessions, so one bad stream never affects the rest of the node.

A tensor is judged on its first chunk, before anything is buffered: shape ``[1, n, hidden]``, the
row limit, its step, and its position, which must continue the stream without a gap (from 0) and keep
``position + n`` within the model's positions, so no KV cache outgrows the model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import torch

from common.frame_crypto import FrameCryptoError
from common.hop_codec import HopReceiver, PlaintextFrameError
from common.proto import splitmesh_pb2 as pb
from common.tensor_budget import BufferFullError
from common.tensor_codec import TensorError, check_activation


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
    """Yields ``(step, position, activation)`` per complete tensor out of ``receiver``'s frames (sealed or plain).

    ``frame_timeout_s`` bounds the wait for the first frame after the open and for each chunk after the
    one before (a sender writes a tensor's chunks back to back); ``idle_timeout_s`` the wait between tensors.
    """

    def __init__(self, receiver: HopReceiver, hidden_size: int, max_rows: int,
                 idle_timeout_s: float = 300.0, *, max_positions: int | None = None,
                 frame_timeout_s: float | None = None, dtype: str | None = None, segment_index: int = 0) -> None:
        self._receiver = receiver
        self._dtype = dtype  # the segment's compute dtype: a plan runs one model in one dtype
        self._segment_index = segment_index
        self._idle_timeout_s = idle_timeout_s
        self._frame_timeout_s = idle_timeout_s if frame_timeout_s is None else frame_timeout_s
        self._hidden_size = hidden_size
        self._max_rows = max_rows
        self._max_positions = max_positions
        self._expected_step: int | None = None  # a stream opened by a replay starts at the step it resumes
        self._next_position = 0  # every stream starts at position 0 (a replay re-sends the whole history)
        self._started = False  # a frame has arrived
        self.compute_s = 0.0  # the latest frame's compute since the head: a metric, never acted on

    def _timeout(self) -> tuple[float, str]:
        if not self._started:
            return self._frame_timeout_s, "sent no activation after its open"
        if self._receiver.in_progress:
            return self._frame_timeout_s, "stopped in the middle of a tensor"
        return self._idle_timeout_s, "was idle"

    async def activations(self, requests: AsyncIterator[pb.ForwardRequest],
                          ) -> AsyncIterator[tuple[int, int, torch.Tensor]]:
        stream = aiter(requests)
        try:
            while True:
                timeout_s, what = self._timeout()
                try:
                    async with asyncio.timeout(timeout_s):  # no task per message, unlike wait_for
                        message = await anext(stream)
                except StopAsyncIteration:
                    return
                except TimeoutError:  # an upstream that went quiet must not pin a slot, buffers or caches
                    raise StreamError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                      f"the stream {what} for {timeout_s:g}s: its session is closed") from None
                got = self._checked(message)
                if got is None:
                    continue
                step, position, tensor = got
                self._expected_step = step + 1
                self._next_position = position + int(tensor.shape[1])
                yield step, position, tensor
        finally:
            self._discard()

    def _discard(self) -> None:
        self._receiver.discard()

    def _checked(self, message: pb.ForwardRequest) -> tuple[int, int, torch.Tensor] | None:
        try:
            got = self._add(message)
            if got is not None:
                check_activation(got[2], self._hidden_size, self._max_rows)
        except FrameCryptoError as exc:
            raise crypto_status(exc) from exc
        except PlaintextFrameError as exc:
            raise StreamError(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from exc
        except BufferFullError as exc:
            raise StreamError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from exc
        except TensorError as exc:
            raise StreamError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        return got

    def _admit(self, step: int, position: int, dtype: str, shape: list[int]) -> None:
        """A tensor's declared dtype, step, position and shape, checked before any of its bytes are buffered."""
        if self._dtype is not None and dtype != self._dtype:  # a mismatch is a broken or hostile peer
            raise TensorError(f"activation in {dtype}, but segment {self._segment_index} computes in {self._dtype}")
        if len(shape) != 3 or shape[0] != 1 or shape[2] != self._hidden_size:
            raise TensorError(f"activation shape {shape} is not [1, n, {self._hidden_size}]")
        rows = shape[1]
        if not 1 <= rows <= self._max_rows:
            raise TensorError(f"activation has {rows} rows, allowed 1..{self._max_rows}")
        if self._expected_step is not None and step != self._expected_step:
            raise TensorError(f"step {step}, expected {self._expected_step}")
        if position != self._next_position:
            raise TensorError(f"activation at position {position}, expected {self._next_position}: "
                              "positions continue the stream without gaps")
        if self._max_positions is not None and position + rows > self._max_positions:
            raise TensorError(f"positions {position}..{position + rows} exceed the model's {self._max_positions}")

    def _add(self, message: pb.ForwardRequest) -> tuple[int, int, torch.Tensor] | None:
        kind = message.WhichOneof("msg")
        if kind == "rekey":
            self._receiver.rekey(message.rekey.key_envelope)
            return None
        if kind != "frame":
            raise StreamError(grpc.StatusCode.INVALID_ARGUMENT, "only activation frames may follow the open")
        self._started = True
        self.compute_s = message.frame.compute_s
        return self._receiver.add(message.frame, self._admit)
