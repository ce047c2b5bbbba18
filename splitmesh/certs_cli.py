"""``splitmesh certs init|issue``: the cluster CA and node certificates for mutual TLS."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from rich.console import Console
from rich.table import Table

from common.certs import CA_DAYS, CERT_DAYS, DEFAULT_HOSTS, KINDS, IssuedFiles, init_ca, issue

console = Console()
err = Console(stderr=True)


def _describe(files: IssuedFiles, title: str) -> Table:
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    der = cert.public_bytes(serialization.Encoding.DER)
    table = Table(title=title, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("certificate", str(files.cert))
    table.add_row("private key", f"{files.key} (mode 600: keep it on this box only)")
    table.add_row("subject", cert.subject.rfc4514_string())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        table.add_row("names", "\n".join(str(name.value) for name in san))
    except x509.ExtensionNotFound:
        pass  # the CA carries no SANs
    table.add_row("valid until", cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC"))
    table.add_row("sha256", hashlib.sha256(der).hexdigest())
    return table


def cmd_init(args: argparse.Namespace) -> int:
    try:
        files = init_ca(Path(args.dir).expanduser(), days=args.days, force=args.force)
    except (FileExistsError, ValueError) as exc:
        err.print(f"error: {exc}")
        return 1
    console.print(_describe(files, "cluster CA created"))
    console.print("Copy ca.crt to every box; keep ca.key offline or on the operator box.")
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    folder = Path(args.dir).expanduser()
    if not (folder / "ca.key").is_file():
        err.print(f"error: no cluster CA in {folder} (ca.key): create it first with `splitmesh certs init --dir "
                  f"{args.dir}`")
        return 1
    try:
        files = issue(Path(args.dir).expanduser(), args.node_id, args.kind, args.host, days=args.days,
                      force=args.force)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        err.print(f"error: {exc}")
        return 1
    console.print(_describe(files, f"{args.kind} certificate for {args.node_id}"))
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``certs init`` and ``certs issue`` to the ``splitmesh`` parser."""
    certs = subparsers.add_parser("certs", help="cluster CA and node certificates for mutual TLS")
    sub = certs.add_subparsers(dest="certs_command", required=True)

    init = sub.add_parser("init", help="create the cluster CA (ca.key, ca.crt)")
    init.add_argument("--dir", required=True, help="folder for the CA and issued certificates")
    init.add_argument("--days", type=int, default=CA_DAYS, help=f"validity in days (default {CA_DAYS})")
    init.add_argument("--force", action="store_true", help="replace an existing CA (invalidates every cert)")
    init.set_defaults(func=cmd_init)

    iss = sub.add_parser("issue", help="issue NODE_ID.key + NODE_ID.crt signed by the cluster CA")
    iss.add_argument("node_id", help="lowercase DNS label, e.g. node-1")
    iss.add_argument("--dir", required=True, help="folder holding ca.key and ca.crt")
    iss.add_argument("--kind", choices=KINDS, default="node", help="role in the certificate identity")
    iss.add_argument("--host", action="append",
                     help="DNS name or IP the holder is reached at (repeatable; "
                          f"when none is given: {', '.join(DEFAULT_HOSTS)})")
    iss.add_argument("--days", type=int, default=CERT_DAYS, help=f"validity in days (default {CERT_DAYS})")
    iss.add_argument("--force", action="store_true", help="replace an existing certificate for this id")
    iss.set_defaults(func=cmd_issue)
