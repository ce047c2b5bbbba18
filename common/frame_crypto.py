"""Per-session, per-hop encryption of activation frames (DESIGN.md, Security).

The sender draws a random AES-256-GCM key and sends it once, sealed with HPKE (RFC 9180, X25519 /
HKDF-SHA256 / AES-256-GCM) to the receiver's X25519 key from the signed plan. The HPKE ``info`` binds
session, epoch, direction, hop and key generation, so an envelope cannot be replayed into another context.
Each frame is AES-GCM with nonce = direction (4 bytes) || seq (8 bytes) and AAD = the packed header,
so the header travels in clear but any change to it fails the tag.

Error classes carry the gRPC status code *name* in ``code`` so a servicer can map them without
``common/`` importing grpc. A stream that raised must be aborted: openers do not resynchronise.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

log = logging.getLogger(__name__)

FRAME_VERSION = 1
SESSION_BYTES = 16
MAX_NDIM = 8
MAX_FRAMES_PER_KEY = 1 << 20  # far below GCM's 2^32 random-nonce bound; the sender must open a new envelope
MAX_GENERATION = (1 << 32) - 1
HPKE_INFO_LABEL = b"splitmesh/hop/1"
DTYPE_CODES: dict[str, int] = {"float32": 1, "float16": 2, "bfloat16": 3, "int32": 4, "int64": 5}
DTYPE_NAMES: dict[int, str] = {code: name for name, code in DTYPE_CODES.items()}

_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
HPKE_SUITE = _SUITE  # also seals the weight keys a plan gives a node (common.weight_keys)
# version, direction, session, epoch, step, seq, chunk_index, chunk_count, dtype, ndim; then ndim x u32 dims
_FIXED = struct.Struct(">BB16sQQQIIBB")
_DIMS = [struct.Struct(f">{n}I") for n in range(MAX_NDIM + 1)]
_NONCE = struct.Struct(">IQ")
# version, direction, session, epoch, hop, generation; then the HPKE ciphertext (enc || sealed key)
_ENVELOPE = struct.Struct(">BB16sQII")
_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1


class Direction(IntEnum):
    """Which way a hop's frames flow; a hop's two directions use two independent keys."""

    FORWARD = 1  # activations towards the tail
    BACKWARD = 2  # replies towards the head


class FrameCryptoError(Exception):
    """Base of every frame-crypto failure; ``code`` is the gRPC status name to answer with."""

    code: str = "INTERNAL"


class FrameHeaderError(FrameCryptoError, ValueError):
    """Header (or envelope) bytes are malformed or a field is out of range."""

    code = "INVALID_ARGUMENT"


class FrameAuthError(FrameCryptoError):
    """Tag failure, tampered header/ciphertext/envelope, or wrong session/direction."""

    code = "UNAUTHENTICATED"


class FrameSequenceError(FrameCryptoError):
    """A frame was replayed, skipped or reordered (or a key generation reused)."""

    code = "ABORTED"


class FrameEpochError(FrameCryptoError):
    """The peer's epoch differs from ours: retryable if it is ahead (we will catch up), stale if behind."""

    def __init__(self, peer_epoch: int, expected_epoch: int) -> None:
        self.peer_epoch = peer_epoch
        self.expected_epoch = expected_epoch
        self.sender_ahead = peer_epoch > expected_epoch
        self.code = "UNAVAILABLE" if self.sender_ahead else "FAILED_PRECONDITION"
        side = "ahead of" if self.sender_ahead else "behind"
        super().__init__(f"sender epoch {peer_epoch} is {side} expected epoch {expected_epoch}")


class FrameRekeyError(FrameCryptoError):
    """The sender used up its key (``MAX_FRAMES_PER_KEY`` frames): call ``HopSealer.rekeyed()``."""

    code = "RESOURCE_EXHAUSTED"


def session_id_bytes(session_id: str | bytes) -> bytes:
    """The fixed 16-byte session field: 16 raw bytes as-is, else a UUID's bytes, else SHA-256 truncated."""
    if isinstance(session_id, bytes):
        if len(session_id) != SESSION_BYTES:
            raise ValueError(f"raw session id must be {SESSION_BYTES} bytes, got {len(session_id)}")
        return session_id
    try:
        return uuid.UUID(session_id).bytes
    except ValueError:
        return hashlib.sha256(b"splitmesh/session\x00" + session_id.encode()).digest()[:SESSION_BYTES]


