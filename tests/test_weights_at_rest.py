"""Weights encrypted at rest: the blob format, `splitmesh model encrypt`, and a live mutual-TLS mesh of nodes
with their own stores on an encrypted store: exact tokens, FetchBlob and WeightKeys scoped to a node's
segments, no plaintext of any layer on a node's disk, keys held only for hosted layers and re-delivered
after a restart."""

from __future__ import annotations

import hashlib
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from common import blob_crypto
from common.blob_crypto import MAGIC, decrypt_blob, encrypt_blob
from common.certs import Identity
from common.frame_crypto import load_node_key
from common.model_import import import_random
from common.model_store import ModelStore, StoreError, layer_role
from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from common.spans import Span
from common.store_encryption import encrypt_store, encrypted_copy, plaintext_copy
from common.store_roles import roles_for_span
from common.tls import TlsConfig
from common.transport import sync_channel
from common.weight_keys import open_sealed
from splitmesh.launcher import LocalMesh, MeshSpec
from tests.conftest import reference_greedy

PROMPT_IDS = [504, 3458, 282, 4649, 314]  # "The capital of France is"


def test_blob_round_trip_and_tamper(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blob_crypto, "CHUNK_BYTES", 64)  # several chunks, the last one short
    data = bytes(range(256)) * 3 + b"tail"
    sha = hashlib.sha256(data).hexdigest()
    key = bytes(32)
    sealed = encrypt_blob(key, data, sha)
    assert sealed.startswith(MAGIC) and data[:64] not in sealed
    assert bytes(decrypt_blob(key, sealed, sha, "x")) == data
    for bad in (sealed[:-1], sealed[:-80], sealed[:20] + bytes([sealed[20] ^ 1]) + sealed[21:]):
        with pytest.raises(StoreError, match=r"corrupted|cannot be"):
            decrypt_blob(key, bad, sha, "x")
    with pytest.raises(StoreError, match="corrupted"):
        decrypt_blob(b"\x01" * 32, sealed, sha, "x")
    with pytest.raises(StoreError, match="corrupted"):  # bound to its manifest entry's plaintext hash
        decrypt_blob(key, sealed, "00" * 32, "x")
    empty = hashlib.sha256(b"").hexdigest()
    assert bytes(decrypt_blob(key, encrypt_blob(key, b"", empty), empty, "x")) == b""


def _plaintext_import(store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> str:
    """A store as imports wrote it before encryption at rest."""
    with monkeypatch.context() as patch:
        patch.setattr(ModelStore, "put_encrypted_blob", ModelStore.put_blob)
        return import_random(store, "tiny-llama", "tiny", seed=5)


def test_import_writes_an_encrypted_store(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    digest = import_random(store, "tiny-llama", "tiny", seed=5)
    manifest = store.open(digest).manifest
    assert all(e.encrypted == (not r.startswith("tokenizer/")) for r, e in manifest.files.items())
    assert stat.S_IMODE((tmp_path / blob_crypto.KEY_FILE).stat().st_mode) == 0o600
    with pytest.raises(StoreError, match="encrypted and this process holds no key"):
        ModelStore(tmp_path, keys={}).open(digest).load_tensors(layer_role(0))


@pytest.mark.parametrize("source_encrypted", [False, True])
def test_encrypted_copy_reads_like_its_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              source_encrypted: bool) -> None:
    """The copy tests and benchmarks use: from a plaintext store (an old machine's) or an encrypted one (what
    `model import` writes now, so every fresh machine's), it decrypts to the source's tensors with its own keys."""
    source = ModelStore(tmp_path / "source")
    digest = (import_random(source, "tiny-llama", "tiny", seed=5) if source_encrypted
              else _plaintext_import(source, monkeypatch))
    copy = encrypted_copy(source, digest, tmp_path / "copy")
    copied = copy.open("tiny").manifest
    assert copied.encrypted and all(e.encrypted for r, e in copied.files.items() if not r.startswith("tokenizer/"))
    for role in source.open(digest).manifest.files:
        if role.startswith("tokenizer/"):
            continue
        theirs, ours = source.open(digest).load_tensors(role), copy.open("tiny").load_tensors(role)
        assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    plain = plaintext_copy(copy, "tiny", tmp_path / "plain")  # and back: the layout before encryption at rest
    assert not plain.open("tiny").manifest.encrypted and not plain.open("tiny").missing_or_corrupt()
    for role in copy.open("tiny").manifest.files:
        theirs, ours = copy.open("tiny").load_tensors(role), plain.open("tiny").load_tensors(role)
        assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)


