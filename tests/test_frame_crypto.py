"""Activation-frame encryption: round trips, tamper/replay/epoch rejection, nonce uniqueness, header parsing."""

from __future__ import annotations

import contextlib
import os
import stat
import struct
from pathlib import Path
from typing import Any, ClassVar

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from common import frame_crypto as fc
from common.frame_crypto import (
    Direction,
    EnvelopeHeader,
    FrameAuthError,
    FrameCryptoError,
    FrameEpochError,
    FrameHeader,
    FrameHeaderError,
    FrameRekeyError,
    FrameSequenceError,
    HopOpener,
    HopSealer,
)

SESSION = "3f2b8c1e-9d4a-4f6b-8e2a-1c5d7e9f0a1b"
EPOCH = 7
FWD = Direction.FORWARD


@pytest.fixture(scope="module")
def node_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def pair(key: X25519PrivateKey, session: str = SESSION, epoch: int = EPOCH,
         direction: Direction = FWD) -> tuple[HopSealer, HopOpener]:
    sealer = HopSealer(key.public_key(), session, epoch, direction)
    opener = HopOpener(key, sealer.key_envelope(), session=session, epoch=epoch, direction=direction)
    return sealer, opener


def seal(sealer: HopSealer, step: int = 0, payload: bytes = b"\x01" * 64) -> tuple[bytes, bytes]:
    return sealer.seal(step=step, dtype="float32", shape=(1, 1, len(payload) // 4), plaintext=payload)


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


# ------------------------------------------------------------------ round trip
def test_round_trip_keeps_payload_and_header(node_key: X25519PrivateKey) -> None:
    sealer, opener = pair(node_key)
    for seq, (dtype, shape) in enumerate([("float32", (1, 1, 576)), ("bfloat16", (2, 9, 576)), ("int64", ())]):
        payload = os.urandom(333)
        header, ciphertext = sealer.seal(step=40 + seq, dtype=dtype, shape=shape, plaintext=payload,
                                         chunk_index=1, chunk_count=3)
        assert len(ciphertext) == len(payload) + 16
        assert len(header) + 16 == fc.frame_overhead_bytes(len(shape))
        parsed, plaintext = opener.open(header, ciphertext)
        assert plaintext == payload
        assert parsed == FrameHeader(FWD, fc.session_id_bytes(SESSION), EPOCH, 40 + seq, seq, dtype, shape, 1, 3)
    assert sealer.next_seq == opener.next_seq == 3


def test_both_directions_are_independent(node_key: X25519PrivateKey) -> None:
    fwd_sealer, _ = pair(node_key, direction=Direction.FORWARD)
    _, bwd_opener = pair(node_key, direction=Direction.BACKWARD)
    with pytest.raises(FrameAuthError):
        bwd_opener.open(*seal(fwd_sealer))


# ------------------------------------------------------------------ tampering
def test_every_bit_flip_of_header_and_ciphertext_is_rejected(node_key: X25519PrivateKey) -> None:
    sealer, opener = pair(node_key)
    for step, payload in enumerate([b"", os.urandom(8), os.urandom(48)]):
        header, ciphertext = sealer.seal(step=step, dtype="float16", shape=(1, 2, len(payload) // 2),
                                         plaintext=payload)
        for bit in range(len(header) * 8):
            with pytest.raises(FrameAuthError):
                opener.open(flip(header, bit), ciphertext)
        for bit in range(len(ciphertext) * 8):
            with pytest.raises(FrameAuthError):
                opener.open(header, flip(ciphertext, bit))
        for cut in (header[:-1], header + b"\x00"):
            with pytest.raises(FrameAuthError):
                opener.open(cut, ciphertext)
        with pytest.raises(FrameAuthError):
            opener.open(header, ciphertext[:-1])
        assert opener.open(header, ciphertext)[1] == payload  # failures left the stream state intact


def test_frame_from_another_session_or_key_is_rejected(node_key: X25519PrivateKey) -> None:
    other_session, _ = pair(node_key, session="another-session")
    _, opener = pair(node_key)
    with pytest.raises(FrameAuthError):
        opener.open(*seal(other_session))


# ------------------------------------------------------------------ sequence
def test_replayed_frame_is_rejected(node_key: X25519PrivateKey) -> None:
    sealer, opener = pair(node_key)
    first = seal(sealer)
    opener.open(*first)
    with pytest.raises(FrameSequenceError) as info:
        opener.open(*first)
    assert info.value.code == "ABORTED"
    opener.open(*seal(sealer, 1))


def test_dropped_frame_is_rejected(node_key: X25519PrivateKey) -> None:
    sealer, opener = pair(node_key)
    opener.open(*seal(sealer, 0))
    seal(sealer, 1)  # lost on the way
    with pytest.raises(FrameSequenceError):
        opener.open(*seal(sealer, 2))


def test_swapped_frames_are_rejected(node_key: X25519PrivateKey) -> None:
    sealer, opener = pair(node_key)
    a, b = seal(sealer, 0), seal(sealer, 1)
    with pytest.raises(FrameSequenceError):
        opener.open(*b)
    opener.open(*a)
    opener.open(*b)
    with pytest.raises(FrameSequenceError):
        opener.open(*a)


class RecordingAESGCM:
    """Wraps AESGCM (not subclassable) to record every (key, nonce) pair used for encryption."""

    used: ClassVar[list[tuple[bytes, bytes]]] = []

    generate_key = staticmethod(AESGCM.generate_key)

    def __init__(self, key: bytes) -> None:
        self._key, self._inner = key, AESGCM(key)

    def encrypt(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        self.used.append((self._key, nonce))
        return self._inner.encrypt(nonce, data, aad)

    def decrypt(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        return self._inner.decrypt(nonce, data, aad)


def test_100k_frames_never_repeat_a_key_nonce_pair(node_key: X25519PrivateKey,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fc, "AESGCM", RecordingAESGCM)
    monkeypatch.setattr(fc, "MAX_FRAMES_PER_KEY", 7_000)  # so the run crosses rekeys too
    RecordingAESGCM.used = []
    sealers = [HopSealer(node_key.public_key(), s, EPOCH, d) for s in ("a", "b") for d in Direction]
    payload = b"\x00" * 16
    for i in range(100_000):
        index = i % len(sealers)
        if sealers[index].needs_rekey:
            sealers[index] = sealers[index].rekeyed()
        sealers[index].seal(step=i, dtype="float32", shape=(4,), plaintext=payload)
    used = RecordingAESGCM.used
    assert len(used) == 100_000
    assert len(set(used)) == len(used)
    assert all(len(nonce) == 12 for _, nonce in used[:10])
    assert len({key for key, _ in used}) == 4 + 4 * 3  # generation 0 plus three rekeys per sealer


def test_rekey_limit(node_key: X25519PrivateKey, monkeypatch: pytest.MonkeyPatch) -> None:
    assert fc.MAX_FRAMES_PER_KEY == 1 << 20
    monkeypatch.setattr(fc, "MAX_FRAMES_PER_KEY", 3)
    sealer, opener = pair(node_key)
    old_frames = []
    for step in range(3):
        assert not sealer.needs_rekey
        old_frames.append(seal(sealer, step))
        opener.open(*old_frames[-1])
    assert sealer.needs_rekey
    with pytest.raises(FrameRekeyError):
        seal(sealer, 3)
    fresh = sealer.rekeyed()
    assert fresh.context.generation == 1 and fresh.next_seq == 0
    assert fresh.key_envelope() != sealer.key_envelope()
    with pytest.raises(FrameSequenceError):  # an old envelope replayed as the rekey
        opener.rekeyed(sealer.key_envelope())
    with pytest.raises(FrameSequenceError):  # the new envelope is not generation 0
        HopOpener(node_key, fresh.key_envelope(), session=SESSION, epoch=EPOCH, direction=FWD)
    next_opener = opener.rekeyed(fresh.key_envelope())
    assert next_opener.open(*seal(fresh, 3))[0].seq == 0
    with pytest.raises(FrameAuthError):  # old-key frames do not open under the new key
        next_opener.open(*old_frames[1])


# ------------------------------------------------------------------ epochs and envelopes
@pytest.mark.parametrize(("sender_epoch", "ahead", "code"), [(EPOCH + 1, True, "UNAVAILABLE"),
                                                             (EPOCH - 1, False, "FAILED_PRECONDITION")])
def test_wrong_epoch(node_key: X25519PrivateKey, sender_epoch: int, ahead: bool, code: str) -> None:
    sealer = HopSealer(node_key.public_key(), SESSION, sender_epoch, FWD)
    with pytest.raises(FrameEpochError) as info:
        HopOpener(node_key, sealer.key_envelope(), session=SESSION, epoch=EPOCH, direction=FWD)
    assert info.value.sender_ahead is ahead
    assert info.value.code == code
    assert (info.value.peer_epoch, info.value.expected_epoch) == (sender_epoch, EPOCH)


def test_envelope_for_another_session_direction_hop_or_node_fails(node_key: X25519PrivateKey) -> None:
    envelope = HopSealer(node_key.public_key(), "other", EPOCH, FWD).key_envelope()
    with pytest.raises(FrameAuthError):
        HopOpener(node_key, envelope, session=SESSION, epoch=EPOCH, direction=FWD)
    envelope = HopSealer(node_key.public_key(), SESSION, EPOCH, Direction.BACKWARD).key_envelope()
    with pytest.raises(FrameAuthError):
        HopOpener(node_key, envelope, session=SESSION, epoch=EPOCH, direction=FWD)
    envelope = HopSealer(X25519PrivateKey.generate().public_key(), SESSION, EPOCH, FWD).key_envelope()
    with pytest.raises(FrameAuthError):
        HopOpener(node_key, envelope, session=SESSION, epoch=EPOCH, direction=FWD)
    envelope = HopSealer(node_key.public_key(), SESSION, EPOCH, FWD, hop=2).key_envelope()
    with pytest.raises(FrameAuthError):  # same node, same session, but the key of another segment's hop
        HopOpener(node_key, envelope, session=SESSION, epoch=EPOCH, direction=FWD, hop=0)
    assert HopOpener(node_key, envelope, session=SESSION, epoch=EPOCH, direction=FWD, hop=2).context.hop == 2


def test_envelope_relabelled_to_another_session_or_epoch_fails(node_key: X25519PrivateKey) -> None:
    """The HPKE info binds the context: rewriting the clear-text prefix does not move a key elsewhere."""
    envelope = HopSealer(node_key.public_key(), "other", EPOCH + 1, FWD).key_envelope()
    relabelled = EnvelopeHeader(FWD, fc.session_id_bytes(SESSION), EPOCH, 0, 0).pack()
    with pytest.raises(FrameAuthError):
        HopOpener(node_key, relabelled + envelope[len(relabelled):], session=SESSION, epoch=EPOCH, direction=FWD)


def test_every_bit_flip_of_the_envelope_is_rejected(node_key: X25519PrivateKey) -> None:
    envelope = HopSealer(node_key.public_key(), SESSION, EPOCH, FWD).key_envelope()
    for bit in range(len(envelope) * 8):
        with pytest.raises(FrameAuthError):
            HopOpener(node_key, flip(envelope, bit), session=SESSION, epoch=EPOCH, direction=FWD)


# ------------------------------------------------------------------ header parsing (property tests)
headers = st.builds(
    FrameHeader,
    direction=st.sampled_from(list(Direction)),
    session=st.binary(min_size=16, max_size=16),
    epoch=st.integers(0, 2**64 - 1),
    step=st.integers(0, 2**64 - 1),
    seq=st.integers(0, 2**64 - 1),
    dtype=st.sampled_from(sorted(fc.DTYPE_CODES)),
    shape=st.lists(st.integers(0, 2**32 - 1), max_size=fc.MAX_NDIM).map(tuple),
    chunk_index=st.just(0),
    chunk_count=st.integers(1, 2**32 - 1),
)


@settings(max_examples=200, deadline=None)
@given(headers)
def test_header_pack_unpack_round_trip(header: FrameHeader) -> None:
    assert FrameHeader.unpack(header.pack()) == header


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_unpack_random_bytes_only_raises_the_documented_error(data: bytes) -> None:
    try:
        parsed = FrameHeader.unpack(data)
    except FrameHeaderError:
        return
    assert parsed.pack() == data


@settings(max_examples=200, deadline=None)
@given(headers, st.integers(0, 51 * 8 - 1))
def test_unpack_of_mutated_headers_never_crashes(header: FrameHeader, bit: int) -> None:
    data = flip(header.pack(), bit)
    with contextlib.suppress(FrameHeaderError):
        assert FrameHeader.unpack(data).pack() == data


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=120), st.binary(max_size=64))
def test_open_of_random_bytes_only_raises_auth_error(header: bytes, ciphertext: bytes) -> None:
    key = X25519PrivateKey.from_private_bytes(b"\x01" * 32)
    _, opener = pair(key)
    with pytest.raises(FrameAuthError):
        opener.open(header, ciphertext)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=140))
def test_envelope_unpack_of_random_bytes(data: bytes) -> None:
    with contextlib.suppress(FrameHeaderError):
        EnvelopeHeader.unpack(data)


@pytest.mark.parametrize("change", [
    {"dtype": "float64"}, {"shape": (1,) * 9}, {"shape": (-1,)}, {"shape": (2**32,)}, {"epoch": -1},
    {"seq": 2**64}, {"session": b"short"}, {"chunk_index": 2, "chunk_count": 2}, {"chunk_count": 0},
    {"version": 2},
])
def test_pack_refuses_fields_that_do_not_fit(change: dict[str, object]) -> None:
    fields: dict[str, object] = {"direction": FWD, "session": b"s" * 16, "epoch": 1, "step": 1, "seq": 1,
                                 "dtype": "float32", "shape": (1, 576)}
    fields.update(change)
    with pytest.raises(FrameHeaderError):
        FrameHeader(**fields).pack()  # type: ignore[arg-type]


def test_unpack_errors_are_specific() -> None:
    good = FrameHeader(FWD, b"s" * 16, 1, 2, 3, "float32", (1, 576)).pack()
    with pytest.raises(FrameHeaderError, match="version"):
        FrameHeader.unpack(b"\x09" + good[1:])
    with pytest.raises(FrameHeaderError, match="shorter"):
        FrameHeader.unpack(good[:10])
    with pytest.raises(FrameHeaderError, match="expected"):
        FrameHeader.unpack(good + b"\x00")
    assert isinstance(FrameHeaderError("x"), ValueError)
    assert struct.calcsize(">BB16sQQQIIBB") == 52


# ------------------------------------------------------------------ errors, session ids, node keys
def test_error_codes() -> None:
    assert FrameAuthError.code == "UNAUTHENTICATED"
    assert FrameSequenceError.code == "ABORTED"
    assert FrameHeaderError.code == "INVALID_ARGUMENT"
    assert all(issubclass(e, FrameCryptoError) for e in (FrameAuthError, FrameSequenceError, FrameEpochError))


def test_session_id_bytes() -> None:
    assert fc.session_id_bytes(SESSION) == bytes.fromhex(SESSION.replace("-", ""))
    assert fc.session_id_bytes("abc") == fc.session_id_bytes("abc") != fc.session_id_bytes("abd")
    assert len(fc.session_id_bytes("abc")) == 16
    assert fc.session_id_bytes(b"r" * 16) == b"r" * 16
    with pytest.raises(ValueError):
        fc.session_id_bytes(b"short")


def test_node_key_files(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "node.x25519.pem"
    key = fc.load_or_create_node_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert fc.public_key_bytes(fc.load_or_create_node_key(path)) == fc.public_key_bytes(key)
    raw = fc.public_key_bytes(key.public_key())
    assert len(raw) == 32 and fc.public_key_bytes(fc.public_key_from_bytes(raw)) == raw
    with pytest.raises(ValueError):
        fc.public_key_from_bytes(raw[:31])
    sealer = HopSealer(fc.public_key_from_bytes(raw), SESSION, EPOCH, FWD)
    HopOpener(fc.load_node_key(path), sealer.key_envelope(), session=SESSION, epoch=EPOCH, direction=FWD)


def test_load_refuses_other_key_types(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    path = tmp_path / "ed.pem"
    path.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.chmod(0o600)
    with pytest.raises(ValueError, match="X25519"):
        fc.load_node_key(path)


def test_sealer_refuses_contexts_that_do_not_fit(node_key: X25519PrivateKey) -> None:
    for kwargs in ({"epoch": -1}, {"epoch": 2**64}, {"hop": -1}, {"generation": 2**32}):
        args: dict[str, Any] = {"epoch": EPOCH, **kwargs}
        with pytest.raises(FrameHeaderError):
            HopSealer(node_key.public_key(), SESSION, direction=FWD, **args)
