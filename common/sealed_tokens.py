"""Sampled tokens from the tail to the head as frames, sealed or plain (DESIGN.md, A generation).

The token goes straight from the tail to the head, so no middle node of the ring ever reads it. With
encryption the tail draws a per-session key and sends it once, HPKE-sealed to the head's X25519 key from
the signed plan, in ``TokenOpen.key_envelope`` (direction BACKWARD, hop 0: the head). Each token is one
AES-GCM frame of the same machinery as activations (common/frame_crypto.py): header (session, epoch,
step, seq) as associated data, ciphertext = the token id (u32 big-endian). The receiver refuses a bad
tag, a replayed, reordered or skipped seq, a wrong epoch and a step that does not follow the previous one,
and a plain stream is held to the same order. ``compute_s`` is a metric only and is never acted on.

Errors are the frame-crypto classes (each names its gRPC status) or :class:`TokenFrameError`
(INVALID_ARGUMENT, a frame that is well sealed but says something impossible).
"""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from common.frame_crypto import Direction, FrameCryptoError, FrameSequenceError, HopOpener, HopSealer
from common.proto import splitmesh_pb2 as pb

TOKEN = struct.Struct(">I")
TOKEN_HOP = 0  # the receiving end of a token stream is segment 0's node, the head
_DTYPE, _SHAPE = "int32", (1,)


class TokenFrameError(FrameCryptoError, ValueError):
    """A token frame that is authentic (or plain) but malformed: wrong kind, shape, or step."""

    code = "INVALID_ARGUMENT"


class TokenSender:
    """The tail's end of one session's token stream on one plan; ``head_key`` None = plain frames."""

    def __init__(self, head_key: X25519PublicKey | None, session_id: str, epoch: int) -> None:
        self._sealer = None if head_key is None else HopSealer(head_key, session_id, epoch, Direction.BACKWARD,
                                                               hop=TOKEN_HOP)
        self.session_id = session_id
        self.epoch = epoch
        self._seq = 0

    def opening(self) -> pb.DeliverRequest:
        envelope = b"" if self._sealer is None else self._sealer.key_envelope()
        return pb.DeliverRequest(open=pb.TokenOpen(session_id=self.session_id, epoch=self.epoch,
                                                   key_envelope=envelope))

    def frame(self, step: int, token_id: int, compute_s: float = 0.0) -> pb.DeliverRequest:
        if self._sealer is None:
            frame = pb.TokenFrame(step=step, seq=self._seq, token_id=token_id, compute_s=compute_s)
            self._seq += 1
        else:
            header, ciphertext = self._sealer.seal(step=step, dtype=_DTYPE, shape=_SHAPE,
                                                   plaintext=TOKEN.pack(token_id))
            frame = pb.TokenFrame(header=header, ciphertext=ciphertext, compute_s=compute_s)
        return pb.DeliverRequest(token=frame)


class TokenReceiver:
    """The head's end: opens the key envelope (if any), then accepts frames only in order, one per step."""

    def __init__(self, head_key: X25519PrivateKey | None, envelope: bytes, session_id: str, epoch: int) -> None:
        self._opener = None if head_key is None else HopOpener(head_key, envelope, session=session_id, epoch=epoch,
                                                               direction=Direction.BACKWARD, hop=TOKEN_HOP)
        self._seq = 0
        self._last_step: int | None = None

    def open(self, frame: pb.TokenFrame) -> tuple[int, int]:
        """(step, token id) of the next frame."""
        if self._opener is None:
            if frame.header or frame.ciphertext:
                raise TokenFrameError("sealed token frame on a stream opened without a key")
            if frame.seq != self._seq:
                raise FrameSequenceError(f"token frame seq {frame.seq}, expected {self._seq}")
            self._seq += 1
            step, token = frame.step, frame.token_id
        else:
            if not frame.header or frame.step or frame.seq or frame.token_id:
                raise TokenFrameError("a sealed token frame carries step, seq and token only in its sealed part")
            header, plaintext = self._opener.open(frame.header, frame.ciphertext)
            if header.dtype != _DTYPE or tuple(header.shape) != _SHAPE or len(plaintext) != TOKEN.size:
                raise TokenFrameError(f"token frame of {header.dtype} {list(header.shape)}, {len(plaintext)} bytes")
            step, (token,) = header.step, TOKEN.unpack(plaintext)
        if self._last_step is not None and step <= self._last_step:
            raise FrameSequenceError(f"token for step {step} after step {self._last_step}")
        self._last_step = step
        return step, token
