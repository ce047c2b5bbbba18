"""``splitmesh up`` and ``splitmesh demo``: a whole mesh on this box, with mutual TLS unless told otherwise.

Start-up fails fast and says why: what the orchestrator could never plan is refused before any
process starts (its own placement rules, on the nodes this mesh will have), a taken port is found
before binding, and a process that dies while starting is reported with the end of its log.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from rich.console import Console

from common.model_store import EMBEDDED_MODEL_NAME
from common.proto import splitmesh_pb2 as pb
from splitmesh.cli_args import integer as int_in
from splitmesh.cli_args import ints, names, number
from splitmesh.cli_model import DEFAULT_STORE
from splitmesh.client import DEFAULT_ADDRESS, SplitmeshError
from splitmesh.launcher import LocalMesh, MeshSpec, MeshStartError, check_spec
from splitmesh.local_meshes import MeshRecord
from splitmesh.tables import plan_table

console = Console()
err = Console(stderr=True)
DEFAULT_WORKDIR = "~/.cache/splitmesh/local"
PLAINTEXT_HELP = ("serve plaintext gRPC on loopback instead of mutual TLS. This gives up every identity check: "
                  "any local process can then register as a node (and become the head that reads every prompt), "
                  "commit plans and call every Admin method")


def _metrics_default() -> int:
    text = os.environ.get("SPLITMESH_METRICS_PORT", "0")
    return int(text) if text.isdigit() else 0


@contextmanager
def _interruptible() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C (KeyboardInterrupt), so every way of stopping `up` stops its processes."""

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _num_layers(store: Path, model: str) -> int:
    """The model's layer count, importing the embedded model first when it is the one asked for and absent."""
    from common.model_store import ModelStore

    model_store = ModelStore(store.expanduser())
    if model == EMBEDDED_MODEL_NAME and model not in model_store.names():
        from common.model_import import ensure_embedded  # torch and transformers: only when importing

        console.print(f"importing the embedded model into {model_store.root} (once)")
        ensure_embedded(model_store)
    return model_store.open(model).num_layers


def _spans(plan: pb.Plan) -> tuple[list[int], list[str]]:
    """(boundaries, node per segment) of a plan."""
    return [s.start for s in plan.segments] + [plan.segments[-1].end], [s.node_id for s in plan.segments]


def _apply_requested_split(mesh: LocalMesh, status: pb.StatusReply) -> pb.Plan:
    """A reused workdir serves its saved plan: when --boundaries/--place ask for another, switch to it."""
    spec = mesh.spec
    boundaries, placement = _spans(status.plan)
    if (not spec.boundaries or list(spec.boundaries) == boundaries) and (
            not spec.placement or list(spec.placement) == placement):
        return status.plan
    console.print(f"the saved plan of {mesh.workdir} differs from --boundaries/--place: switching to them")
    try:
        with mesh.client(operator=True) as client:
            reply = client.resplit(spec.boundaries, spec.placement)
    except SplitmeshError as exc:
        raise MeshStartError(f"the requested split was refused: {exc.code}: {exc.message}") from exc
    return reply.plan


def _watch(mesh: LocalMesh) -> int:
    """Until Ctrl-C (0) or until a process of the mesh exits (1, with the end of its log)."""
    from splitmesh.launcher import log_tail

    while True:
        for name, proc in mesh.processes.items():
            if proc.poll() is not None:
                err.print(f"[red]{name} exited with {proc.returncode}[/red]\n"
                          f"{log_tail(mesh.workdir / f'{name}.log')}")
                return 1
        time.sleep(0.5)


def _serving_text(mesh: LocalMesh) -> str:
    spec = mesh.spec
    lines = [f"serving on [bold]{mesh.address}[/bold] "
             + ("with mutual TLS" if spec.tls else "[red]in PLAINTEXT[/red] (--insecure-plaintext)")]
    if spec.tls:
        lines.append(f"certificates in {mesh.tls_dir}: commands that dial {mesh.address} on this box use them "
                     f"by themselves (elsewhere: export SPLITMESH_TLS_DIR={mesh.tls_dir})")
    if spec.metrics_port:
        nodes = ", ".join(f"{n} :{p}" for n, p in mesh.node_metrics_ports.items())
        lines.append(f"Prometheus metrics: orchestrator http://127.0.0.1:{spec.metrics_port}/metrics; nodes {nodes}")
    address = "" if mesh.address == DEFAULT_ADDRESS else f" --address {mesh.address}"
    lines.append(f"try: splitmesh generate{address} \"Hello\"   (Ctrl-C stops the mesh)")
    return "\n".join(lines)


