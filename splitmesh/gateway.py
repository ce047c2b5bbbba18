"""``splitmesh gateway``: an OpenAI-compatible HTTP API in front of a mesh.

It runs on a trusted box next to the head (prompts and completions pass through it in clear) and
speaks gRPC to the mesh through one shared :class:`splitmesh.AsyncClient`. Sampling follows OpenAI's
semantics, not the SDK's: ``temperature`` defaults to 1.0 and an absent ``seed`` is drawn at random,
so pass ``temperature=0`` for greedy decoding. FastAPI and uvicorn are imported only when the gateway
is built, so registering the subcommand keeps the rest of the CLI quick to start.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from splitmesh.cli_args import integer
from splitmesh.client import DEFAULT_ADDRESS

if TYPE_CHECKING:
    from fastapi import FastAPI

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_TOKENS = 512  # chat completions without max_tokens / max_completion_tokens


def build_app(mesh_address: str, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> FastAPI:
    """The ASGI app serving /v1/models, /v1/chat/completions and /v1/completions for the mesh at ``mesh_address``."""
    from splitmesh.gateway_app import create_app

    return create_app(mesh_address, default_max_tokens)


def serve(mesh_address: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          default_max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
    """Serve the gateway until interrupted (uvicorn handles SIGINT/SIGTERM and drains open requests)."""
    import uvicorn

    uvicorn.run(build_app(mesh_address, default_max_tokens), host=host, port=port, log_level="info")


def cmd_gateway(args: argparse.Namespace) -> int:
    serve(args.address, args.host, args.port, args.default_max_tokens)
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``splitmesh gateway`` to the CLI's subcommands."""
    parser = subparsers.add_parser("gateway", help="serve an OpenAI-compatible HTTP API (/v1/chat/completions, ...)")
    parser.add_argument("--address", default=os.environ.get("SPLITMESH_ADDRESS", DEFAULT_ADDRESS),
                        help=f"orchestrator host:port (default {DEFAULT_ADDRESS}, env SPLITMESH_ADDRESS)")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"HTTP listen host (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=integer(1, 65535), default=DEFAULT_PORT,
                        help=f"HTTP listen port (default {DEFAULT_PORT})")
    parser.add_argument("--default-max-tokens", type=integer(1), default=DEFAULT_MAX_TOKENS,
                        help=f"max tokens of a chat completion that sets none (default {DEFAULT_MAX_TOKENS})")
    parser.set_defaults(func=cmd_gateway)
