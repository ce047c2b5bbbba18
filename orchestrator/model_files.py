"""Serves the orchestrator's store files to nodes that lack the layers a plan gives them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from common.model_store import FileEntry, ModelStore, StoreError
from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc

CHUNK_BYTES = 1 << 20


class ModelFilesServicer(pb_grpc.ModelFilesServicer):
    def __init__(self, store: ModelStore) -> None:
        self.store = store

    async def GetManifest(self, request: pb.ManifestRequest,  # noqa: N802 - gRPC method name
                          context: grpc.aio.ServicerContext[pb.ManifestRequest, pb.ManifestReply]) -> pb.ManifestReply:
        if request.model_digest not in self.store.digests():
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.model_digest[:12]} is not in this store")
        return pb.ManifestReply(manifest=self.store.manifest_bytes(request.model_digest))

    async def FetchBlob(self, request: pb.BlobRequest,  # noqa: N802
                        context: grpc.aio.ServicerContext[pb.BlobRequest, pb.BlobChunk]) -> AsyncIterator[pb.BlobChunk]:
        try:
            path = self.store.blob_path(request.sha256)
        except StoreError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return
        if not path.is_file():
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no store file {request.sha256[:12]}")
            return
        size = path.stat().st_size
        data = self.store.read_blob(FileEntry(request.sha256, size), request.sha256[:12])  # verified before sending
        for offset in range(0, max(size, 1), CHUNK_BYTES):
            yield pb.BlobChunk(data=data[offset:offset + CHUNK_BYTES], offset=offset, total_size=size)
