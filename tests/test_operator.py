"""Operator controls against a live mesh: automatic resplit, drain, policy, history."""

from __future__ import annotations

import asyncio

import pytest

from splitmesh import AsyncClient, Client, SplitmeshError
from splitmesh.launcher import LocalMesh

pytestmark = pytest.mark.slow


def test_policy_get_set_and_validation(mesh: LocalMesh) -> None:
    with Client(mesh.address) as client:
        values = client.policy()
        assert values["latency_max_ms"] == "150.0" and values["cooldown_s"] == "30.0"
        updated = client.policy({"latency_max_ms": "120", "hysteresis": "0.1"})
        assert updated["latency_max_ms"] == "120.0" and updated["hysteresis"] == "0.1"
        with pytest.raises(SplitmeshError) as caught:
            client.policy({"no_such_knob": "1"})
        assert caught.value.code == "INVALID_ARGUMENT" and "unknown policy keys" in caught.value.message
        with pytest.raises(SplitmeshError) as caught:
            client.policy({"ewma_alpha": "7"})
        assert caught.value.code == "INVALID_ARGUMENT"
        assert client.policy()["latency_max_ms"] == "120.0"  # a rejected update changed nothing
        client.policy({"latency_max_ms": "150", "hysteresis": "0.05"})


def test_automatic_resplit_dry_run_and_drain(mesh: LocalMesh) -> None:
    with Client(mesh.address) as client:
        client.resplit([0, 6, 12, 18, 24, 30], ["node-0", "node-1", "node-2", "node-3", "node-4"])
        dry = client.resplit(dry_run=True)
        assert not dry.committed and dry.plan.segments and dry.reason.startswith("dry run")
        assert dry.predicted_ms_old > 0 and dry.predicted_ms_new > 0
        epoch = client.plan().epoch
        assert client.plan().epoch == epoch  # a dry run installs nothing
        reply = client.drain("node-2")
        assert reply.committed and all(s.node_id != "node-2" for s in reply.plan.segments)
        text = "".join(e.text for e in client.generate("The capital of Italy is", max_new_tokens=6))
        assert "Rome" in text
        with pytest.raises(SplitmeshError) as caught:
            client.drain("node-99")
        assert caught.value.code == "NOT_FOUND"
        client.drain("node-2", undo=True)
        kinds = [d.reason for d in client.history(20)]
        assert any("drain node-2" in r for r in kinds) and any("resplit requested" in r for r in kinds)


def test_the_async_client_operates_the_mesh_too(mesh: LocalMesh) -> None:
    mesh.wait_serving()  # the test before ends with a commit; nodes report its epoch a moment later
    async def run() -> None:
        async with AsyncClient(mesh.address) as client:
            status = await client.status()
            assert status.serving and len(status.nodes) == 5
            assert (await client.plan()).epoch == status.plan.epoch
            dry = await client.resplit(dry_run=True)
            assert not dry.committed and dry.reason.startswith("dry run")
            assert "latency_max_ms" in await client.policy()
            await client.drain("node-2")
            assert [n.drained for n in (await client.status()).nodes if n.node_id == "node-2"] == [True]
            with pytest.raises(SplitmeshError) as caught:
                await client.resplit([0, 15, 30], ["node-0", "node-2"])
            assert caught.value.code == "FAILED_PRECONDITION" and "node-2 is drained" in caught.value.message
            await client.drain("node-2", undo=True)
            assert all(d.kind == "operator" for d in await client.history(10, kinds=["operator"]))
            question = [{"role": "user", "content": "What is the capital of France?"}]
            assert "Paris" in await client.generate_text(question, max_new_tokens=8)
            with pytest.raises(SplitmeshError) as caught:
                await client.history(-1)
            assert caught.value.code == "INVALID_ARGUMENT"
            with pytest.raises(SplitmeshError) as caught:
                await client.drain("node-99")
            assert caught.value.code == "NOT_FOUND"

    asyncio.run(run())
