"""Activations on one hop as frames, and back: one codec, a sealed and a plain variant.

Both variants turn a tensor into ``ForwardRequest`` messages of at most ``chunk_bytes`` each and
reassemble them through the same :class:`TensorAssembler` checks; the data plane holds a
:class:`HopSender` / :class:`HopReceiver` and never asks which. The sealed variant is the default
(DESIGN.md, Security: activation frames); the plain one is for dev meshes that switch encryption off,
and a receiver of either kind refuses the other kind's frames.

Sealed wire format (proto ``ForwardOpen.key_envelope``, ``ForwardRekey``, ``ActivationFrame.header/ciphertext``):

* the sender's per-session, per-hop key travels once, HPKE-sealed to the receiver's X25519 key from the
  plan, in the ``ForwardOpen`` (direction FORWARD, hop = the receiving segment's index);
* each chunk of a tensor is one frame: ``header`` is the packed :class:`FrameHeader` (session, epoch,
  step, seq, dtype, shape, chunk index/count), the AES-GCM associated data; ``ciphertext`` seals
  ``position (u32 big-endian) || chunk bytes``, so the position is authenticated too;
* before a key has sealed ``rekey_after`` frames the sender sends a ``ForwardRekey`` with the next key
  generation; frames after it restart at seq 0.

The receiver trusts nothing outside the authenticated header and payload, and the reassembled tensor
goes through the same :class:`TensorAssembler` checks as a plaintext one.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Protocol

import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from common.frame_crypto import MAX_FRAMES_PER_KEY, Direction, FrameSequenceError, HopOpener, HopSealer
from common.proto import splitmesh_pb2 as pb
from common.tensor_budget import BufferBudget
from common.tensor_codec import TensorAssembler, TensorError, encode_tensor

POSITION = struct.Struct(">I")
FrameAdmit = Callable[[int, int, str, list[int]], None]  # (step, position, dtype, shape) of a tensor's first chunk


class PlaintextFrameError(TensorError):
    """A plaintext frame arrived on a stream whose frames must be sealed."""


class FrameKindError(TensorError):
    """A sealed frame or a rekey arrived on a stream opened without a key."""


class HopSender(Protocol):
    def key_envelope(self) -> bytes:
        """What ``ForwardOpen.key_envelope`` carries (empty for a plain hop)."""
        ...

    def requests(self, step: int, position: int, tensor: torch.Tensor,
                 chunk_bytes: int) -> list[pb.ForwardRequest]:
        """The messages that carry one tensor."""
        ...


class HopReceiver(Protocol):
    @property
    def in_progress(self) -> bool:
        """A tensor is partly received."""
        ...

    def rekey(self, envelope: bytes) -> None: ...

    def discard(self) -> None: ...

    def add(self, frame: pb.ActivationFrame, admit: FrameAdmit | None = None,
            ) -> tuple[int, int, torch.Tensor] | None:
        """(step, position, tensor) once the frame completes a tensor, else None."""
        ...


class PlainHopSender:
    """The sending end of a plain hop: tensors as numbered plaintext chunks."""

    def __init__(self) -> None:
        self._seq = 0

    def key_envelope(self) -> bytes:
        return b""

    def requests(self, step: int, position: int, tensor: torch.Tensor, chunk_bytes: int) -> list[pb.ForwardRequest]:
        out = []
        for chunk in encode_tensor(tensor, chunk_bytes):
            out.append(pb.ForwardRequest(frame=pb.ActivationFrame(step=step, seq=self._seq, position=position,
                                                                  tensor=chunk)))
            self._seq += 1
        return out


class PlainHopReceiver:
    """The receiving end of a plain hop: frames strictly in seq order, chunks of a tensor alike."""

    def __init__(self, budget: BufferBudget | None = None) -> None:
        self._assembler = TensorAssembler(budget)
        self._expected_seq = 0
        self._tensor_context = (0, 0)  # (step, position) of the tensor being assembled

    @property
    def in_progress(self) -> bool:
        return self._assembler.in_progress

    def rekey(self, envelope: bytes) -> None:
        raise FrameKindError("rekey on a plaintext activation stream")

    def discard(self) -> None:
        self._assembler.discard()

    def add(self, frame: pb.ActivationFrame, admit: FrameAdmit | None = None,
            ) -> tuple[int, int, torch.Tensor] | None:
        if frame.header or frame.ciphertext:
            raise FrameKindError("sealed frame on a stream opened without a key")
        if frame.seq != self._expected_seq:
            raise FrameSequenceError(f"frame seq {frame.seq}, expected {self._expected_seq}")
        self._expected_seq += 1
        if not self._assembler.in_progress:
            self._tensor_context = (frame.step, frame.position)
        elif (frame.step, frame.position) != self._tensor_context:
            raise TensorError("chunk step/position differ from the first chunk of its tensor")
        step, position = self._tensor_context
        check = None if admit is None else (lambda dtype, shape: admit(step, position, dtype, shape))
        tensor = self._assembler.add(frame.tensor, check)
        return None if tensor is None else (step, position, tensor)


class SealedHopSender:
    """The sending end of one session's hop: turns tensors into sealed ForwardRequests."""

    def __init__(self, receiver_key: X25519PublicKey, session_id: str, epoch: int, hop: int,
                 rekey_after: int = MAX_FRAMES_PER_KEY) -> None:
        self._sealer = HopSealer(receiver_key, session_id, epoch, Direction.FORWARD, hop=hop)
        self._rekey_after = max(1, min(rekey_after, MAX_FRAMES_PER_KEY))

    def key_envelope(self) -> bytes:
        """The first key, for ``ForwardOpen.key_envelope``."""
        return self._sealer.key_envelope()

    def requests(self, step: int, position: int, tensor: torch.Tensor, chunk_bytes: int) -> list[pb.ForwardRequest]:
        """The messages that carry one tensor: its sealed chunks, preceded by a rekey when one is due."""
        out: list[pb.ForwardRequest] = []
        prefix = POSITION.pack(position)
        for chunk in encode_tensor(tensor, chunk_bytes):
            if self._sealer.next_seq >= self._rekey_after:
                self._sealer = self._sealer.rekeyed()
                out.append(pb.ForwardRequest(rekey=pb.ForwardRekey(key_envelope=self._sealer.key_envelope())))
            header, ciphertext = self._sealer.seal(step=step, dtype=chunk.dtype, shape=chunk.shape,
                                                   plaintext=prefix + chunk.data, chunk_index=chunk.chunk_index,
                                                   chunk_count=chunk.chunk_count)
            out.append(pb.ForwardRequest(frame=pb.ActivationFrame(header=header, ciphertext=ciphertext)))
        return out


