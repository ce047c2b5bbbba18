"""The keys of the encrypted blobs a plan gives one node, sealed to that node's X25519 key from the plan.

HPKE (the suite of common.frame_crypto) with ``info`` = label || cluster || epoch || model || node id, so an
envelope opens only for that node under that plan; the sealed payload is a ``WeightKeys`` message.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from google.protobuf.message import DecodeError

from common.blob_crypto import KEY_BYTES
from common.frame_crypto import HPKE_SUITE, public_key_from_bytes
from common.model_store import Manifest
from common.proto import splitmesh_pb2 as pb
from common.spans import Span
from common.store_roles import roles_for_span

INFO_LABEL = b"splitmesh/weight-keys/1"
MAX_ENVELOPE_BYTES = 1 << 20


class WeightKeysError(ValueError):
    """An envelope that does not open for this node and plan, or holds malformed keys."""


def _info(cluster_id: str, epoch: int, model_digest: str, node_id: str) -> bytes:
    return b"\x00".join([INFO_LABEL, cluster_id.encode(), str(epoch).encode(), model_digest.encode(),
                         node_id.encode()])


def hosted_blob_keys(manifest: Manifest, spans: Iterable[Span], keys: Mapping[str, bytes]) -> dict[str, bytes]:
    """Ciphertext sha256 -> key of every encrypted blob ``spans`` need (KeyError: the owner lacks one)."""
    entries = {manifest.files[r] for span in spans for r in roles_for_span(manifest, span)}
    return {e.sha256: keys[e.sha256] for e in entries if e.encrypted}


def seal(keys: Mapping[str, bytes], x25519_public_key: bytes, *, cluster_id: str, epoch: int, model_digest: str,
         node_id: str) -> bytes:
    """The envelope for ``node_id`` (b"" when there is nothing to send: a plaintext model)."""
    if not keys:
        return b""
    payload = pb.WeightKeys(keys=[pb.WeightKey(sha256=s, key=k) for s, k in sorted(keys.items())])
    return HPKE_SUITE.encrypt(payload.SerializeToString(), public_key_from_bytes(x25519_public_key),
                              info=_info(cluster_id, epoch, model_digest, node_id))


def open_sealed(envelope: bytes, private_key: X25519PrivateKey, *, cluster_id: str, epoch: int, model_digest: str,
                node_id: str) -> dict[str, bytes]:
    """The keys in ``envelope`` (empty for b""); WeightKeysError when it is not for this node and plan."""
    if not envelope:
        return {}
    if len(envelope) > MAX_ENVELOPE_BYTES:
        raise WeightKeysError(f"weight key envelope of {len(envelope)} bytes exceeds {MAX_ENVELOPE_BYTES}")
    try:
        raw = HPKE_SUITE.decrypt(envelope, private_key, info=_info(cluster_id, epoch, model_digest, node_id))
    except (InvalidTag, ValueError):
        raise WeightKeysError(f"weight keys do not open for {node_id!r} under epoch {epoch}") from None
    try:
        message = pb.WeightKeys.FromString(raw)
    except DecodeError as exc:
        raise WeightKeysError(f"sealed weight keys do not parse: {exc}") from None
    bad = [k.sha256 for k in message.keys if len(k.key) != KEY_BYTES]
    if bad:
        raise WeightKeysError(f"weight key for {bad[0][:12]} is not {KEY_BYTES} bytes")
    return {k.sha256: k.key for k in message.keys}
