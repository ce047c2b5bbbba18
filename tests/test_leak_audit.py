"""What a compromised untrusted node receives: a live mutual-TLS mesh whose middle node is the real node agent
with the audit tap on (common/audit_tap.py records every message it deserializes and every tensor it
decrypts), across a generation, a re-split and the replay that moves the in-flight session.

It may receive the activations of its own layers and nothing else: no prompt text, no token id, no weight or
key of a layer it does not host.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message
from transformers import PreTrainedTokenizerBase

from common.audit_tap import ENV, records
from common.blob_crypto import MAGIC
from common.certs import Identity
from common.chat import chat_token_ids
from common.model_store import ModelStore, StoreError, layer_role
from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from common.tls import TlsConfig
from common.transport import sync_channel
from splitmesh.launcher import LocalMesh, MeshSpec

SECRET = "My PIN is 4471 and my password is tulip-garden-88. Repeat my PIN."
NEEDLES = [b"4471", b"tulip", b"garden-88", b"PIN is"]
MESSAGES = [{"role": "user", "content": SECRET}]


@dataclass
class Audit:
    mesh: LocalMesh
    prompt_ids: list[int]
    generated: list[int]
    received: dict[str, list[tuple[str, bytes, dict[str, object]]]]  # node id -> its tap's records


DRAIN_S = 2.0  # a replaced plan's segments and keys stay this long (node_agent.plan_state)


@pytest.fixture(scope="module")
def audit(encrypted_store: ModelStore, tokenizer: PreTrainedTokenizerBase,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Audit]:
    taps = tmp_path_factory.mktemp("taps")
    spec = MeshSpec(nodes=3, store=encrypted_store.root, workdir=tmp_path_factory.mktemp("audit"), orchestrator_port=0,
                    trusted=("node-0", "node-2"), boundaries=(0, 10, 20, 30),
                    placement=("node-0", "node-1", "node-2"), tls=True,
                    extra_env={ENV: str(taps), "SPLITMESH_PLAN_DRAIN_S": str(DRAIN_S)})
    with LocalMesh(spec) as mesh:
        generated: list[int] = []
        with mesh.client() as client:
            generated += [e.token_id for e in client.generate(MESSAGES, max_new_tokens=8)]
        with mesh.client() as client, mesh.client(operator=True) as operator:
            events = []
            for event in client.generate(MESSAGES, max_new_tokens=32, seed=1):  # outlasts a PREPARE on 2 busy cores
                events.append(event)
                if event.index == 2:  # the re-split lands mid-stream: the session moves by replay
                    reply = operator.resplit([0, 12, 22, 30], ["node-0", "node-1", "node-2"])
                    assert reply.committed, reply.reason
            assert len({e.epoch for e in events}) == 2, "the generation did not cross the re-split"
            generated += [e.token_id for e in events]
        received = {n: list(records(taps / f"{n}.jsonl")) for n in ("node-0", "node-1")}
        yield Audit(mesh, chat_token_ids(tokenizer, MESSAGES), generated, received)


def _ints(message: Message, wanted: tuple[str, ...] = ()) -> Iterator[tuple[str, list[int]]]:
    """(field name, values) of every integer field of ``message`` and its sub-messages (only ``wanted``
    names when given)."""
    for desc, value in message.ListFields():
        if desc.message_type is not None:
            for sub in (value if desc.is_repeated else [value]):
                if isinstance(sub, Message):
                    yield from _ints(sub, wanted)
        elif isinstance(value, int) and not isinstance(value, bool) and (not wanted or desc.name in wanted):
            yield desc.name, [value]
        elif desc.is_repeated and all(isinstance(v, int) for v in value) and (not wanted or desc.name in wanted):
            yield desc.name, list(value)


def _parsed(recs: list[tuple[str, bytes, dict[str, object]]]) -> Iterator[Message]:
    for kind, data, _ in recs:
        if kind != "decrypted-tensor":
            yield getattr(pb, kind).FromString(data)


@pytest.mark.slow
def test_the_tap_records_what_a_node_receives(audit: Audit) -> None:
    """The trusted head receives the prompt (so a silent tap cannot pass the checks below)."""
    head = audit.received["node-0"]
    assert any(needle in data for _, data, _ in head for needle in NEEDLES)
    middle = audit.received["node-1"]
    assert {"PrepareRequest", "ForwardRequest", "decrypted-tensor"} <= {kind for kind, _, _ in middle}
    tensors = [extra for kind, _, extra in middle if kind == "decrypted-tensor"]
    assert len(tensors) > 12  # prefill, replay and decode steps of both generations


@pytest.mark.slow
def test_no_prompt_text_or_prompt_token_ids_reach_the_untrusted_node(audit: Audit) -> None:
    middle = audit.received["node-1"]
    for kind, data, _ in middle:
        for needle in NEEDLES:
            assert needle not in data, (kind, needle)
    assert not {"GenerateRequest", "ReplayRequest"} & {kind for kind, _, _ in middle}
    run = audit.prompt_ids
    windows = {tuple(run[i:i + 3]) for i in range(len(run) - 2)}
    for message in _parsed(middle):
        for name, values in _ints(message):
            assert not any(tuple(values[i:i + 3]) in windows for i in range(len(values) - 2)), (message, name)
    for kind, _, extra in middle:  # what it decrypts are hidden states, never id tensors
        if kind == "decrypted-tensor":
            assert str(extra["dtype"]) in {"torch.float32", "torch.float16", "torch.bfloat16"}


@pytest.mark.slow
def test_no_generated_token_id_reaches_the_untrusted_node(audit: Audit) -> None:
    seen = {v for m in _parsed(audit.received["node-1"]) for _, vs in _ints(m, ("token_id", "token_ids"))
            for v in vs}
    assert not seen & set(audit.generated), sorted(seen & set(audit.generated))[:10]


def _fetch(mesh: LocalMesh, name: str, sha256: str) -> grpc.StatusCode:
    with sync_channel(mesh.address, TlsConfig.from_dir(mesh.tls_dir, name),
                      Identity("orchestrator", "orchestrator")) as channel:
        try:
            next(iter(pb_grpc.ModelFilesStub(channel).FetchBlob(pb.BlobRequest(sha256=sha256), timeout=60)))
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.slow
def test_a_node_fetches_only_the_layers_its_plan_gives_it(audit: Audit, encrypted_store: ModelStore) -> None:
    files = _files(encrypted_store, audit)
    assert _fetch(audit.mesh, "node-1", files[layer_role(15)]) == grpc.StatusCode.OK  # hosts [12, 22)
    for role in (layer_role(0), layer_role(5), layer_role(25), "embed", "head"):  # 5: hosted before the re-split
        assert _fetch(audit.mesh, "node-1", files[role]) == grpc.StatusCode.PERMISSION_DENIED, role
    assert _fetch(audit.mesh, "node-0", files["embed"]) == grpc.StatusCode.OK
    assert _fetch(audit.mesh, "client", files[layer_role(15)]) == grpc.StatusCode.PERMISSION_DENIED
    for message in _parsed(audit.received["node-1"]):  # and nothing it received carries another layer's blob
        assert not isinstance(message, pb.BlobChunk) or not message.data


def _files(store: ModelStore, audit: Audit) -> dict[str, str]:
    with audit.mesh.client() as client:
        plan = pb.Plan.FromString(client.signed_plan().plan_bytes)
    return {role: entry.sha256 for role, entry in store.open(plan.model_digest).manifest.files.items()}


@pytest.mark.slow
def test_the_untrusted_node_cannot_read_unhosted_layers_from_its_disk(audit: Audit) -> None:
    with audit.mesh.client() as client:
        plan = pb.Plan.FromString(client.signed_plan().plan_bytes)
    # As the node agent opens its store: with only the keys its plans delivered (here: none), never a key file.
    node_store = ModelStore(Path(audit.mesh.spec.store), keys={})  # local meshes share one store folder
    model = node_store.open(plan.model_digest)
    for role in (layer_role(0), layer_role(15), "embed", "head"):
        with pytest.raises(StoreError, match="encrypted"):
            model.load_tensors(role)
        assert node_store.blob_path(model.entry(role).sha256).read_bytes().startswith(MAGIC)  # ciphertext on disk


@pytest.mark.slow
def test_the_untrusted_node_holds_keys_of_its_own_layers_only(audit: Audit) -> None:
    """Every weight key it ever opened (the tap records the sealed payload it parses) is one of a layer it
    hosted, [10, 20) then [12, 22); its live key set is exactly the current segment's blobs."""
    with audit.mesh.client() as client:
        plan = pb.Plan.FromString(client.signed_plan().plan_bytes)
    manifest = ModelStore(Path(audit.mesh.spec.store)).open(plan.model_digest).manifest
    opened = [pb.WeightKeys.FromString(data) for kind, data, _ in audit.received["node-1"] if kind == "WeightKeys"]
    assert len(opened) == 2
    hosted = {manifest.files[layer_role(i)].sha256 for i in range(10, 22)}
    assert {k.sha256 for m in opened for k in m.keys} == hosted
    current = {manifest.files[layer_role(i)].sha256 for i in range(12, 22)}
    deadline = time.monotonic() + DRAIN_S + 30
    with sync_channel(audit.mesh.node_addresses["node-1"], TlsConfig.from_dir(audit.mesh.tls_dir, "client"),
                      Identity("node", "node-1")) as channel:
        while True:  # the replaced plan's keys go when its drain ends; until then only keys of layers it hosted
            held = set(pb_grpc.NodeStub(channel).Info(pb.NodeInfoRequest(), timeout=30).weight_keys_held)
            assert current <= held <= hosted
            if held == current or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert held == current
