"""A live mesh serving bfloat16 and int8 weights: greedy ids equal ``generate`` on the same weights in the
same dtype for every split (1, 2, 3 and 5 segments, uneven), and a node refuses an activation in another dtype.

Kept small for a shared box: three node agents, one torch thread each, two prompts of 12 tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import torch
from transformers import PreTrainedTokenizerBase

from common.chat import chat_token_ids
from common.model_import import EMBEDDED_MODEL_NAME, default_name
from common.model_store import ModelStore
from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from common.reference_model import load_reference_model
from common.tensor_codec import encode_tensor
from common.transport import sync_channel
from splitmesh import Client
from splitmesh.launcher import LocalMesh, MeshSpec
from tests.conftest import reference_greedy

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]
MAX_NEW = 12
SPLITS = {
    "one segment": ([0, 30], ["node-0"]),
    "two segments": ([0, 15, 30], ["node-0", "node-2"]),
    "three segments": ([0, 10, 20, 30], ["node-0", "node-1", "node-2"]),
    "five segments": ([0, 6, 12, 18, 24, 30], ["node-0", "node-1", "node-2", "node-1", "node-2"]),
    "uneven, ring closes at head": ([0, 2, 27, 30], ["node-0", "node-1", "node-0"]),
}


@pytest.fixture(scope="module", params=["bfloat16", "int8"])
def dtype_mesh(request: pytest.FixtureRequest, dtype_store: ModelStore, tokenizer: PreTrainedTokenizerBase,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, LocalMesh, dict[str, list[int]]]]:
    dtype = str(request.param)
    name = default_name(EMBEDDED_MODEL_NAME, dtype)
    reference = load_reference_model(dtype_store.open(name))
    expected = {p: reference_greedy(reference, chat_token_ids(tokenizer, [{"role": "user", "content": p}]), MAX_NEW)
                for p in PROMPTS}
    del reference
    # int8 runs with plaintext hops so the test below can speak to a middle node directly
    spec = MeshSpec(nodes=3, store=dtype_store.root, workdir=tmp_path_factory.mktemp(f"mesh-{dtype}"), model=name,
                    orchestrator_port=0, trusted=("node-0", "node-2"), threads=1,
                    encrypt_activations=dtype == "bfloat16")
    with LocalMesh(spec) as mesh:
        yield dtype, mesh, expected


@pytest.mark.slow
@pytest.mark.parametrize("split", list(SPLITS))
def test_mesh_tokens_equal_generate_in_dtype(dtype_mesh: tuple[str, LocalMesh, dict[str, list[int]]],
                                             split: str) -> None:
    dtype, mesh, expected = dtype_mesh
    boundaries, placement = SPLITS[split]
    with Client(mesh.address) as client:
        reply = client.resplit(boundaries, placement)
        assert reply.committed
        mesh.wait_serving(60, epoch_above=reply.plan.epoch - 1)
        for prompt in PROMPTS:
            events = list(client.generate([{"role": "user", "content": prompt}], max_new_tokens=MAX_NEW))
            assert [e.token_id for e in events] == expected[prompt], f"{dtype}, {split}: {prompt!r}"


@pytest.mark.slow
def test_activation_in_another_dtype_is_refused(dtype_mesh: tuple[str, LocalMesh, dict[str, list[int]]]) -> None:
    dtype, mesh, _ = dtype_mesh
    if dtype != "int8":
        pytest.skip("the plaintext mesh speaks to its middle node directly")
    with Client(mesh.address) as client:
        reply = client.resplit([0, 10, 20, 30], ["node-0", "node-1", "node-2"])
        mesh.wait_serving(60, epoch_above=reply.plan.epoch - 1)
    opening = pb.ForwardOpen(session_id="dtype-probe", epoch=reply.plan.epoch, segment_index=1)
    chunk = encode_tensor(torch.zeros(1, 1, 576, dtype=torch.float32))[0]
    messages = [pb.ForwardRequest(open=opening),
                pb.ForwardRequest(frame=pb.ActivationFrame(step=0, seq=0, position=0, tensor=chunk))]
    with sync_channel(mesh.node_addresses["node-1"], mesh.client_tls) as channel, \
            pytest.raises(grpc.RpcError) as caught:
        list(pb_grpc.NodeStub(channel).Forward(iter(messages), timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "activation in float32, but segment 1 computes in bfloat16" in (caught.value.details() or "")