def cmd_up(args: argparse.Namespace) -> int:
    host, _, port = args.address.rpartition(":")
    if host not in ("127.0.0.1", "localhost") or not port.isdigit():
        err.print("error: splitmesh up runs a local mesh: --address must be 127.0.0.1:PORT")
        return 2
    spec = MeshSpec(nodes=args.nodes, store=Path(args.store), workdir=Path(args.workdir), model=args.model,
                    orchestrator_port=int(port), trusted=args.trusted or ["node-0"], boundaries=args.boundaries or (),
                    placement=args.place or (), threads=args.threads, adaptive=args.adaptive,
                    tls=not args.insecure_plaintext, metrics_port=args.metrics_port)
    try:
        check_spec(spec, _num_layers(spec.store, spec.model))
    except MeshStartError as exc:
        err.print(f"error: {exc}")
        return 2
    mesh = LocalMesh(spec)
    record = MeshRecord(mesh.address, str(mesh.workdir), str(mesh.tls_dir) if spec.tls else "", os.getpid())
    serving = False
    with _interruptible():
        try:
            record.save()
            with console.status(f"starting orchestrator + {args.nodes} nodes (logs in {mesh.workdir})"):
                status = mesh.start(args.timeout)
                plan = _apply_requested_split(mesh, status)
            serving = True
            console.print(plan_table(plan))
            console.print(_serving_text(mesh))
            return _watch(mesh)
        except MeshStartError as exc:
            err.print(f"[red]mesh failed to start:[/red] {exc}")
            return 1
        except KeyboardInterrupt:
            return 0 if serving else 130  # stopped by the user; during start-up, like any interrupted command
        finally:
            console.print("stopping the mesh")
            record.remove()
            mesh.stop()


def cmd_demo(args: argparse.Namespace) -> int:
    """Import the embedded model if needed, start a local TLS mesh, stream one generation, stop."""
    from splitmesh.cli import generate

    _num_layers(Path(args.store), EMBEDDED_MODEL_NAME)
    spec = MeshSpec(nodes=args.nodes, store=Path(args.store), workdir=Path(args.workdir), orchestrator_port=0,
                    tls=True)
    mesh = LocalMesh(spec)
    with _interruptible():
        try:
            with console.status(f"starting orchestrator + {args.nodes} node agents (logs in {mesh.workdir})"):
                status = mesh.start(args.timeout)
            console.print(plan_table(status.plan))
            console.print(f"[bold]prompt:[/bold] {args.prompt}")
            with mesh.client() as client:
                return generate(client, [{"role": "user", "content": args.prompt}],
                                max_new_tokens=args.max_new_tokens)
        except MeshStartError as exc:
            err.print(f"[red]mesh failed to start:[/red] {exc}")
            return 1
        finally:
            mesh.stop()


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], address_default: str) -> None:
    """Add ``up`` and ``demo`` to the ``splitmesh`` parser."""
    up = sub.add_parser("up", help="run orchestrator + N node agents locally, with mutual TLS")
    up.add_argument("--address", default=address_default,
                    help=f"127.0.0.1:PORT the orchestrator listens on (default {DEFAULT_ADDRESS})")
    up.add_argument("--nodes", type=int_in(1, 64), default=3, help="node agents to start (default 3)")
    up.add_argument("--store", default=DEFAULT_STORE, help="model store folder (env SPLITMESH_STORE)")
    up.add_argument("--workdir", default=DEFAULT_WORKDIR,
                    help=f"state, certificates and logs of the local mesh (default {DEFAULT_WORKDIR}); a reused "
                         "workdir keeps its plan unless --boundaries/--place ask for another")
    up.add_argument("--model", default="smollm2-135m-instruct", help="model in the store")
    up.add_argument("--trusted", type=names, help="trusted node ids (default node-0)")
    up.add_argument("--boundaries", type=ints, help="initial boundaries, e.g. 0,10,20,30")
    up.add_argument("--place", type=names, help="node per segment, e.g. node-0,node-1,node-0")
    up.add_argument("--threads", type=int_in(0), default=0, help="torch threads per node (0 = all cores)")
    up.add_argument("--adaptive", action="store_true",
                    help="run the adaptive loop (off by default locally: all nodes share one machine)")
    up.add_argument("--metrics-port", type=int_in(0, 65535), default=_metrics_default(),
                    help="orchestrator's Prometheus port; each node then gets one of its own (0 = off, the default; "
                         "env SPLITMESH_METRICS_PORT)")
    security = up.add_mutually_exclusive_group()
    security.add_argument("--insecure-plaintext", action="store_true", help=PLAINTEXT_HELP)
    security.add_argument("--tls", action="store_true", help="mutual TLS (the default; kept for scripts that pass it)")
    up.add_argument("--timeout", type=number(1.0), default=300.0, help="seconds to wait for the mesh to serve")
    up.set_defaults(func=cmd_up)

    demo = sub.add_parser("demo", help="start a local mesh on the embedded model, stream a generation, stop")
    demo.add_argument("prompt", nargs="?", default="Explain in two sentences why the sky is blue.")
    demo.add_argument("--nodes", type=int_in(1, 64), default=3, help="node agents to start (default 3)")
    demo.add_argument("--max-new-tokens", type=int_in(1, 4096), default=64)
    demo.add_argument("--store", default=DEFAULT_STORE, help="model store folder (env SPLITMESH_STORE)")
    demo.add_argument("--workdir", default="~/.cache/splitmesh/demo", help="state, certificates and logs")
    demo.add_argument("--timeout", type=number(1.0), default=300.0, help="seconds to wait for the mesh to serve")
    demo.set_defaults(func=cmd_demo)
