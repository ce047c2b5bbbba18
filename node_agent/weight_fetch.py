"""Brings the store files a plan needs onto this node, streamed from the orchestrator and hash-checked."""

from __future__ import annotations

import logging
import time

import grpc

from common.model_store import Manifest, ModelStore, StoreError
from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from common.spans import Span
from common.store_roles import roles_for_span

log = logging.getLogger(__name__)


async def ensure_files(store: ModelStore, orchestrator: grpc.aio.Channel, model_digest: str, spans: list[Span]) -> int:
    """Fetch the manifest and every missing file for ``spans``; returns the bytes transferred.

    The caller passes a fresh channel to the orchestrator (mutual TLS in deployments); it is closed here.
    """
    async with orchestrator as channel:
        stub = pb_grpc.ModelFilesStub(channel)
        if model_digest in store.digests():
            manifest = store.open(model_digest).manifest
        else:
            reply = await stub.GetManifest(pb.ManifestRequest(model_digest=model_digest), timeout=30)
            manifest = store.put_manifest_bytes(reply.manifest, model_digest)
        roles = sorted({role for span in spans for role in roles_for_span(manifest, span)})
        missing = [r for r in roles if not store.has_blob(manifest.files[r])]
        if not missing:
            return 0
        total = sum(manifest.files[r].size for r in missing)
        started = time.monotonic()
        done = 0
        for role in missing:
            done += await _fetch(stub, store, manifest, role)
            elapsed = max(time.monotonic() - started, 1e-6)
            log.info("fetched %s: %.1f/%.1f MB (%.0f MB/s)", role, done / 1e6, total / 1e6, done / 1e6 / elapsed)
        return done


async def _fetch(stub: pb_grpc.ModelFilesStub, store: ModelStore, manifest: Manifest, role: str) -> int:
    entry = manifest.files[role]
    parts: list[bytes] = []
    received = 0
    async for chunk in stub.FetchBlob(pb.BlobRequest(sha256=entry.sha256), timeout=600):
        if chunk.offset != received or chunk.total_size != entry.size:
            raise StoreError(f"{role}: chunk at {chunk.offset} of {chunk.total_size}, expected {received}/{entry.size}")
        parts.append(chunk.data)
        received += len(chunk.data)
    store.put_verified_blob(entry, b"".join(parts), role)
    return received