def _pack_header(direction: int, session: bytes, epoch: int, step: int, seq: int, dtype: str,
                 shape: Sequence[int], chunk_index: int, chunk_count: int) -> bytes:
    """The one place the header layout is written (hot path: checks only what struct would not)."""
    if direction not in (Direction.FORWARD, Direction.BACKWARD):
        raise FrameHeaderError(f"bad direction {direction!r}")
    if len(session) != SESSION_BYTES:  # struct's "16s" would silently pad or truncate
        raise FrameHeaderError(f"session must be {SESSION_BYTES} bytes, got {len(session)}")
    code = DTYPE_CODES.get(dtype)
    if code is None:
        raise FrameHeaderError(f"dtype {dtype!r} not allowed (allowed: {', '.join(DTYPE_CODES)})")
    ndim = len(shape)
    if ndim > MAX_NDIM:
        raise FrameHeaderError(f"{ndim} dims exceed the limit of {MAX_NDIM}")
    if not 0 <= chunk_index < chunk_count:
        raise FrameHeaderError(f"chunk {chunk_index} of {chunk_count} is impossible")
    try:  # struct range-checks every unsigned field
        return _FIXED.pack(FRAME_VERSION, direction, session, epoch, step, seq, chunk_index, chunk_count, code,
                           ndim) + _DIMS[ndim].pack(*shape)
    except struct.error as exc:
        raise FrameHeaderError(f"header field out of range: {exc}") from None


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """The clear-text frame header; its packed bytes are the AES-GCM associated data."""

    direction: Direction
    session: bytes  # SESSION_BYTES, see session_id_bytes()
    epoch: int
    step: int
    seq: int
    dtype: str  # a key of DTYPE_CODES
    shape: tuple[int, ...]  # shape of the whole tensor, not of this chunk
    chunk_index: int = 0
    chunk_count: int = 1
    version: int = FRAME_VERSION

    def pack(self) -> bytes:
        """Fixed big-endian layout; raises FrameHeaderError for fields that do not fit it."""
        if self.version != FRAME_VERSION:
            raise FrameHeaderError(f"unsupported frame version {self.version}")
        return _pack_header(self.direction, self.session, self.epoch, self.step, self.seq, self.dtype, self.shape,
                            self.chunk_index, self.chunk_count)

    @classmethod
    def unpack(cls, data: bytes) -> FrameHeader:
        """Parse and validate; any malformed input raises FrameHeaderError and nothing else."""
        if len(data) < _FIXED.size:
            raise FrameHeaderError(f"header of {len(data)} bytes is shorter than {_FIXED.size}")
        version, direction, session, epoch, step, seq, index, count, code, ndim = _FIXED.unpack_from(data)
        if version != FRAME_VERSION:
            raise FrameHeaderError(f"unsupported frame version {version}")
        if direction not in (Direction.FORWARD, Direction.BACKWARD):
            raise FrameHeaderError(f"bad direction {direction}")
        if code not in DTYPE_NAMES:
            raise FrameHeaderError(f"unknown dtype code {code}")
        if ndim > MAX_NDIM:
            raise FrameHeaderError(f"{ndim} dims exceed the limit of {MAX_NDIM}")
        if len(data) != _FIXED.size + 4 * ndim:
            raise FrameHeaderError(f"header of {len(data)} bytes, expected {_FIXED.size + 4 * ndim} for {ndim} dims")
        if count == 0 or index >= count:
            raise FrameHeaderError(f"chunk {index} of {count} is impossible")
        shape = _DIMS[ndim].unpack_from(data, _FIXED.size)
        return cls(Direction(direction), session, epoch, step, seq, DTYPE_NAMES[code], shape, index, count, version)


