"""The cluster CA and per-node certificates that carry a node's identity for mutual TLS.

A certificate names its holder with one SPIFFE-style URI SAN, ``spiffe://splitmesh/<kind>/<node_id>``, and a
DNS SAN ``<node_id>.<kind>.splitmesh`` that a client can pin with ``grpc.ssl_target_name_override``. Keys are
EC P-256 (accepted everywhere BoringSSL runs) and written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN = "splitmesh"
KINDS = ("node", "orchestrator", "operator", "client")  # operator: people and automation that change the mesh
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
CA_DAYS = 3650
CERT_DAYS = 397
_NODE_ID = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")  # one lowercase DNS label
_DNS_NAME = re.compile(r"(?=.{1,253}$)(?:\*\.)?[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
_RESERVED_IDS = {"ca"}  # its files would overwrite the CA's


class CertificateIdentityError(ValueError):
    """A certificate does not carry exactly one valid splitmesh identity."""


class Identity(NamedTuple):
    """Who holds a certificate; a plain ``(kind, node_id)`` tuple."""

    kind: str
    node_id: str


@dataclass(frozen=True)
class IssuedFiles:
    """Where a key and its certificate were written."""

    key: Path
    cert: Path


def validate_node_id(node_id: str) -> str:
    """Node ids become URI path segments, DNS labels and file names, so they are one lowercase DNS label."""
    if not _NODE_ID.fullmatch(node_id):
        raise ValueError(f"invalid node id {node_id!r}: use 1-63 of a-z, 0-9 and '-', "
                         "starting and ending with a letter or digit")
    return node_id


def validate_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"invalid kind {kind!r}: one of {', '.join(KINDS)}")
    return kind


def spiffe_uri(kind: str, node_id: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/{validate_kind(kind)}/{validate_node_id(node_id)}"


def identity_dns_name(kind: str, node_id: str) -> str:
    """The DNS SAN every certificate carries, for pinning the expected peer on a channel."""
    return f"{validate_node_id(node_id)}.{validate_kind(kind)}.{TRUST_DOMAIN}"


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _refuse_overwrite(paths: Sequence[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); pass force=True (--force) to replace")


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    return now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)  # tolerate small clock skew


def init_ca(directory: Path, *, days: int = CA_DAYS, force: bool = False) -> IssuedFiles:
    """Create ca.key (0600) and ca.crt, a self-signed P-256 CA that may sign only end-entity certificates."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    files = IssuedFiles(directory / "ca.key", directory / "ca.crt")
    _refuse_overwrite([files.key, files.cert], force)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, TRUST_DOMAIN),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"{TRUST_DOMAIN} cluster CA")])
    not_before, not_after = _validity(days)
    public = key.public_key()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(public)
            .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA256()))
    _write_private(files.key, _key_pem(key))
    _write_public(files.cert, cert.public_bytes(serialization.Encoding.PEM))
    return files


def load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{directory / 'ca.key'} is not an EC private key")
    return cert, key


def _host_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not _DNS_NAME.fullmatch(host):
                raise ValueError(f"invalid host {host!r}: expected an IP address or a DNS name") from None
            names.append(x509.DNSName(host.lower()))
    return names


def issue(directory: Path, node_id: str, kind: str = "node", hosts: Sequence[str] | None = None, *,
          days: int = CERT_DAYS, force: bool = False) -> IssuedFiles:
    """Create NODE_ID.key (0600) and NODE_ID.crt signed by the CA in ``directory``.

    The certificate is good for both server and client auth: every splitmesh process dials and is dialled.
    """
    validate_node_id(node_id)
    validate_kind(kind)
    if node_id in _RESERVED_IDS:
        raise ValueError(f"node id {node_id!r} is reserved")
    san: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_uri(kind, node_id)),
                                   x509.DNSName(identity_dns_name(kind, node_id))]
    san += _host_names(DEFAULT_HOSTS if hosts is None else hosts)
    ca_cert, ca_key = load_ca(directory)
    files = IssuedFiles(directory / f"{node_id}.key", directory / f"{node_id}.crt")
    _refuse_overwrite([files.key, files.cert], force)
    key = ec.generate_private_key(ec.SECP256R1())
    not_before, not_after = _validity(days)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, TRUST_DOMAIN),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, kind),
                         x509.NameAttribute(NameOID.COMMON_NAME, node_id)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(min(not_after, ca_cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_private(files.key, _key_pem(key))
    _write_public(files.cert, cert.public_bytes(serialization.Encoding.PEM))
    return files


def identity_from_cert(pem: bytes) -> Identity:
    """Read (kind, node_id) from the single splitmesh URI SAN. Does not verify the chain: TLS did that."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        raise CertificateIdentityError("certificate has no subject alternative names") from None
    except ValueError as exc:
        raise CertificateIdentityError(f"unreadable certificate: {exc}") from None
    prefix = f"spiffe://{TRUST_DOMAIN}/"
    ours = [u for u in uris if u.startswith(prefix)]
    if len(ours) != 1:
        raise CertificateIdentityError(f"certificate carries {len(ours)} {prefix} identities, expected 1")
    parts = ours[0][len(prefix):].split("/")
    if len(parts) != 2:
        raise CertificateIdentityError(f"malformed identity {ours[0]!r}")
    try:
        return Identity(validate_kind(parts[0]), validate_node_id(parts[1]))
    except ValueError as exc:
        raise CertificateIdentityError(f"malformed identity {ours[0]!r}: {exc}") from None
