"""The data link to a middle node is cut (a TCP proxy in front of it resets every connection and refuses
new ones) while the node itself keeps running and reporting: the head's link probe reports the link down,
the orchestrator re-plans around it, and the generation finishes with the tokens of a fault-free run."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from bench.faults import links_down, put_proxies, wait_links_up
from bench.tcp_proxy import TcpProxy
from common.model_store import ModelStore
from splitmesh.launcher import LocalMesh, MeshSpec

pytestmark = [pytest.mark.slow, pytest.mark.chaos]


@pytest.fixture
def proxied(store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalMesh, TcpProxy]]:
    spec = MeshSpec(nodes=3, store=store.root, workdir=tmp_path_factory.mktemp("linkcut"), orchestrator_port=0,
                    trusted=("node-0",), boundaries=(0, 10, 20, 30), placement=("node-0", "node-1", "node-0"),
                    threads=1)
    mesh = LocalMesh(spec)
    proxy = put_proxies(mesh, ["node-1"])["node-1"]
    try:
        with mesh:
            yield mesh, proxy
    finally:
        proxy.close()


def test_cut_link_is_routed_around(proxied: tuple[LocalMesh, TcpProxy]) -> None:
    mesh, proxy = proxied
    prompt = [{"role": "user", "content": "Name three colours."}]
    with mesh.client() as client:
        expected = [e.token_id for e in client.generate(prompt, max_new_tokens=12, ignore_eos=True)]
        events = []
        for event in client.generate(prompt, max_new_tokens=12, ignore_eos=True):
            events.append(event)
            if event.index == 3:
                proxy.cut()
        assert [e.token_id for e in events] == expected
        assert events[-1].epoch > events[0].epoch  # moved to a plan without the hop
        status = client.status()
        assert "node-0->node-1" in links_down(status)
        assert all(n.alive for n in status.nodes)  # the node itself was never lost
        chain = [s.node_id for s in status.plan.segments]
        assert ("node-0", "node-1") not in set(itertools.pairwise(chain))
        assert "link-lost" in [d.kind for d in client.history()]
    proxy.restore()
    wait_links_up(mesh)
