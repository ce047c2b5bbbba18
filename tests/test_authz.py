"""Who may change the mesh: the authorization table covers every RPC, and a live mutual-TLS mesh enforces it.

The attack this closes: any certificate of the cluster CA (an untrusted node's, a client's) could drain a node,
switch privacy off and re-split so that an untrusted node hosts layers 1-29 and reads every activation.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from functools import partial

import grpc
import pytest
from grpc_health.v1 import health_pb2

from common.authz import EVERYONE, TABLE, denial
from common.certs import Identity
from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from common.tls import TlsConfig
from common.transport import sync_channel
from splitmesh.launcher import LocalMesh, MeshSpec

SERVICES = [*pb.DESCRIPTOR.services_by_name.values(), *health_pb2.DESCRIPTOR.services_by_name.values()]
RPCS = [f"/{service.full_name}/{method.name}" for service in SERVICES for method in service.methods]
MUTATING = ("Resplit", "Drain", "SetPolicy")


# ------------------------------------------------------------------ the table, offline
def test_every_rpc_of_every_service_has_an_entry_and_no_entry_is_stale() -> None:
    assert sorted(set(RPCS) - set(TABLE)) == []  # a new RPC without a rule fails here
    assert sorted(set(TABLE) - set(RPCS)) == []
    assert all(rule.kinds <= EVERYONE and rule.kinds for rule in TABLE.values())


@pytest.mark.parametrize("method", [m for m in RPCS if m.startswith("/splitmesh.v1.Admin/")])
def test_admin_roles(method: str) -> None:
    def allowed(kind: str) -> bool:
        return denial(method, Identity(kind, "x"), {}) is None

    assert not allowed("node") and not allowed("orchestrator")
    assert allowed("operator")
    assert allowed("client") == (method.rsplit("/", 1)[1] not in MUTATING)


def test_unknown_method_no_certificate_and_pinned_ids_are_refused() -> None:
    unknown = denial("/splitmesh.v1.Admin/Nope", Identity("operator", "op"), {})
    assert unknown is not None and unknown[0] == grpc.StatusCode.PERMISSION_DENIED
    anonymous = denial("/splitmesh.v1.Admin/Status", None, {})
    assert anonymous is not None and anonymous[0] == grpc.StatusCode.UNAUTHENTICATED
    prepare = "/splitmesh.v1.Node/Prepare"
    assert denial(prepare, Identity("orchestrator", "orchestrator"), {"orchestrator": "orchestrator"}) is None
    assert denial(prepare, Identity("orchestrator", "other"), {"orchestrator": "orchestrator"}) is not None
    for kind in ("node", "client", "operator"):
        assert denial(prepare, Identity(kind, "orchestrator"), {"orchestrator": "orchestrator"}) is not None


# ------------------------------------------------------------------ a live mTLS mesh
@pytest.fixture(scope="module")
def tls_mesh(store: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """node-0 (trusted) holds the ends, node-1 (untrusted) the middle; every channel is mutual TLS."""
    spec = MeshSpec(nodes=2, store=store.root, workdir=tmp_path_factory.mktemp("authz"),  # type: ignore[attr-defined]
                    orchestrator_port=0, trusted=("node-0",), boundaries=(0, 2, 28, 30),
                    placement=("node-0", "node-1", "node-0"), tls=True)
    with LocalMesh(spec) as mesh:
        yield mesh


def _admin(mesh: LocalMesh, name: str) -> tuple[grpc.Channel, pb_grpc.AdminStub]:
    channel = sync_channel(mesh.address, TlsConfig.from_dir(mesh.tls_dir, name), Identity("orchestrator",
                                                                                           "orchestrator"))
    return channel, pb_grpc.AdminStub(channel)


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


# The attack of the issue: all of it succeeded with an untrusted node's certificate.
def _attacks(admin: pb_grpc.AdminStub) -> dict[str, Callable[[], object]]:
    return {
        "Drain": partial(admin.Drain, pb.DrainRequest(node_id="node-0"), timeout=30),
        "SetPolicy": partial(admin.SetPolicy, pb.SetPolicyRequest(set={"privacy_hard": "false"}), timeout=30),
        "Resplit": partial(admin.Resplit, pb.ResplitRequest(boundaries=[0, 1, 29, 30],
                                                            placement=["node-0", "node-1", "node-0"]), timeout=60),
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["node-1", "client"])
def test_nodes_and_clients_cannot_change_the_mesh(tls_mesh: LocalMesh, name: str) -> None:
    before = tls_mesh.status()
    assert before is not None and before.serving
    channel, admin = _admin(tls_mesh, name)
    with channel:
        for what, call in _attacks(admin).items():
            assert _code(call) == grpc.StatusCode.PERMISSION_DENIED, (name, what)
        reads = {"Status": partial(admin.Status, pb.StatusRequest(), timeout=10),
                 "History": partial(admin.History, pb.HistoryRequest(), timeout=10),
                 "GetPolicy": partial(admin.GetPolicy, pb.GetPolicyRequest(), timeout=10)}
        for what, call in reads.items():  # clients read, nodes may call no Admin method at all
            expected = grpc.StatusCode.OK if name == "client" else grpc.StatusCode.PERMISSION_DENIED
            assert _code(call) == expected, (name, what)
    after = tls_mesh.status()
    assert after is not None and after.plan.epoch == before.plan.epoch  # nothing changed
    with tls_mesh.client() as client:
        assert client.policy()["privacy_hard"] == "true"


@pytest.mark.slow
def test_nodes_may_not_generate_and_operators_may_not_install_plans(tls_mesh: LocalMesh) -> None:
    head = tls_mesh.node_addresses["node-0"]
    node0 = Identity("node", "node-0")
    with sync_channel(head, TlsConfig.from_dir(tls_mesh.tls_dir, "node-1"), node0) as channel:
        request = pb.GenerateRequest(prompt="hi", max_new_tokens=1)
        assert _code(lambda: list(pb_grpc.NodeStub(channel).Generate(request, timeout=30))) == \
            grpc.StatusCode.PERMISSION_DENIED
    with tls_mesh.client() as client:
        signed = client.signed_plan()
    with sync_channel(head, TlsConfig.from_dir(tls_mesh.tls_dir, "operator"), node0) as channel:
        prepare = pb.PrepareRequest(plan=signed)
        denied = _code(lambda: pb_grpc.NodeStub(channel).Prepare(prepare, timeout=30))
        assert denied == grpc.StatusCode.PERMISSION_DENIED


def _cli(mesh: LocalMesh, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "splitmesh", "--tls-dir", str(mesh.tls_dir), *args,
                           "--address", mesh.address], capture_output=True, text=True, timeout=180,
                          env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})


@pytest.mark.slow
def test_an_operator_changes_the_mesh_through_the_cli_and_the_sdk(tls_mesh: LocalMesh) -> None:
    before = tls_mesh.status()
    assert before is not None
    with tls_mesh.client(operator=True) as operator:
        assert operator.policy({"cooldown_s": "12"})["cooldown_s"] == "12.0"
        assert not operator.drain("node-1", undo=True).committed  # allowed; nothing to undo
    refused = _cli(tls_mesh, "--tls-id", "client", "policy", "set", "cooldown_s=13")
    assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr, refused.stderr
    done = _cli(tls_mesh, "resplit", "--boundaries", "0,3,27,30", "--place", "node-0,node-1,node-0")
    assert done.returncode == 0, done.stderr
    status = tls_mesh.wait_serving(epoch_above=before.plan.epoch)
    assert [(s.start, s.end) for s in status.plan.segments] == [(0, 3), (3, 27), (27, 30)]
    read = _cli(tls_mesh, "policy", "get")  # the client certificate reads
    assert read.returncode == 0 and "12.0" in read.stdout, read.stderr
