"""Ed25519 signatures over the exact serialised plan bytes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.proto import splitmesh_pb2 as pb


class PlanSignatureError(Exception):
    """A signed plan does not verify."""


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_bytes(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """The orchestrator's plan-signing key, created on first start and kept (mode 0600)."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise PlanSignatureError(f"{path} does not hold an Ed25519 key")
        return key
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    return key


def sign_plan(plan: pb.Plan, key: Ed25519PrivateKey) -> pb.SignedPlan:
    plan_bytes = plan.SerializeToString(deterministic=True)
    return pb.SignedPlan(plan_bytes=plan_bytes, signature=key.sign(plan_bytes), key_id=key_id(key.public_key()))


def verify_signature(signed: pb.SignedPlan, keys: dict[str, Ed25519PublicKey]) -> None:
    """Check the signature over the exact bytes, before anything parses them."""
    public = keys.get(signed.key_id)
    if public is None:
        raise PlanSignatureError(f"plan signed by unknown key {signed.key_id!r}")
    try:
        public.verify(signed.signature, signed.plan_bytes)
    except InvalidSignature:
        raise PlanSignatureError("plan signature does not verify") from None