@dataclass(frozen=True, slots=True)
class EnvelopeHeader:
    """The context in clear in front of an HPKE-sealed key (and bound into its ``info``), so it can be routed."""

    direction: Direction
    session: bytes  # SESSION_BYTES
    epoch: int
    hop: int  # the receiving segment's index: one node may host several segments of a session
    generation: int  # 0 for a hop's first key, +1 per rekey

    def pack(self) -> bytes:
        if len(self.session) != SESSION_BYTES:
            raise FrameHeaderError(f"session must be {SESSION_BYTES} bytes, got {len(self.session)}")
        try:
            return _ENVELOPE.pack(FRAME_VERSION, self.direction, self.session, self.epoch, self.hop, self.generation)
        except struct.error as exc:
            raise FrameHeaderError(f"envelope field out of range: {exc}") from None

    @classmethod
    def unpack(cls, envelope: bytes) -> EnvelopeHeader:
        """Parse the prefix of a key envelope; malformed input raises FrameHeaderError."""
        if len(envelope) != _ENVELOPE.size + _ENVELOPE_CT_BYTES:
            raise FrameHeaderError(f"key envelope of {len(envelope)} bytes, expected "
                                   f"{_ENVELOPE.size + _ENVELOPE_CT_BYTES}")
        version, direction, session, epoch, hop, generation = _ENVELOPE.unpack_from(envelope)
        if version != FRAME_VERSION:
            raise FrameHeaderError(f"unsupported envelope version {version}")
        if direction not in (Direction.FORWARD, Direction.BACKWARD):
            raise FrameHeaderError(f"bad direction {direction}")
        return cls(Direction(direction), session, epoch, hop, generation)

    def hpke_info(self) -> bytes:
        return HPKE_INFO_LABEL + self.pack()


_ENVELOPE_CT_BYTES = hpke.KEM.X25519.enc_length() + 32 + 16  # enc || AES-256 key || tag


class HopSealer:
    """Sender side of one hop direction for one session: owns a fresh key and the next sequence number."""

    def __init__(self, receiver: X25519PublicKey, session: str | bytes, epoch: int, direction: Direction, *,
                 hop: int = 0, generation: int = 0) -> None:
        self._receiver = receiver
        self._context = EnvelopeHeader(Direction(direction), session_id_bytes(session), epoch, hop, generation)
        key = AESGCM.generate_key(bit_length=256)
        self._aead = AESGCM(key)
        self._envelope = self._context.pack() + _SUITE.encrypt(key, receiver, info=self._context.hpke_info())
        self._seq = 0
        self._nonce_prefix = int(direction)

    @property
    def context(self) -> EnvelopeHeader:
        return self._context

    @property
    def next_seq(self) -> int:
        return self._seq

    @property
    def needs_rekey(self) -> bool:
        """True once the key has sealed its last frame; seal() would raise."""
        return self._seq >= MAX_FRAMES_PER_KEY

    def key_envelope(self) -> bytes:
        """The sealed key to send once, before the first frame (same bytes on every call)."""
        return self._envelope

    def rekeyed(self) -> HopSealer:
        """A sealer with a fresh key for the same hop, next generation; send its envelope before its frames."""
        c = self._context
        if c.generation >= MAX_GENERATION:
            raise FrameRekeyError("this hop used up its key generations; open a new session")
        return HopSealer(self._receiver, c.session, c.epoch, c.direction, hop=c.hop, generation=c.generation + 1)

    def seal(self, *, step: int, dtype: str, shape: Sequence[int], plaintext: bytes | bytearray | memoryview,
             chunk_index: int = 0, chunk_count: int = 1) -> tuple[bytes, bytes]:
        """Encrypt one frame; returns (header bytes, ciphertext with 16-byte tag). Assigns seq itself."""
        if self._seq >= MAX_FRAMES_PER_KEY:
            raise FrameRekeyError(f"key sealed {MAX_FRAMES_PER_KEY} frames; open a new envelope (rekeyed())")
        c = self._context
        header = _pack_header(c.direction, c.session, c.epoch, step, self._seq, dtype, shape, chunk_index, chunk_count)
        ciphertext = self._aead.encrypt(_NONCE.pack(self._nonce_prefix, self._seq), plaintext, header)
        self._seq += 1
        return header, ciphertext


