"""Serves the orchestrator's store files to nodes that lack the layers a plan gives them.

A node (the only certificate kind allowed here, common/authz.py) gets only the files of the segments a
committed or prepared plan assigns it; any other blob is PERMISSION_DENIED, so a node cannot collect the
model layer by layer. On a plaintext dev server there is no identity to scope by.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import grpc

from common.certs import CertificateIdentityError
from common.model_store import FileEntry, ModelStore, StoreError
from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from common.tls import peer_identity

CHUNK_BYTES = 1 << 20


class ModelFilesServicer(pb_grpc.ModelFilesServicer):
    def __init__(self, store: ModelStore, assigned: Callable[[str], frozenset[str]]) -> None:
        self.store = store
        self.assigned = assigned  # node id -> hashes of the files its plan segments need

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
        try:
            identity = peer_identity(context)
        except CertificateIdentityError as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
            return
        if identity is not None and request.sha256 not in self.assigned(identity.node_id):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"store file {request.sha256[:12]} is not part of a segment a plan gives "
                                f"{identity.node_id!r}")
            return
        if not path.is_file():
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no store file {request.sha256[:12]}")
            return
        size = path.stat().st_size
        data = self.store.read_blob(FileEntry(request.sha256, size), request.sha256[:12])  # verified before sending
        for offset in range(0, max(size, 1), CHUNK_BYTES):
            yield pb.BlobChunk(data=data[offset:offset + CHUNK_BYTES], offset=offset, total_size=size)
