"""The ``splitmesh`` command: run a local mesh, generate, and operate a running cluster."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from rich.console import Console

from common.tls import TlsConfig
from common.transport import ENV_CLIENT_ID, ENV_OPERATOR_ID, ENV_TLS_DIR, TransportError
from splitmesh import cli_tls, gateway
from splitmesh.certs_cli import register as register_certs
from splitmesh.cli_args import UINT32_MAX, UINT64_MAX, Parser, ints, names, number
from splitmesh.cli_args import integer as int_in
from splitmesh.cli_model import register as register_model
from splitmesh.cli_up import register as register_up
from splitmesh.client import DEFAULT_ADDRESS, Client, Messages, SplitmeshError
from splitmesh.tables import console_for_tables, forecast_table, history_table, nodes_table, plan_table, policy_table

console = console_for_tables()
err = Console(stderr=True)
MUTATING = ("resplit", "drain")  # and `policy set`: commands that present the operator certificate
HISTORY_KINDS = ("keep", "migrate", "resplit", "infeasible", "operator", "node-lost", "link-lost")


def _client(args: argparse.Namespace) -> Client:
    return Client(args.address, tls=args.tls)


# ------------------------------------------------------------------ generation
def generate(client: Client, prompt: str | Messages, *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int = 0, stop: Sequence[str] = ()) -> int:
    """Stream one generation to stdout and a one-line summary to stderr."""
    started = time.perf_counter()
    first_at = None
    count = 0
    last = None
    for event in client.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 top_k=top_k, seed=seed, stop=stop):
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


def cmd_generate(args: argparse.Namespace) -> int:
    prompt: str | Messages = args.prompt if args.raw else [{"role": "user", "content": args.prompt}]
    with _client(args) as client:
        return generate(client, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop or ())


# ------------------------------------------------------------------ operator
def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.status()
    state = "[green]serving[/green]" if status.serving else f"[red]not serving[/red]: {status.reason}"
    ewma = (f"{status.ewma_latency_ms:.1f} ms/token" if status.HasField("ewma_latency_ms")
            else "no token measured on this plan yet")
    console.print(f"model {status.model_name}, epoch {status.plan.epoch}, {state}, EWMA latency {ewma}")
    if status.plan.segments:
        console.print(plan_table(status.plan))
    console.print(nodes_table(status))
    return 0 if status.serving else 1


def cmd_health(args: argparse.Namespace) -> int:
    """Standard gRPC health check of any splitmesh server (for container and cluster probes)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from common.transport import sync_channel

    with sync_channel(args.address, args.tls) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        except grpc.RpcError as exc:
            unavailable = exc.code() == grpc.StatusCode.UNAVAILABLE
            problem = cli_tls.connection_problem(args.address, args.tls, "a server") if unavailable else None
            err.print(f"error: {problem or f'{args.address}: {exc.code().name}'}")
            return 1
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    console.print(f"{args.address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
    return 0 if serving else 1


def cmd_nodes(args: argparse.Namespace) -> int:
    with _client(args) as client:
        console.print(nodes_table(client.status()))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    # From the status, not GetPlan: the committed plan is shown even while it cannot route a generation.
    with _client(args) as client:
        status = client.status()
    if not status.plan.segments:
        err.print(f"no committed plan: {status.reason}")
        return 1
    console.print(plan_table(status.plan))
    if not status.serving:
        err.print(f"not serving: {status.reason}")
    return 0


def cmd_resplit(args: argparse.Namespace) -> int:
    with _client(args) as client:
        reply = client.resplit(args.boundaries or (), args.place or (), dry_run=args.dry_run)
    title = "dry run: plan that would be installed" if args.dry_run else f"committed epoch {reply.plan.epoch}"
    console.print(plan_table(reply.plan, title))
    console.print(forecast_table(reply))
    console.print(reply.reason)
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    with _client(args) as client:
        decisions = client.history(args.limit, kinds=args.kind or ())
    console.print(history_table(decisions))
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    with _client(args) as client:
        reply = client.drain(args.node, undo=args.undo)
    if reply.committed:
        console.print(plan_table(reply.plan, f"{args.node} drained: committed epoch {reply.plan.epoch}"))
    else:
        console.print(f"{args.node} {'returned to service' if args.undo else 'drained'}: {reply.reason}")
    return 0


def cmd_policy(args: argparse.Namespace) -> int:
    updates: dict[str, str] = {}
    for item in getattr(args, "values", None) or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            err.print(f"error: expected KEY=VALUE, got {item!r}")
            return 2
        updates[key.strip()] = value.strip()
    with _client(args) as client:
        values = client.policy(updates)
    console.print(policy_table(values))
    return 0


# ------------------------------------------------------------------ parser
def _add_tls_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The TLS options, accepted before or after the sub-command (SUPPRESS keeps a top-level value)."""
    default = None if top else argparse.SUPPRESS
    parser.add_argument("--tls-dir", default=default,
                        help=f"folder with ca.crt and your certificate (env {ENV_TLS_DIR}; default: the folder of "
                             "the mesh `splitmesh up` runs at --address on this box, else plaintext)")
    parser.add_argument("--tls-id", default=default,
                        help=f"certificate name in the folder (default: operator for commands that change the mesh, "
                             f"env SPLITMESH_OPERATOR_ID; client for the others, env {ENV_CLIENT_ID})")


def build_parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = Parser(prog="splitmesh",
                                             description="Split inference of language models across boxes.")
    _add_tls_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    address_default = os.environ.get("SPLITMESH_ADDRESS", DEFAULT_ADDRESS)

    def client_command(subs: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
                       text: str) -> argparse.ArgumentParser:
        p = subs.add_parser(name, help=text, description=text)
        p.add_argument("--address", default=address_default,
                       help=f"orchestrator host:port (default {DEFAULT_ADDRESS}, env SPLITMESH_ADDRESS)")
        _add_tls_options(p, top=False)
        return p

    register_up(sub, address_default)

    gen = client_command(sub, "generate", "stream a generation to the terminal")
    gen.add_argument("prompt")
    gen.add_argument("--raw", action="store_true", help="send the prompt as-is, without the chat template")
    gen.add_argument("--max-new-tokens", type=int_in(1, UINT32_MAX), default=128)
    gen.add_argument("--temperature", type=number(0.0), default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=number(0.0, 1.0), default=1.0, help="nucleus sampling (1 = off)")
    gen.add_argument("--top-k", type=int_in(0, UINT32_MAX), default=0, help="0 = off")
    gen.add_argument("--seed", type=int_in(0, UINT64_MAX), default=0)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.set_defaults(func=cmd_generate)

    for name, func, text in (("status", cmd_status, "mesh health, plan and nodes (exit 0 only when serving)"),
                             ("nodes", cmd_nodes, "registered nodes and their capacity"),
                             ("plan", cmd_plan, "the committed plan"),
                             ("health", cmd_health, "gRPC health check of a server (exit 0 if SERVING)")):
        client_command(sub, name, text).set_defaults(func=func)

    resplit = client_command(sub, "resplit", "install new boundaries/placement (two-phase; operator certificate)")
    resplit.add_argument("--boundaries", type=ints, help="e.g. 0,10,20,30")
    resplit.add_argument("--place", type=names, help="node per segment")
    resplit.add_argument("--dry-run", action="store_true", help="show the plan without installing it")
    resplit.set_defaults(func=cmd_resplit)

    history = client_command(sub, "history", "decisions of the adaptive loop and operator actions")
    history.add_argument("--limit", type=int_in(1, 1000), default=30, help="newest decisions to show (default 30)")
    history.add_argument("--kind", type=names, help=f"only these kinds, comma-separated ({', '.join(HISTORY_KINDS)})")
    history.set_defaults(func=cmd_history)

    drain = client_command(sub, "drain", "move every segment off a node (two-phase; operator certificate)")
    drain.add_argument("node")
    drain.add_argument("--undo", action="store_true", help="let the node host segments again")
    drain.set_defaults(func=cmd_drain)

    policy = sub.add_parser("policy", help="read or change the adaptive loop's policy")
    policy_sub = policy.add_subparsers(dest="action", required=True, metavar="get|set")
    client_command(policy_sub, "get", "the policy's values").set_defaults(func=cmd_policy)
    policy_set = client_command(policy_sub, "set", "change policy values, validated as a whole (operator certificate)")
    policy_set.add_argument("values", nargs="+", metavar="KEY=VALUE", help="e.g. latency_max_ms=120 cooldown_s=10")
    policy_set.set_defaults(func=cmd_policy)

    register_model(sub)
    register_certs(sub)
    gateway.register(sub)
    return parser


def _is_operator_call(args: argparse.Namespace) -> bool:
    return args.command in MUTATING or (args.command == "policy" and args.action == "set")


def _tls(args: argparse.Namespace) -> TlsConfig | None:
    """The certificate this command presents to its --address (see splitmesh.cli_tls)."""
    operator = _is_operator_call(args)
    try:
        return cli_tls.resolve(args.tls_dir, args.tls_id, args.address, operator)
    except TransportError as exc:
        if not operator:
            raise
        folder, _ = cli_tls.tls_folder(args.tls_dir, args.address)
        hint = f"splitmesh certs issue operator --kind operator --dir {folder}"
        if args.tls_id or os.environ.get(ENV_OPERATOR_ID):
            raise TransportError(f"{exc}; this command changes the mesh and presents an operator certificate: "
                                 f"{hint}") from exc
        # A folder made before operator certificates existed: try the client one, which a mesh that checks roles
        # refuses with PERMISSION_DENIED (and says so).
        err.print(f"[yellow]no operator certificate in {folder}: presenting the client one ({hint})[/yellow]")
        return cli_tls.resolve(args.tls_dir, args.tls_id, args.address, operator=False)


def _mesh_error(args: argparse.Namespace, exc: SplitmeshError) -> str:
    address = getattr(args, "address", "?")
    if exc.code == "UNAVAILABLE":
        problem = cli_tls.connection_problem(address, getattr(args, "tls", None))
        if problem is not None:
            return f"error: {problem}"
    return f"error: {exc.code}: {exc.message}"


def main(argv: Sequence[str] | None = None) -> int:
    from common.store_errors import StoreError  # not common.model_store: `health` probes must not load torch
    from splitmesh.launcher import MeshStartError

    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "address") and args.command not in ("up", "demo"):
            args.tls = _tls(args)
            if args.command == "gateway" and args.tls is not None:
                # The gateway's AsyncClient reads the environment: hand it what was resolved here.
                os.environ[ENV_TLS_DIR] = str(args.tls.ca.parent)
                os.environ[ENV_CLIENT_ID] = args.tls.cert.stem
        code: int = args.func(args)
        return code
    except SplitmeshError as exc:
        err.print(_mesh_error(args, exc))
        return 1
    except (StoreError, MeshStartError) as exc:
        err.print(f"error: {exc}")
        return 1
    except TransportError as exc:
        err.print(f"error: TLS settings: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
