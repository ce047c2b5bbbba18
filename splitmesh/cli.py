"""The ``splitmesh`` command: run a local mesh, generate, and operate a running cluster."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from common.transport import DEFAULT_CLIENT_ID, ENV_CLIENT_ID, ENV_TLS_DIR, TransportError
from splitmesh import gateway
from splitmesh.certs_cli import register as register_certs
from splitmesh.client import DEFAULT_ADDRESS, Client, SplitmeshError
from splitmesh.tables import history_table, nodes_table, plan_table, policy_table

console = Console()
err = Console(stderr=True)
DEFAULT_STORE = os.environ.get("SPLITMESH_STORE", "~/.cache/splitmesh/store")


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


# ------------------------------------------------------------------ model store
def cmd_model_import(args: argparse.Namespace) -> int:
    from common.model_import import (
        EMBEDDED_MODEL_NAME,
        describe,
        embedded_gguf_path,
        import_checkpoint,
        import_gguf,
        import_random,
    )
    from common.model_store import ModelStore

    store = ModelStore(Path(args.store).expanduser())
    if args.checkpoint:
        digest = import_checkpoint(store, Path(args.checkpoint), args.name or Path(args.checkpoint).name)
    elif args.random:
        digest = import_random(store, args.random, args.name or args.random, seed=args.seed, num_layers=args.layers)
    else:
        gguf = Path(args.gguf) if args.gguf else embedded_gguf_path()
        name = args.name or (EMBEDDED_MODEL_NAME if not args.gguf else gguf.stem.lower())
        if not args.gguf and name in store.names() and not store.open(name).missing_or_corrupt():
            console.print(f"{name} is already in {store.root}")
            digest = store.resolve(name)
        else:
            digest = import_gguf(store, gguf, name)
    console.print(describe(store, digest))
    return 0


def cmd_model_list(args: argparse.Namespace) -> int:
    from rich.table import Table

    from common.model_store import ModelStore

    store = ModelStore(Path(args.store).expanduser())
    table = Table(title=f"models in {store.root}")
    for column in ("name", "digest", "layers", "dtype", "size", "tokenizer"):
        table.add_column(column)
    for name in store.names():
        m = store.open(name).manifest
        size = sum(e.size for e in m.files.values())
        table.add_row(name, m.digest[:16], str(m.num_layers), m.dtype, f"{size / 2**20:.0f} MiB",
                      "yes" if m.has_tokenizer else "no")
    console.print(table)
    return 0


def cmd_model_verify(args: argparse.Namespace) -> int:
    from common.model_store import ModelStore

    model = ModelStore(Path(args.store).expanduser()).open(args.model)
    bad = model.missing_or_corrupt()
    if bad:
        err.print(f"[red]{len(bad)} file(s) missing or corrupted:[/red] {', '.join(bad)}")
        return 1
    console.print(f"{model.manifest.name}: all {len(model.manifest.files)} files verified")
    return 0


# ------------------------------------------------------------------ local mesh
def _mesh_spec(args: argparse.Namespace) -> object:
    from splitmesh.launcher import MeshSpec

    host, _, port = args.address.rpartition(":")
    if host not in ("127.0.0.1", "localhost"):
        raise SystemExit("splitmesh up runs a local mesh: --address must be on 127.0.0.1")
    return MeshSpec(nodes=args.nodes, store=Path(args.store), workdir=Path(args.workdir), model=args.model,
                    orchestrator_port=int(port), trusted=args.trusted or ["node-0"], boundaries=args.boundaries or (),
                    placement=args.place or (), threads=args.threads, adaptive=args.adaptive, tls=args.tls)


def _ensure_embedded(store_path: str, model: str) -> None:
    from common.model_import import EMBEDDED_MODEL_NAME, ensure_embedded
    from common.model_store import ModelStore

    store = ModelStore(Path(store_path).expanduser())
    if model == EMBEDDED_MODEL_NAME and model not in store.names():
        console.print(f"importing the embedded model into {store.root} (once)")
    if model == EMBEDDED_MODEL_NAME:
        ensure_embedded(store)


def cmd_up(args: argparse.Namespace) -> int:
    from splitmesh.launcher import LocalMesh

    _ensure_embedded(args.store, args.model)
    mesh = LocalMesh(_mesh_spec(args))  # type: ignore[arg-type]
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with console.status(f"starting orchestrator + {args.nodes} nodes (logs in {mesh.workdir})"):
        try:
            status = mesh.start(args.timeout)
        except (RuntimeError, TimeoutError) as exc:
            mesh.stop()
            err.print(f"[red]mesh failed to start:[/red] {exc}")
            return 1
    console.print(plan_table(status.plan))
    tls_hint = f"--tls-dir {mesh.tls_dir} " if args.tls else ""
    console.print(f"serving on [bold]{mesh.address}[/bold]{' with mutual TLS' if args.tls else ''}; "
                  f"try: splitmesh {tls_hint}generate \"Hello\"   (Ctrl-C stops)")
    try:
        while not stop:
            for name, proc in mesh.processes.items():
                if proc.poll() is not None:
                    err.print(f"[red]{name} exited with {proc.returncode}[/red]")
                    stop = True
            time.sleep(0.5)
    finally:
        console.print("stopping the mesh")
        mesh.stop()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Import the embedded model if needed, start a local mesh, stream one generation, stop."""
    from splitmesh.launcher import LocalMesh, MeshSpec

    _ensure_embedded(args.store, "smollm2-135m-instruct")
    spec = MeshSpec(nodes=args.nodes, store=Path(args.store), workdir=Path(args.workdir), orchestrator_port=0)
    mesh = LocalMesh(spec)
    try:
        with console.status(f"starting orchestrator + {args.nodes} node agents (logs in {mesh.workdir})"):
            status = mesh.start(args.timeout)
        console.print(plan_table(status.plan))
        console.print(f"[bold]prompt:[/bold] {args.prompt}")
        gen_args = argparse.Namespace(address=mesh.address, prompt=args.prompt, raw=False,
                                      max_new_tokens=args.max_new_tokens, temperature=0.0, top_p=1.0, top_k=0,
                                      seed=0, stop=None)
        return cmd_generate(gen_args)
    finally:
        mesh.stop()


