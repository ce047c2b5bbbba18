"""Coverage-guided fuzzing of the frame and key-envelope parsers (atheris; not part of CI).

The invariant: whatever bytes a peer sends, parsing and opening raise only the documented
``FrameCryptoError`` subclasses, never anything else, and nothing forged ever opens.

    pip install atheris   # into a scratch environment
    .venv/bin/python bench/fuzz/fuzz_frames.py -atheris_runs=200000
    .venv/bin/python bench/fuzz/fuzz_frames.py --smoke 20000   # random inputs, no atheris needed
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from common.frame_crypto import (
    Direction,
    EnvelopeHeader,
    FrameAuthError,
    FrameCryptoError,
    FrameHeader,
    FrameHeaderError,
    HopOpener,
    HopSealer,
)

_KEY = X25519PrivateKey.from_private_bytes(bytes(range(32)))
_SEALER = HopSealer(_KEY.public_key(), "fuzz-session", 5, Direction.FORWARD)
_ENVELOPE = _SEALER.key_envelope()
_GENUINE = _SEALER.seal(step=0, dtype="float32", shape=(1, 1, 4), plaintext=bytes(16))


def one_input(data: bytes) -> None:
    """Feed ``data`` to every parser; fail loudly on anything but a documented error or a forgery that opens."""
    try:
        header = FrameHeader.unpack(data)
        assert header.pack() == data, "unpack/pack is not an exact round trip"
    except FrameHeaderError:
        pass
    with contextlib.suppress(FrameHeaderError):
        EnvelopeHeader.unpack(data)
    try:  # an arbitrary envelope never yields an opener
        HopOpener(_KEY, data, session="fuzz-session", epoch=5, direction=Direction.FORWARD)
        raise AssertionError("a forged key envelope opened")
    except FrameCryptoError:
        pass
    opener = HopOpener(_KEY, _ENVELOPE, session="fuzz-session", epoch=5, direction=Direction.FORWARD)
    split = data[0] if data else 0
    forged = (data[1:split + 1], data[split + 1:])
    if forged == _GENUINE:
        return
    try:
        opener.open(*forged)
        raise AssertionError("a forged frame opened")
    except FrameAuthError:
        pass


def smoke(runs: int) -> None:
    """Random inputs plus mutations of genuine frames, for machines without atheris."""
    header, ciphertext = _GENUINE
    seeds = [header, _ENVELOPE, bytes([len(header)]) + header + ciphertext]
    for i in range(runs):
        if i % 2:
            one_input(os.urandom(i % 160))
        else:
            data = bytearray(seeds[i % len(seeds)])
            data[i % len(data)] ^= 1 << (i % 8)
            one_input(bytes(data))
    print(f"smoke: {runs} inputs, no undocumented error")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--smoke":
        smoke(int(sys.argv[2]))
        return
    atheris = importlib.import_module("atheris")  # optional: only this entry point needs it
    atheris.instrument_all()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
