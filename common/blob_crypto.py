"""Layer blobs encrypted at rest: one random AES-256-GCM key per blob, kept apart from the blobs.

A weight blob on disk is ``MAGIC || chunk_0 || chunk_1 ...``: the plaintext cut into CHUNK_BYTES pieces, each
sealed with nonce = chunk index (11 bytes) || last-chunk flag (1 byte), so no nonce repeats under a key and a
truncated blob fails its tag. The associated data is MAGIC || the plaintext sha256, binding a ciphertext to the
manifest entry it belongs to. Keys live only in the owner's key file (:class:`KeyFile`, the orchestrator's
store) and, sealed to one node, in the plan flow (common.weight_keys).
"""

from __future__ import annotations

import json
import mmap
import os
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from common.store_errors import StoreError

MAGIC = b"SMWENC1\n"
CHUNK_BYTES = 16 << 20  # AES-GCM one-shot calls stay far below cryptography's 2 GiB limit
KEY_BYTES = 32
TAG_BYTES = 16
BLOCK_BYTES = 16  # AES
KEY_FILE = "weight_keys.json"  # in the store root: read only by the store's owner, never served


def _nonce(index: int, last: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def _chunk_count(plain_size: int) -> int:
    return max(1, -(-plain_size // CHUNK_BYTES))


def encrypt_blob(key: bytes, plaintext: bytes, plain_sha256: str) -> bytes:
    """The at-rest form of ``plaintext`` under ``key`` (a fresh key per blob: nonces are counters)."""
    aead, aad = AESGCM(key), MAGIC + bytes.fromhex(plain_sha256)
    n = _chunk_count(len(plaintext))
    parts = [MAGIC]
    for i in range(n):
        parts.append(aead.encrypt(_nonce(i, i == n - 1), plaintext[i * CHUNK_BYTES:(i + 1) * CHUNK_BYTES], aad))
    return b"".join(parts)


def plain_size_of(cipher_size: int) -> int:
    """Plaintext bytes behind a ciphertext of ``cipher_size`` bytes (StoreError if no blob can be that long)."""
    body = cipher_size - len(MAGIC)
    n = max(1, -(-body // (CHUNK_BYTES + TAG_BYTES)))
    size = body - n * TAG_BYTES
    if size < 0 or _chunk_count(size) != n:
        raise StoreError(f"an encrypted blob cannot be {cipher_size} bytes long")
    return size


def peek_plaintext(key: bytes, ciphertext: bytes | bytearray | mmap.mmap, nbytes: int) -> bytes:
    """The first ``nbytes`` (at most one AES block) of the plaintext, NOT authenticated: only to lay out the
    buffer :func:`decrypt_blob` then fills and authenticates (a safetensors header's length, so the tensors
    land aligned without moving them afterwards). GCM encrypts the first block of chunk 0 with the counter
    block nonce || 2 (NIST SP 800-38D, 96-bit nonce)."""
    if not 0 <= nbytes <= BLOCK_BYTES or len(ciphertext) < len(MAGIC) + nbytes:
        raise ValueError(f"cannot peek at {nbytes} bytes")
    size = plain_size_of(len(ciphertext))
    counter = _nonce(0, _chunk_count(size) == 1) + (2).to_bytes(4, "big")
    decryptor = Cipher(algorithms.AES(key), modes.CTR(counter)).decryptor()
    return decryptor.update(bytes(ciphertext[len(MAGIC):len(MAGIC) + nbytes]))


def decrypt_blob(key: bytes, ciphertext: bytes | bytearray | mmap.mmap, plain_sha256: str, role: str,
                 out: memoryview | None = None) -> memoryview:
    """The plaintext, decrypted chunk by chunk into ``out`` (plain_size_of(len(ciphertext)) writable bytes; a
    new buffer when None) as every tag checks: StoreError on a wrong key or any altered byte."""
    if bytes(ciphertext[:len(MAGIC)]) != MAGIC:
        raise StoreError(f"store file for {role} is not an encrypted blob")
    size = plain_size_of(len(ciphertext))
    target = memoryview(bytearray(size)) if out is None else out
    if target.nbytes != size:
        raise StoreError(f"store file for {role}: {target.nbytes}-byte buffer for {size} bytes of plaintext")
    aead, aad = AESGCM(key), MAGIC + bytes.fromhex(plain_sha256)
    n = _chunk_count(size)
    source = memoryview(ciphertext)[len(MAGIC):]
    step = CHUNK_BYTES + TAG_BYTES
    try:
        for i in range(n):
            aead.decrypt_into(_nonce(i, i == n - 1), source[i * step:(i + 1) * step], aad,
                              target[i * CHUNK_BYTES:min((i + 1) * CHUNK_BYTES, size)])
    except InvalidTag:
        raise StoreError(f"store file for {role} is corrupted (it does not decrypt under its key)") from None
    finally:
        source.release()
    return target


class KeyFile:
    """The owner's blob keys (ciphertext sha256 -> key, and which plaintext each ciphertext holds, so the same
    plaintext is encrypted once and imports stay idempotent): one JSON file, written atomically, mode 0600."""

    def __init__(self, root: Path) -> None:
        self.path = root / KEY_FILE
        self.keys: dict[str, bytes] = {}
        self.cipher_of: dict[str, str] = {}  # plaintext sha256 -> ciphertext sha256
        self.reload()

    def reload(self) -> None:
        """Merge in the keys on disk (kept in the same dicts, so readers holding them see them)."""
        if not self.path.is_file():
            return
        try:
            saved = json.loads(self.path.read_text())
            keys = {sha: bytes.fromhex(v["key"]) for sha, v in saved.items()}
            plain = {str(v["plain_sha256"]): sha for sha, v in saved.items()}
        except (ValueError, AttributeError, KeyError, TypeError) as exc:
            raise StoreError(f"key file {self.path} is malformed: {exc!r}") from exc
        self.keys.update(keys)
        self.cipher_of.update(plain)

    def add(self, cipher_sha256: str, key: bytes, plain_sha256: str) -> None:
        """Record a new blob's key durably (before the blob, and any manifest naming it, is written)."""
        self.reload()  # keep what another process of the owner saved since we loaded (shas never collide)
        self.keys[cipher_sha256] = key
        self.cipher_of[plain_sha256] = cipher_sha256
        plain_of = {c: p for p, c in self.cipher_of.items()}
        doc = {sha: {"key": k.hex(), "plain_sha256": plain_of[sha]} for sha, k in sorted(self.keys.items())}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-keys-")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(doc, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