class SealedHopReceiver:
    """The receiving end: opens the key envelope, then authenticates frames strictly in order.

    Raises the frame-crypto errors (each with its gRPC ``code``) or :class:`TensorError` (INVALID_ARGUMENT).
    """

    def __init__(self, private_key: X25519PrivateKey, envelope: bytes, session_id: str, epoch: int,
                 hop: int, budget: BufferBudget | None = None) -> None:
        self._opener = HopOpener(private_key, envelope, session=session_id, epoch=epoch,
                                 direction=Direction.FORWARD, hop=hop)
        self._assembler = TensorAssembler(budget)
        self._tensor_context: tuple[int, int] = (0, 0)  # (step, position) of the tensor being assembled

    def rekey(self, envelope: bytes) -> None:
        """Switch to the sender's next key generation (an old or foreign envelope is refused)."""
        self._opener = self._opener.rekeyed(envelope)

    @property
    def in_progress(self) -> bool:
        """A tensor is partly received."""
        return self._assembler.in_progress

    def discard(self) -> None:
        """Drop a partly received tensor (the stream ended)."""
        self._assembler.discard()

    def add(self, frame: pb.ActivationFrame, admit: FrameAdmit | None = None,
            ) -> tuple[int, int, torch.Tensor] | None:
        """(step, position, tensor) once the frame completes a tensor, else None.

        ``admit`` sees the step, position, dtype and shape of each tensor's first chunk before any of
        it is buffered, and raises TensorError to refuse it.
        """
        if not frame.header or frame.HasField("tensor"):
            raise PlaintextFrameError("plaintext activation frame on an encrypted stream")
        if frame.step or frame.seq or frame.position:
            raise TensorError("an encrypted frame carries step, seq and position only in its sealed header")
        header, plaintext = self._opener.open(frame.header, frame.ciphertext)
        if len(plaintext) < POSITION.size:
            raise TensorError("sealed payload is shorter than its position field")
        (position,) = POSITION.unpack_from(plaintext)
        if header.chunk_index == 0:
            self._tensor_context = (header.step, position)
        elif (header.step, position) != self._tensor_context:
            raise TensorError("chunk step/position differ from the first chunk of its tensor")
        step = header.step
        check = None if admit is None else (lambda dtype, shape: admit(step, position, dtype, shape))
        tensor = self._assembler.add(pb.TensorChunk(
            dtype=header.dtype, shape=header.shape, data=plaintext[POSITION.size:], chunk_index=header.chunk_index,
            chunk_count=header.chunk_count), check)
        return None if tensor is None else (header.step, position, tensor)
