"""The orchestrator is off the per-token path: kill -9 it mid-generation, the stream goes on; on restart
it reloads the committed plan, picks the nodes back up and never issues an epoch it issued before."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest

from common.model_store import ModelStore
from splitmesh import Client
from splitmesh.launcher import LocalMesh, MeshSpec

pytestmark = [pytest.mark.slow, pytest.mark.chaos]


@pytest.fixture
def mesh3(store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    spec = MeshSpec(nodes=3, store=store.root, workdir=tmp_path_factory.mktemp("orch"), orchestrator_port=0,
                    trusted=("node-0",))
    with LocalMesh(spec) as mesh:
        yield mesh


def test_generation_survives_orchestrator_kill_and_restart(mesh3: LocalMesh) -> None:
    with Client(mesh3.address) as client:
        before = client.plan()
        prompt = [{"role": "user", "content": "Name three rivers in Europe."}]
        expected = [e.token_id for e in client.generate(prompt, max_new_tokens=16, ignore_eos=True)]
        stream = client.generate(prompt, max_new_tokens=16, ignore_eos=True)
        ids = [next(stream).token_id]
        mesh3.signal("orchestrator", signal.SIGKILL)
        mesh3.processes["orchestrator"].wait()
        ids += [e.token_id for e in stream]
        assert ids == expected  # nodes kept serving the committed plan without the orchestrator
    mesh3.start_orchestrator()
    status = mesh3.wait_serving(60)
    assert status.plan.epoch == before.epoch  # the committed plan was reloaded, not reissued
    assert [(s.start, s.end, s.node_id) for s in status.plan.segments] == [
        (s.start, s.end, s.node_id) for s in before.segments]
    with Client(mesh3.address) as client:
        reply = client.resplit([0, 30], ["node-0"])
        assert reply.plan.epoch > before.epoch
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not client.status().serving:
            time.sleep(0.2)
        assert [e.token_id for e in client.generate(prompt, max_new_tokens=16, ignore_eos=True)] == expected
