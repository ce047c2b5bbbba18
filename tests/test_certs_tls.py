"""Cluster CA, node certificates and mutual TLS against a real gRPC server on loopback."""

from __future__ import annotations

import argparse
import datetime as dt
import stat
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common import certs, tls
from common.certs import CertificateIdentityError, Identity
from common.tls import TlsConfig
from splitmesh import certs_cli

TIMEOUT = 5.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our CA with an orchestrator, a node and a client; plus an unrelated CA issuing the same names."""
    root = tmp_path_factory.mktemp("pki")
    ours, theirs = root / "ours", root / "theirs"
    certs.init_ca(ours)
    certs.issue(ours, "orch", "orchestrator")
    certs.issue(ours, "node-1", "node", hosts=["localhost", "127.0.0.1", "::1", "box-1.example.org"])
    certs.issue(ours, "cli", "client")
    certs.init_ca(theirs)
    certs.issue(theirs, "node-1", "node")
    certs.issue(theirs, "orch", "orchestrator")
    return root


class RecordingHealth(health.HealthServicer):  # type: ignore[misc]
    """The standard health service, noting who each caller proved to be."""

    def __init__(self) -> None:
        super().__init__()
        self.peers: list[Identity | None] = []

    def Check(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC method name)
        self.peers.append(tls.peer_identity(context))
        return super().Check(request, context)


@pytest.fixture
def server(pki: Path) -> Iterator[tuple[str, RecordingHealth]]:
    servicer = RecordingHealth()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, srv)
    port = srv.add_secure_port("127.0.0.1:0", tls.server_credentials(TlsConfig.from_dir(pki / "ours", "orch")))
    srv.start()
    yield f"127.0.0.1:{port}", servicer
    srv.stop(None)


def check(channel: grpc.Channel) -> Any:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)


def test_ca_issued_client_is_served_and_identified(pki: Path, server: tuple[str, RecordingHealth]) -> None:
    address, servicer = server
    for node_id, identity in (("node-1", Identity("node", "node-1")), ("cli", Identity("client", "cli"))):
        creds = tls.channel_credentials(TlsConfig.from_dir(pki / "ours", node_id))
        with grpc.secure_channel(address, creds) as channel:
            assert check(channel).status == health_pb2.HealthCheckResponse.SERVING
        assert servicer.peers[-1] == identity


def test_client_can_pin_the_server_identity(pki: Path, server: tuple[str, RecordingHealth]) -> None:
    address, _ = server
    creds = tls.channel_credentials(TlsConfig.from_dir(pki / "ours", "node-1"))
    with grpc.secure_channel(address, creds, options=tls.expect_peer_options("orchestrator", "orch")) as channel:
        assert check(channel).status == health_pb2.HealthCheckResponse.SERVING
    with grpc.secure_channel(address, creds, options=tls.expect_peer_options("node", "orch")) as channel, \
            pytest.raises(grpc.RpcError) as info:
        check(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("client", ["no-cert", "other-ca", "plaintext"])
def test_unauthenticated_clients_are_refused(pki: Path, server: tuple[str, RecordingHealth], client: str) -> None:
    address, servicer = server
    if client == "plaintext":
        channel = grpc.insecure_channel(address)
    elif client == "no-cert":
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials((pki / "ours" / "ca.crt").read_bytes()))
    else:  # a certificate for the same name from another CA, which also trusts our server
        theirs = TlsConfig.from_dir(pki / "theirs", "node-1")
        creds = grpc.ssl_channel_credentials((pki / "ours" / "ca.crt").read_bytes(), theirs.key.read_bytes(),
                                             theirs.cert.read_bytes())
        channel = grpc.secure_channel(address, creds)
    with channel, pytest.raises(grpc.RpcError) as info:
        check(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert servicer.peers == []


def test_client_refuses_a_server_from_another_ca(pki: Path) -> None:
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), srv)
    port = srv.add_secure_port("127.0.0.1:0", tls.server_credentials(TlsConfig.from_dir(pki / "theirs", "orch")))
    srv.start()
    try:
        creds = tls.channel_credentials(TlsConfig.from_dir(pki / "ours", "node-1"))
        with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel, pytest.raises(grpc.RpcError) as info:
            check(channel)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop(None)


def test_plaintext_peer_has_no_identity() -> None:
    servicer = RecordingHealth()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            check(channel)
        assert servicer.peers == [None]
    finally:
        srv.stop(None)


# ------------------------------------------------------------------ certificates
def test_issued_certificate_contents(pki: Path) -> None:
    ours = pki / "ours"
    cert = x509.load_pem_x509_certificate((ours / "node-1.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((ours / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://splitmesh/node/node-1"]
    assert san.get_values_for_type(x509.DNSName) == ["node-1.node.splitmesh", "localhost", "box-1.example.org"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert certs.identity_from_cert((ours / "orch.crt").read_bytes()) == ("orchestrator", "orch")
    for name in ("ca.key", "node-1.key"):
        assert stat.S_IMODE((ours / name).stat().st_mode) == 0o600


@pytest.mark.parametrize("node_id", ["", "a/b", "../x", "Node-1", "node_1", "-x", "x-", "a" * 64, "ca", "n\n"])
def test_bad_node_ids_are_refused(pki: Path, node_id: str) -> None:
    with pytest.raises(ValueError):
        certs.issue(pki / "ours", node_id)


def test_bad_kind_and_host_are_refused(pki: Path) -> None:
    with pytest.raises(ValueError, match="kind"):
        certs.issue(pki / "ours", "x1", "admin")
    with pytest.raises(ValueError, match="host"):
        certs.issue(pki / "ours", "x1", hosts=["bad host"])


def test_existing_files_are_kept_unless_forced(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    first = certs.issue(tmp_path, "n1").cert.read_bytes()
    with pytest.raises(FileExistsError):
        certs.init_ca(tmp_path)
    with pytest.raises(FileExistsError):
        certs.issue(tmp_path, "n1")
    assert certs.issue(tmp_path, "n1", force=True).cert.read_bytes() != first


def _self_signed(uris: list[str]) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(1).not_valid_before(dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
               .not_valid_after(dt.datetime(2100, 1, 1, tzinfo=dt.UTC)))
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)



@pytest.mark.parametrize("uris", [[], ["https://example.org"], ["spiffe://splitmesh/node/a", "spiffe://splitmesh/node/b"],
                                  ["spiffe://splitmesh/node/a/b"], ["spiffe://splitmesh/root/a"],
                                  ["spiffe://splitmesh/node/A"]])
def test_identity_needs_exactly_one_valid_uri(uris: list[str]) -> None:
    with pytest.raises(CertificateIdentityError):
        certs.identity_from_cert(_self_signed(uris))
    with pytest.raises(CertificateIdentityError):
        certs.identity_from_cert(b"not a certificate")


@pytest.mark.parametrize(("address", "allowed"), [
    ("127.0.0.1:50051", True), ("127.3.4.5:1", True), ("localhost:50051", True), ("[::1]:50051", True),
    ("::1", True), ("unix:/tmp/s.sock", True), ("0.0.0.0:50051", False), ("[::]:50051", False),
    ("10.0.0.2:50051", False), ("example.org:443", False), ("localhost.example.org:1", False),
])
def test_insecure_allowed_only_on_loopback(address: str, allowed: bool) -> None:
    assert tls.insecure_allowed(address) is allowed


# ------------------------------------------------------------------ CLI
def test_certs_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="splitmesh")
    certs_cli.register(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str) -> int:
        args = parser.parse_args(argv)
        code: int = args.func(args)
        return code

    assert run("certs", "init", "--dir", str(tmp_path)) == 0
    assert run("certs", "issue", "edge-1", "--dir", str(tmp_path), "--host", "10.0.0.7", "--host", "edge1.lan") == 0
    assert "spiffe://splitmesh/node/edge-1" in capsys.readouterr().out
    assert certs.identity_from_cert((tmp_path / "edge-1.crt").read_bytes()) == ("node", "edge-1")
    assert run("certs", "issue", "edge/1", "--dir", str(tmp_path)) == 1
    assert run("certs", "issue", "edge-1", "--dir", str(tmp_path)) == 1
    assert "already exist" in capsys.readouterr().err
    assert run("certs", "issue", "o", "--kind", "orchestrator", "--dir", str(tmp_path / "nowhere")) == 1