def test_encrypt_migrates_a_plaintext_store_idempotently(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ModelStore(tmp_path)
    old = _plaintext_import(store, monkeypatch)
    before = {r: store.open(old).load_tensors(r) for r in store.open(old).manifest.files}
    plain_blobs = {e.sha256 for e in store.open(old).manifest.files.values()}
    calls = {"n": 0}
    real = ModelStore.put_encrypted_blob

    def crash_on_third(self: ModelStore, data: bytes) -> object:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(self, data)

    with monkeypatch.context() as patch, pytest.raises(OSError):  # an interrupted run leaves the old model whole
        patch.setattr(ModelStore, "put_encrypted_blob", crash_on_third)
        encrypt_store(store)
    assert store.resolve("tiny") == old and not store.open(old).missing_or_corrupt()
    moved = encrypt_store(ModelStore(tmp_path))
    new = moved[old]
    assert store.resolve("tiny") == new and store.digests() == [new]
    reopened = ModelStore(tmp_path)
    for role, tensors in before.items():
        after = reopened.open(new).load_tensors(role)
        assert all(torch.equal(tensors[k], after[k]) for k in tensors)
    on_disk = {p.name for p in (tmp_path / "blobs").iterdir()}
    assert not on_disk & plain_blobs  # no plaintext weight blob is left
    plain_hashes = {e.plain_sha256 for e in reopened.open(new).manifest.files.values()}
    assert not {hashlib.sha256((tmp_path / "blobs" / n).read_bytes()).hexdigest() for n in on_disk} & plain_hashes
    assert encrypt_store(ModelStore(tmp_path)) == {}  # idempotent
    assert b"key" not in b"".join((tmp_path / "blobs" / n).read_bytes()[:8] for n in on_disk)


@pytest.fixture(scope="module")
def mesh(encrypted_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    spec = MeshSpec(nodes=3, store=encrypted_store.root, workdir=tmp_path_factory.mktemp("at-rest"),
                    orchestrator_port=0, trusted=("node-0", "node-2"), boundaries=(0, 10, 20, 30),
                    placement=("node-0", "node-1", "node-2"), tls=True, node_stores_empty=True,
                    extra_env={"SPLITMESH_PLAN_DRAIN_S": "0"})  # keys checked right after each re-split
    with LocalMesh(spec) as live:
        yield live


def _info(mesh: LocalMesh, node_id: str) -> pb.NodeInfoReply:
    with sync_channel(mesh.node_addresses[node_id], TlsConfig.from_dir(mesh.tls_dir, "client"),
                      Identity("node", node_id)) as channel:
        reply: pb.NodeInfoReply = pb_grpc.NodeStub(channel).Info(pb.NodeInfoRequest(), timeout=30)
        return reply


def _wait_for_epoch(mesh: LocalMesh, node_id: str, epoch: int, timeout_s: float = 120.0) -> pb.NodeInfoReply:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            info = _info(mesh, node_id)
            if info.plan_epoch >= epoch:
                return info
        except grpc.RpcError:
            pass  # still starting
        assert time.monotonic() < deadline, f"{node_id} not back on epoch {epoch}"
        time.sleep(0.3)


def _hashes(store: ModelStore, span: Span) -> set[str]:
    manifest = store.open("smollm2-135m-instruct").manifest
    return {manifest.files[r].sha256 for r in roles_for_span(manifest, span) if manifest.files[r].encrypted}


def _orchestrator_call(mesh: LocalMesh, name: str, call: str, request: object) -> tuple[grpc.StatusCode, object]:
    with sync_channel(mesh.address, TlsConfig.from_dir(mesh.tls_dir, name),
                      Identity("orchestrator", "orchestrator")) as channel:
        stub = pb_grpc.OrchestratorStub(channel) if call == "WeightKeys" else pb_grpc.ModelFilesStub(channel)
        try:
            reply = getattr(stub, call)(request, timeout=60)
            return grpc.StatusCode.OK, (next(iter(reply)) if call == "FetchBlob" else reply)
        except grpc.RpcError as exc:
            return exc.code(), None


@pytest.mark.slow
def test_greedy_tokens_on_an_encrypted_store_equal_generate(mesh: LocalMesh, reference: torch.nn.Module) -> None:
    with mesh.client() as client:
        got = [e.token_id for e in client.generate(PROMPT_IDS, max_new_tokens=8, ignore_eos=True)]
    assert got == reference_greedy(reference, PROMPT_IDS, 8)  # type: ignore[arg-type]


@pytest.mark.slow
def test_node_disks_hold_only_ciphertext_of_hosted_layers(mesh: LocalMesh, encrypted_store: ModelStore) -> None:
    manifest = encrypted_store.open("smollm2-135m-instruct").manifest
    plain = {e.plain_sha256 for e in manifest.files.values() if e.encrypted}
    for node_id, span in (("node-0", Span(0, 10)), ("node-1", Span(10, 20)), ("node-2", Span(20, 30))):
        blobs = mesh.workdir / "node-stores" / node_id / "blobs"
        held = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in blobs.iterdir()}
        weights = {n for n in held if n in {e.sha256 for e in manifest.files.values() if e.encrypted}}
        assert weights == _hashes(encrypted_store, span), node_id
        assert not set(held.values()) & plain, f"{node_id} holds a plaintext weight blob"
    with pytest.raises(StoreError, match="encrypted"):
        ModelStore(mesh.workdir / "node-stores" / "node-1", keys={}).open(manifest.digest).load_tensors(layer_role(15))


@pytest.mark.slow
def test_fetch_blob_and_weight_keys_serve_only_a_nodes_own_layers(mesh: LocalMesh, encrypted_store: ModelStore) -> None:
    manifest = encrypted_store.open("smollm2-135m-instruct").manifest
    epoch = _info(mesh, "node-1").plan_epoch
    for name, role, want in (("node-1", layer_role(12), grpc.StatusCode.OK),
                             ("node-1", layer_role(3), grpc.StatusCode.PERMISSION_DENIED),
                             ("node-1", "embed", grpc.StatusCode.PERMISSION_DENIED),
                             ("client", layer_role(12), grpc.StatusCode.PERMISSION_DENIED),
                             ("operator", layer_role(12), grpc.StatusCode.PERMISSION_DENIED)):
        code, _ = _orchestrator_call(mesh, name, "FetchBlob", pb.BlobRequest(sha256=manifest.files[role].sha256))
        assert code == want, (name, role)
    for name, request, want in (
            ("node-1", pb.WeightKeysRequest(epoch=epoch, node_id="node-0"), grpc.StatusCode.PERMISSION_DENIED),
            ("node-1", pb.WeightKeysRequest(epoch=epoch + 7, node_id="node-1"), grpc.StatusCode.FAILED_PRECONDITION),
            ("client", pb.WeightKeysRequest(epoch=epoch, node_id="node-1"), grpc.StatusCode.PERMISSION_DENIED)):
        assert _orchestrator_call(mesh, name, "WeightKeys", request)[0] == want, (name, request)
    code, reply = _orchestrator_call(mesh, "node-1", "WeightKeys", pb.WeightKeysRequest(epoch=epoch, node_id="node-1"))
    assert code == grpc.StatusCode.OK and isinstance(reply, pb.WeightKeysReply)
    with mesh.client() as client:
        plan = pb.Plan.FromString(client.signed_plan().plan_bytes)
    private = load_node_key(mesh.workdir / "nodes" / "node-1" / "x25519_key.pem")
    keys = open_sealed(reply.weight_keys, private, cluster_id=plan.cluster_id, epoch=epoch,
                       model_digest=plan.model_digest, node_id="node-1")
    assert set(keys) == _hashes(encrypted_store, Span(10, 20))
    other = load_node_key(mesh.workdir / "nodes" / "node-2" / "x25519_key.pem")
    with pytest.raises(ValueError, match="do not open"):
        open_sealed(reply.weight_keys, other, cluster_id=plan.cluster_id, epoch=epoch,
                    model_digest=plan.model_digest, node_id="node-1")


@pytest.mark.slow
def test_keys_are_held_only_for_hosted_layers(mesh: LocalMesh, encrypted_store: ModelStore) -> None:
    assert set(_info(mesh, "node-1").weight_keys_held) == _hashes(encrypted_store, Span(10, 20))
    with mesh.client(operator=True) as operator:
        assert operator.resplit([0, 12, 22, 30], ["node-0", "node-1", "node-2"]).committed
    assert set(_info(mesh, "node-1").weight_keys_held) == _hashes(encrypted_store, Span(12, 22))
    with mesh.client(operator=True) as operator:
        assert operator.resplit([0, 15, 30], ["node-0", "node-2"]).committed
    released = _wait_for_epoch(mesh, "node-1", _info(mesh, "node-0").plan_epoch)  # told after the COMMIT
    assert not released.weight_keys_held and not released.hosted  # forgotten on release
    assert set(_info(mesh, "node-2").weight_keys_held) == _hashes(encrypted_store, Span(15, 30))


@pytest.mark.slow
def test_a_restarted_node_gets_its_keys_again(encrypted_store: ModelStore, reference: torch.nn.Module,
                                               tmp_path: Path) -> None:
    """The keys live in no file of the node: after a restart it restores its committed plan only once the
    orchestrator has sent them again (Orchestrator.WeightKeys, sealed to its key in that plan)."""
    spec = MeshSpec(nodes=2, store=encrypted_store.root, workdir=tmp_path, orchestrator_port=0,
                    trusted=("node-0", "node-1"), boundaries=(0, 12, 30), placement=("node-0", "node-1"), tls=True,
                    node_stores_empty=True)
    with LocalMesh(spec) as first:
        epoch = first.status().plan.epoch  # type: ignore[union-attr]
    with LocalMesh(spec) as second, second.client() as client:
        got = [e.token_id for e in client.generate(PROMPT_IDS, max_new_tokens=6, ignore_eos=True)]
        log_text = (tmp_path / "node-1.log").read_text()
        assert "waiting for its weight keys" in log_text
        assert f"restored committed plan epoch {epoch} after restart" in log_text
    assert got == reference_greedy(reference, PROMPT_IDS, 6)  # type: ignore[arg-type]


def test_decrypted_tensors_start_aligned_so_int8_layers_copy_nothing(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The int8 kernel needs 64-byte aligned data; tensors off that boundary were cloned while the store's
    resident cache kept the originals, so an int8 node held its weights twice."""
    from common import int8
    from common.model_store import TENSOR_ALIGN, tensors_to_bytes
    from node_agent.segment import SegmentRunner

    store = ModelStore(tmp_path)
    # one blob whose data section starts off the boundary in the plaintext itself
    tensors = {"w": torch.arange(4096, dtype=torch.int8).reshape(64, 64), "scale": torch.ones(64)}
    plain = tensors_to_bytes(tensors)
    assert (8 + int.from_bytes(plain[:8], "little")) % TENSOR_ALIGN != 0
    entry = store.put_encrypted_blob(plain)
    read = store.encrypted_tensors(entry, "probe")
    assert all(t.data_ptr() % TENSOR_ALIGN == 0 for t in read.values())
    assert all(torch.equal(read[k], v) for k, v in tensors.items())

    digest = import_random(store, "tiny-llama", "tiny8", seed=3, dtype="int8")
    cloned: list[int] = []
    original = int8.aligned

    def counting(tensor: torch.Tensor) -> torch.Tensor:
        out = original(tensor)
        if out is not tensor:
            cloned.append(tensor.numel())
        return out

    monkeypatch.setattr(int8, "aligned", counting)
    store.keep_resident(set())  # as a node's segment pool does: decrypted blobs stay as the segment's weights
    runner = SegmentRunner(store.open(digest), Span(0, 2))
    assert runner.loaded_roles and not cloned
