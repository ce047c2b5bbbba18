"""`splitmesh model encrypt`: turn a plaintext store into an encrypted one, blob by blob.

Each weight blob is encrypted under a fresh key (saved before the ciphertext is written), then the model's
manifest is rewritten to name the ciphertexts and its refs re-pointed; only then are the plaintext weight
blobs and the old manifest deleted. An interrupted run leaves the old model whole, and running again
finishes the job; a store already encrypted is left as it is.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path

from common.model_store import TOKENIZER_PREFIX, FileEntry, Manifest, ModelStore, StoreError

log = logging.getLogger(__name__)


def is_weight_role(role: str) -> bool:
    """Layers, embed and head are weights (encrypted); tokenizer files are not."""
    return not role.startswith(TOKENIZER_PREFIX)


def encrypted_manifest(store: ModelStore, manifest: Manifest) -> Manifest:
    """``manifest`` with every plaintext weight blob replaced by an encrypted copy (written to the store)."""
    files = dict(manifest.files)
    for role, entry in sorted(files.items()):
        if is_weight_role(role) and not entry.encrypted:
            files[role] = store.put_encrypted_blob(store.read_blob(entry, role))
    return dataclasses.replace(manifest, files=files)


def encrypt_store(store: ModelStore) -> dict[str, str]:
    """Encrypt every model in ``store``; returns old digest -> new digest of the models it changed."""
    moved: dict[str, str] = {}
    for digest in store.digests():
        old = store.open(digest).manifest
        new = encrypted_manifest(store, old)
        if new == old:
            continue
        new_digest = store.put_manifest(new)
        for name in store.names():
            if store.resolve(name) == digest:
                store.point_ref(name, new_digest)
        moved[digest] = new_digest
        log.info("encrypted %s: %s -> %s", old.name, digest[:12], new_digest[:12])
    _drop_plaintext(store, moved)
    return moved


def _drop_plaintext(store: ModelStore, moved: dict[str, str]) -> None:
    """Delete the replaced manifests, then every plaintext weight blob no remaining manifest names."""
    plain = {e.sha256 for d in moved for r, e in store.open(d).manifest.files.items()
             if is_weight_role(r) and not e.encrypted}
    for digest in moved:
        store.remove_manifest(digest)
    kept = {e.sha256 for d in store.digests() for e in store.open(d).manifest.files.values()}
    for sha in sorted(plain - kept):
        store.blob_path(sha).unlink(missing_ok=True)


def _link_or_copy(source: ModelStore, copy: ModelStore, entry: FileEntry) -> None:
    """The blob in ``copy`` as a hard link where the file system allows (the store never writes a file in
    place: it replaces by rename, and the migration unlinks), else as a copy."""
    target = copy.blob_path(entry.sha256)
    if target.exists():
        return
    try:
        os.link(source.blob_path(entry.sha256), target)
    except OSError:
        shutil.copyfile(source.blob_path(entry.sha256), target)


def _owned_copy(root: Path) -> ModelStore:
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    return ModelStore(root)  # keys=None: opened as the owner, with its own key file


def encrypted_copy(source: ModelStore, name_or_digest: str, root: Path) -> ModelStore:
    """One model of ``source`` in a new store at ``root``, encrypted there (``source`` is only read; an
    encrypted source's keys are copied with its blobs). For tests and benchmarks on a shared store."""
    manifest = source.open(name_or_digest).manifest
    copy = _owned_copy(root)
    assert copy.key_file is not None
    for entry in manifest.files.values():
        if entry.encrypted:  # what `model import` writes: the copy needs the keys
            key = source.keys.get(entry.sha256)
            if key is None:
                raise StoreError(f"{name_or_digest}: the source store holds no key for blob {entry.sha256[:12]}")
            copy.key_file.add(entry.sha256, key, entry.plain_sha256)
        _link_or_copy(source, copy, entry)
    copy.put_manifest(manifest)
    encrypt_store(copy)
    return ModelStore(root)


def plaintext_copy(source: ModelStore, name_or_digest: str, root: Path) -> ModelStore:
    """One model of ``source`` in a new store at ``root`` with every weight blob decrypted (the layout of a
    store from before encryption at rest): the baseline `bench/reconfig.py --encrypted` compares against."""
    model = source.open(name_or_digest)
    copy = _owned_copy(root)
    files = {}
    for role, entry in model.manifest.files.items():
        if entry.encrypted:
            files[role] = copy.put_blob(source.plain_bytes(entry, role).numpy().tobytes())
            if files[role].sha256 != entry.plain_sha256:
                raise StoreError(f"{role} decrypts to the wrong plaintext (sha256 mismatch)")
        else:
            _link_or_copy(source, copy, entry)
            files[role] = entry
    copy.put_manifest(dataclasses.replace(model.manifest, files=files))
    return ModelStore(root)
