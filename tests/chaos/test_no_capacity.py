"""No feasible plan: the only trusted node is killed. A generation fails at once with UNAVAILABLE and the
reason, instead of waiting out a recovery timeout; when the node comes back, service resumes by itself
with the tokens of a fault-free run."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest

from common.model_store import ModelStore
from splitmesh import Client
from splitmesh.client import SplitmeshError
from splitmesh.launcher import LocalMesh, MeshSpec

pytestmark = [pytest.mark.slow, pytest.mark.chaos]
PROMPT = "The capital of France is"


@pytest.fixture
def one_trusted(store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    spec = MeshSpec(nodes=3, store=store.root, workdir=tmp_path_factory.mktemp("nocap"), orchestrator_port=0,
                    trusted=("node-0",), boundaries=(0, 10, 20, 30), placement=("node-0", "node-1", "node-0"),
                    threads=1)
    with LocalMesh(spec) as mesh:
        yield mesh


def _generate(client: Client) -> list[int]:
    return [e.token_id for e in client.generate(PROMPT, max_new_tokens=6, ignore_eos=True)]


def test_no_trusted_node_fails_fast_then_resumes(one_trusted: LocalMesh) -> None:
    mesh = one_trusted
    with mesh.client() as client:
        expected = _generate(client)
        mesh.signal("node-0", signal.SIGKILL)
        mesh.processes["node-0"].wait(timeout=30)
        # The orchestrator learns of the loss when the report stream breaks, then finds no plan within a tick.
        deadline = time.monotonic() + 5
        while True:
            started = time.monotonic()
            with pytest.raises(SplitmeshError) as failure:
                _generate(client)
            took = time.monotonic() - started
            assert failure.value.code == "UNAVAILABLE" and took < 2.0, (failure.value, took)
            if "no feasible plan" in failure.value.message or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert failure.value.message == "no feasible plan: no live trusted node for the first segment"
        assert not client.status().serving
        mesh.start_node("node-0")
        deadline = time.monotonic() + 90
        while True:
            try:
                tokens = _generate(client)
                break
            except SplitmeshError as exc:
                assert exc.code == "UNAVAILABLE" and time.monotonic() < deadline, exc
                time.sleep(0.5)
        assert tokens == expected
        assert client.status().serving