class HopOpener:
    """Receiver side of one hop direction for one session: accepts frames only in exact sequence order."""

    def __init__(self, private_key: X25519PrivateKey, envelope: bytes, *, session: str | bytes, epoch: int,
                 direction: Direction, hop: int = 0, generation: int = 0) -> None:
        try:
            got = EnvelopeHeader.unpack(envelope)
            key = _SUITE.decrypt(envelope[_ENVELOPE.size:], private_key, info=got.hpke_info())
        except (FrameHeaderError, InvalidTag):
            raise FrameAuthError("key envelope does not open with this node's key") from None
        # The context is authentic from here on (HPKE info), so the errors below say what the sender meant.
        expected = EnvelopeHeader(Direction(direction), session_id_bytes(session), epoch, hop, generation)
        if (got.session, got.direction, got.hop) != (expected.session, expected.direction, expected.hop):
            raise FrameAuthError("key envelope is for another session, direction or hop")
        if got.epoch != expected.epoch:
            raise FrameEpochError(got.epoch, expected.epoch)
        if got.generation != expected.generation:
            raise FrameSequenceError(f"key generation {got.generation}, expected {expected.generation}")
        self._private_key = private_key
        self._context = expected
        self._aead = AESGCM(key)
        self._seq = 0

    @property
    def context(self) -> EnvelopeHeader:
        return self._context

    @property
    def next_seq(self) -> int:
        return self._seq

    def rekeyed(self, envelope: bytes) -> HopOpener:
        """The opener for the sender's next key generation; an older envelope is refused."""
        c = self._context
        return HopOpener(self._private_key, envelope, session=c.session, epoch=c.epoch, direction=c.direction,
                         hop=c.hop, generation=c.generation + 1)

    def open(self, header: bytes, ciphertext: bytes | bytearray | memoryview) -> tuple[FrameHeader, bytes]:
        """Authenticate and decrypt one frame, then check its context and sequence number.

        The tag is checked before anything the header says is trusted, so any change to header or
        ciphertext is a FrameAuthError, never a sequence or epoch error.
        """
        try:
            parsed = FrameHeader.unpack(header)
        except FrameHeaderError as exc:
            raise FrameAuthError(f"malformed frame header: {exc}") from None
        c = self._context
        try:
            plaintext = self._aead.decrypt(_NONCE.pack(c.direction, parsed.seq), ciphertext, header)
        except InvalidTag:
            raise FrameAuthError(f"frame seq {parsed.seq} fails authentication") from None
        if parsed.session != c.session or parsed.direction != c.direction:
            raise FrameAuthError("frame is for another session or direction")
        if parsed.epoch != c.epoch:
            raise FrameEpochError(parsed.epoch, c.epoch)
        if parsed.seq != self._seq or parsed.seq >= MAX_FRAMES_PER_KEY:
            kind = "replayed or reordered" if parsed.seq < self._seq else "skipped ahead"
            raise FrameSequenceError(f"frame seq {parsed.seq} {kind}; expected {self._seq}")
        self._seq += 1
        return parsed, plaintext


# ------------------------------------------------------------------ node keys
def generate_node_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_key_bytes(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    """The raw 32 bytes that go into the plan's ``x25519_public_key``."""
    public = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_from_bytes(raw: bytes) -> X25519PublicKey:
    if len(raw) != 32:
        raise ValueError(f"X25519 public key must be 32 bytes, got {len(raw)}")
    return X25519PublicKey.from_public_bytes(raw)


def save_node_key(key: X25519PrivateKey, path: Path) -> None:
    """Write PKCS#8 PEM with mode 0600, atomically (a crash never leaves half a key)."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    os.replace(tmp, path)


def load_node_key(path: Path) -> X25519PrivateKey:
    if path.stat().st_mode & 0o077:
        log.warning("node key %s is readable by group/others; chmod 600 it", path)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, X25519PrivateKey):
        raise ValueError(f"{path} does not hold an X25519 private key")
    return key


def load_or_create_node_key(path: Path) -> X25519PrivateKey:
    """The node's frame-encryption key: created on first start, then kept across restarts."""
    if path.exists():
        return load_node_key(path)
    key = generate_node_key()
    save_node_key(key, path)
    return key


def frame_overhead_bytes(ndim: int) -> int:
    """Bytes a frame adds on the wire over its plaintext: header plus GCM tag."""
    return _FIXED.size + 4 * ndim + 16
