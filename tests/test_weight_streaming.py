"""Nodes with empty stores receive exactly the files of their segments from the orchestrator."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.model_store import ModelStore
from common.spans import Span
from common.store_roles import roles_for_span
from splitmesh import Client
from splitmesh.launcher import LocalMesh, MeshSpec

pytestmark = pytest.mark.slow


def test_weights_stream_to_nodes_with_empty_stores(store: ModelStore, tmp_path: Path) -> None:
    spec = MeshSpec(nodes=2, store=store.root, workdir=tmp_path, orchestrator_port=0, trusted=("node-0", "node-1"),
                    boundaries=(0, 12, 30), placement=("node-0", "node-1"), node_stores_empty=True)
    with LocalMesh(spec) as mesh, Client(mesh.address) as client:
        text = "".join(e.text for e in client.generate([{"role": "user", "content": "What is the capital of France?"}],
                                                       max_new_tokens=12))
        assert "Paris" in text
        manifest = store.open("smollm2-135m-instruct").manifest
        node1 = ModelStore(tmp_path / "node-stores" / "node-1")
        held = {p.name for p in (node1.root / "blobs").iterdir()}
        assert held == {manifest.files[r].sha256 for r in roles_for_span(manifest, Span(12, 30))}
        node0 = ModelStore(tmp_path / "node-stores" / "node-0")
        assert len(list((node0.root / "blobs").iterdir())) == len(
            {manifest.files[r].sha256 for r in roles_for_span(manifest, Span(0, 12))})
        assert "layer.0012" not in str(roles_for_span(manifest, Span(0, 12)))
