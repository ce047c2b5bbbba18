"""A whole local mesh restarted on the same state, with new ports: the persisted plan's addresses are
stale, so the mesh reports not serving until a plan with the new addresses is committed."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.model_store import ModelStore
from splitmesh.launcher import LocalMesh, MeshSpec

pytestmark = pytest.mark.slow


def test_restart_on_persisted_state_with_new_ports(store: ModelStore, tmp_path: Path) -> None:
    spec = MeshSpec(nodes=2, store=store.root, workdir=tmp_path, orchestrator_port=0, trusted=("node-0",))
    with LocalMesh(spec) as first, first.client() as client:
        before = client.plan().epoch
        expected = [e.token_id for e in client.generate("The capital of France is", max_new_tokens=6)]
    with LocalMesh(spec) as second, second.client() as client:
        plan = client.plan()
        assert plan.epoch > before
        assert {n.address for n in plan.nodes} <= set(second.node_addresses.values())
        assert [e.token_id for e in client.generate("The capital of France is", max_new_tokens=6)] == expected