# ------------------------------------------------------------------ generation
def cmd_generate(args: argparse.Namespace) -> int:
    prompt: object = args.prompt if args.raw else [{"role": "user", "content": args.prompt}]
    with Client(args.address) as client:
        started = time.perf_counter()
        first_at = None
        count = 0
        last = None
        for event in client.generate(prompt, max_new_tokens=args.max_new_tokens,  # type: ignore[arg-type]
                                     temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                     seed=args.seed, stop=args.stop or ()):
            if first_at is None:
                first_at = time.perf_counter()
            count += 1
            last = event
            sys.stdout.write(event.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
    if last is not None and first_at is not None:
        total = time.perf_counter() - started
        decode = (time.perf_counter() - first_at) / max(1, count - 1)
        err.print(f"[dim]{count} tokens, finish={last.finish_reason}, "
                  f"first token {1000 * (first_at - started):.0f} ms, "
                  f"{1000 * decode:.1f} ms/token after ({1 / decode if decode else 0:.1f} tok/s), total {total:.2f}s, "
                  f"epoch {last.epoch}[/dim]")
    return 0


# ------------------------------------------------------------------ operator
def cmd_status(args: argparse.Namespace) -> int:
    with Client(args.address) as client:
        status = client.status()
    state = "[green]serving[/green]" if status.serving else f"[red]not serving[/red]: {status.reason}"
    console.print(f"model {status.model_name}, epoch {status.plan.epoch}, {state}, "
                  f"EWMA latency {status.ewma_latency_ms:.1f} ms/token")
    if status.plan.segments:
        console.print(plan_table(status.plan))
    console.print(nodes_table(status))
    return 0 if status.serving else 1


def cmd_health(args: argparse.Namespace) -> int:
    """Standard gRPC health check of any splitmesh server (for container and cluster probes)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from common.transport import sync_channel, tls_from_env

    with sync_channel(args.address, tls_from_env()) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        except grpc.RpcError as exc:
            err.print(f"error: {args.address}: {exc.code().name}")
            return 1
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    console.print(f"{args.address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
    return 0 if serving else 1


def cmd_nodes(args: argparse.Namespace) -> int:
    with Client(args.address) as client:
        console.print(nodes_table(client.status()))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    # From the status, not GetPlan: the committed plan is shown even while it cannot route a generation.
    with Client(args.address) as client:
        status = client.status()
    if not status.plan.segments:
        err.print(f"no committed plan: {status.reason}")
        return 1
    console.print(plan_table(status.plan))
    if not status.serving:
        err.print(f"not serving: {status.reason}")
    return 0


def cmd_resplit(args: argparse.Namespace) -> int:
    with Client(args.address) as client:
        reply = client.resplit(args.boundaries or (), args.place or (), dry_run=args.dry_run)
    title = "dry run: plan that would be installed" if args.dry_run else f"committed epoch {reply.plan.epoch}"
    console.print(plan_table(reply.plan, title))
    console.print(f"{reply.reason}; predicted decode step {reply.predicted_ms_old:.2f} ms before, "
                  f"{reply.predicted_ms_new:.2f} ms after")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    with Client(args.address) as client:
        decisions = client.history(args.limit)
    console.print(history_table(decisions))
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    with Client(args.address) as client:
        reply = client.drain(args.node, undo=args.undo)
    if reply.committed:
        console.print(plan_table(reply.plan, f"{args.node} drained: committed epoch {reply.plan.epoch}"))
    else:
        console.print(f"{args.node} {'returned to service' if args.undo else 'drained'}: {reply.reason}")
    return 0


def cmd_policy(args: argparse.Namespace) -> int:
    updates: dict[str, str] = {}
    for item in args.values or []:
        key, sep, value = item.partition("=")
        if not sep:
            err.print(f"error: expected KEY=VALUE, got {item!r}")
            return 2
        updates[key.strip()] = value.strip()
    if args.action == "set" and not updates:
        err.print("error: policy set needs at least one KEY=VALUE")
        return 2
    with Client(args.address) as client:
        values = client.policy(updates)
    console.print(policy_table(values))
    return 0


# ------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitmesh", description="Split inference of language models across boxes.")
    parser.add_argument("--tls-dir", default=None,
                        help="folder with ca.crt and the client certificate: every call uses mutual TLS "
                             f"(env {ENV_TLS_DIR})")
    parser.add_argument("--tls-id", default=None,
                        help=f"name of the client certificate in --tls-dir (default {DEFAULT_CLIENT_ID}, "
                             f"env {ENV_CLIENT_ID})")
    sub = parser.add_subparsers(dest="command", required=True)
    register_certs(sub)

    def with_address(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--address", default=os.environ.get("SPLITMESH_ADDRESS", DEFAULT_ADDRESS),
                       help=f"orchestrator host:port (default {DEFAULT_ADDRESS}, env SPLITMESH_ADDRESS)")
        return p

    up = with_address(sub.add_parser("up", help="run orchestrator + N node agents locally"))
    up.add_argument("--nodes", type=int, default=3, help="node agents to start (default 3)")
    up.add_argument("--store", default=DEFAULT_STORE, help="model store folder")
    up.add_argument("--workdir", default="~/.cache/splitmesh/local", help="state and logs of the local mesh")
    up.add_argument("--model", default="smollm2-135m-instruct", help="model in the store")
    up.add_argument("--trusted", type=_names, help="trusted node ids (default node-0)")
    up.add_argument("--boundaries", type=_ints, help="initial boundaries, e.g. 0,10,20,30")
    up.add_argument("--place", type=_names, help="node per segment, e.g. node-0,node-1,node-0")
    up.add_argument("--threads", type=int, default=0, help="torch threads per node (0 = all cores)")
    up.add_argument("--adaptive", action="store_true",
                    help="run the adaptive loop (off by default locally: all nodes share one machine)")
    up.add_argument("--tls", action="store_true",
                    help="mutual TLS on every channel: a CA and certificates are made in WORKDIR/tls")
    up.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the mesh to serve")
    up.set_defaults(func=cmd_up)

    demo = sub.add_parser("demo", help="start a local mesh on the embedded model, stream a generation, stop")
    demo.add_argument("prompt", nargs="?", default="Explain in two sentences why the sky is blue.")
    demo.add_argument("--nodes", type=int, default=3)
    demo.add_argument("--max-new-tokens", type=int, default=64)
    demo.add_argument("--store", default=DEFAULT_STORE)
    demo.add_argument("--workdir", default="~/.cache/splitmesh/demo")
    demo.add_argument("--timeout", type=float, default=300.0)
    demo.set_defaults(func=cmd_demo)

    gen = with_address(sub.add_parser("generate", help="stream a generation to the terminal"))
    gen.add_argument("prompt")
    gen.add_argument("--raw", action="store_true", help="send the prompt as-is, without the chat template")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.set_defaults(func=cmd_generate)

    for name, func, text in (("status", cmd_status, "mesh health, plan and nodes (exit 0 only when serving)"),
                             ("nodes", cmd_nodes, "registered nodes and their capacity"),
                             ("plan", cmd_plan, "the committed plan"),
                             ("health", cmd_health, "gRPC health check of a server (exit 0 if SERVING)")):
        with_address(sub.add_parser(name, help=text)).set_defaults(func=func)

    resplit = with_address(sub.add_parser("resplit", help="install new boundaries/placement (two-phase)"))
    resplit.add_argument("--boundaries", type=_ints, help="e.g. 0,10,20,30")
    resplit.add_argument("--place", type=_names, help="node per segment")
    resplit.add_argument("--dry-run", action="store_true", help="show the plan without installing it")
    resplit.set_defaults(func=cmd_resplit)

    history = with_address(sub.add_parser("history", help="decisions of the adaptive loop and operator actions"))
    history.add_argument("--limit", type=int, default=30)
    history.set_defaults(func=cmd_history)

    drain = with_address(sub.add_parser("drain", help="move every segment off a node (two-phase)"))
    drain.add_argument("node")
    drain.add_argument("--undo", action="store_true", help="let the node host segments again")
    drain.set_defaults(func=cmd_drain)

    policy = with_address(sub.add_parser("policy", help="read or change the adaptive loop's policy"))
    policy.add_argument("action", choices=["get", "set"])
    policy.add_argument("values", nargs="*", metavar="KEY=VALUE", help="e.g. latency_max_ms=120 cooldown_s=10")
    policy.set_defaults(func=cmd_policy)

    model = sub.add_parser("model", help="the model store").add_subparsers(dest="model_command", required=True)
    imp = model.add_parser("import", help="import the embedded model, a GGUF, a checkpoint dir, or random weights")
    imp.add_argument("--store", default=DEFAULT_STORE)
    source = imp.add_mutually_exclusive_group()
    source.add_argument("--gguf", help="a GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    source.add_argument("--checkpoint", help="a local transformers checkpoint folder")
    source.add_argument("--random", help="random weights with a preset's shapes: llama-3-8b, llama-3-70b, tiny-llama")
    imp.add_argument("--name", help="name to import under")
    imp.add_argument("--layers", type=int, help="override the layer count (random only)")
    imp.add_argument("--seed", type=int, default=0, help="seed for random weights")
    imp.set_defaults(func=cmd_model_import)
    lst = model.add_parser("list", help="models in the store")
    lst.add_argument("--store", default=DEFAULT_STORE)
    lst.set_defaults(func=cmd_model_list)
    ver = model.add_parser("verify", help="check every file's sha256")
    ver.add_argument("model")
    ver.add_argument("--store", default=DEFAULT_STORE)
    ver.set_defaults(func=cmd_model_verify)
    gateway.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from common.store_errors import StoreError  # not common.model_store: `health` probes must not load torch

    args = build_parser().parse_args(argv)
    # Global TLS flags go through the environment so every SDK client in this process (the gateway's too) uses them.
    if args.tls_dir:
        os.environ[ENV_TLS_DIR] = args.tls_dir
    if args.tls_id:
        os.environ[ENV_CLIENT_ID] = args.tls_id
    try:
        code: int = args.func(args)
        return code
    except SplitmeshError as exc:
        if exc.code == "UNAVAILABLE" and "connect" in exc.message.lower():
            err.print(f"error: cannot reach the orchestrator at {getattr(args, 'address', '?')} (is the mesh up?)")
        else:
            err.print(f"error: {exc.code}: {exc.message}")
        return 1
    except StoreError as exc:
        err.print(f"error: {exc}")
        return 1
    except TransportError as exc:
        err.print(f"error: TLS settings: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
