"""A node paused with SIGSTOP mid-generation is routed around; when it resumes, its late work is dropped
and never mixed into the live session, which finishes with the tokens of a fault-free run."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import grpc
import pytest

from common.model_store import ModelStore
from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from common.transport import sync_channel
from splitmesh import Client
from splitmesh.launcher import LocalMesh, MeshSpec

pytestmark = [pytest.mark.slow, pytest.mark.chaos]


@pytest.fixture
def mesh3(store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    spec = MeshSpec(nodes=3, store=store.root, workdir=tmp_path_factory.mktemp("stall"), orchestrator_port=0,
                    trusted=("node-0",), boundaries=(0, 10, 20, 30), placement=("node-0", "node-1", "node-0"))
    with LocalMesh(spec) as mesh:
        yield mesh


def test_stalled_node_is_routed_around(mesh3: LocalMesh) -> None:
    prompt = [{"role": "user", "content": "List five animals that live in the ocean."}]
    with Client(mesh3.address) as client:
        expected = [e.token_id for e in client.generate(prompt, max_new_tokens=24, ignore_eos=True)]
        events = []
        try:
            for event in client.generate(prompt, max_new_tokens=24, ignore_eos=True):
                events.append(event)
                if event.index == 4:
                    mesh3.signal("node-1", signal.SIGSTOP)
        finally:
            mesh3.signal("node-1", signal.SIGCONT)
        assert [e.token_id for e in events] == expected
        assert events[-1].epoch > events[0].epoch
        epochs = [e.epoch for e in events]
        assert epochs == sorted(epochs)  # once on the new plan, no token of the old one (the resumed node's)
        assert all(s.node_id != "node-1" for s in client.plan().segments)
    deadline = time.monotonic() + 30
    with sync_channel(mesh3.node_addresses["node-1"], mesh3.client_tls) as channel:
        stub = pb_grpc.NodeStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.Info(pb.NodeInfoRequest(), timeout=5).active_sessions == 0:
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.3)
        assert stub.Info(pb.NodeInfoRequest(), timeout=5).active_sessions == 0  # its stale stream was dropped
