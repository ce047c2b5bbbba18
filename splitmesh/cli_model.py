"""``splitmesh model import|list|verify``: the content-addressed model store on this box."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rich.console import Console

from common.dtypes import WEIGHT_DTYPES
from splitmesh.cli_args import integer

console = Console()
err = Console(stderr=True)
DEFAULT_STORE = os.environ.get("SPLITMESH_STORE", "~/.cache/splitmesh/store")


def cmd_model_import(args: argparse.Namespace) -> int:
    from common.model_import import (
        EMBEDDED_MODEL_NAME,
        default_name,
        describe,
        embedded_gguf_path,
        import_checkpoint,
        import_gguf,
        import_random,
    )
    from common.model_store import ModelStore

    store = ModelStore(Path(args.store).expanduser())
    if args.checkpoint:
        folder = Path(args.checkpoint).expanduser()
        digest = import_checkpoint(store, folder, args.name or folder.name, dtype=args.dtype)
    elif args.random:
        dtype = args.dtype or "bfloat16"
        name = args.name or default_name(args.random, dtype, "bfloat16")
        digest = import_random(store, args.random, name, seed=args.seed, num_layers=args.layers, dtype=dtype)
    else:
        dtype = args.dtype or "float32"
        gguf = Path(args.gguf).expanduser() if args.gguf else embedded_gguf_path()
        name = args.name or default_name(EMBEDDED_MODEL_NAME if not args.gguf else gguf.stem.lower(), dtype)
        if not args.gguf and name in store.names() and not store.open(name).missing_or_corrupt():
            console.print(f"{name} is already in {store.root}")
            digest = store.resolve(name)
        else:
            digest = import_gguf(store, gguf, name, dtype=dtype)
    console.print(describe(store, digest))
    return 0


def cmd_model_list(args: argparse.Namespace) -> int:
    from common.model_store import ModelStore
    from splitmesh.tables import console_for_tables, model_table

    store = ModelStore(Path(args.store).expanduser())
    console_for_tables().print(model_table(store))
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


def cmd_model_encrypt(args: argparse.Namespace) -> int:
    from common.model_store import ModelStore
    from common.store_encryption import encrypt_store

    store = ModelStore(Path(args.store).expanduser())
    moved = encrypt_store(store)
    for old, new in moved.items():
        console.print(f"{store.open(new).manifest.name}: {old[:12]} -> {new[:12]} (weights encrypted)")
    if not moved:
        console.print(f"every model in {store.root} is already encrypted")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``model import``, ``list``, ``verify`` and ``encrypt`` to the ``splitmesh`` parser."""
    model = subparsers.add_parser("model", help="the model store").add_subparsers(dest="model_command",
                                                                                   required=True)
    imp = model.add_parser("import", help="import the embedded model, a GGUF, a checkpoint dir, or random weights")
    imp.add_argument("--store", default=DEFAULT_STORE, help="model store folder (env SPLITMESH_STORE)")
    source = imp.add_mutually_exclusive_group()
    source.add_argument("--gguf", help="a GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    source.add_argument("--checkpoint", help="a local transformers checkpoint folder")
    source.add_argument("--random", help="random weights with a preset's shapes: llama-3-8b, llama-3-70b, tiny-llama")
    imp.add_argument("--name", help="name to import under")
    imp.add_argument("--layers", type=integer(1), help="override the layer count (random only)")
    imp.add_argument("--dtype", choices=WEIGHT_DTYPES, help="weight dtype (int8: weight-only, computes in bfloat16); "
                     "default: float32 for a GGUF, the checkpoint's own, bfloat16 for random; names get -DTYPE")
    imp.add_argument("--seed", type=integer(0), default=0, help="seed for random weights")
    imp.set_defaults(func=cmd_model_import)
    lst = model.add_parser("list", help="models in the store")
    lst.add_argument("--store", default=DEFAULT_STORE, help="model store folder (env SPLITMESH_STORE)")
    lst.set_defaults(func=cmd_model_list)
    ver = model.add_parser("verify", help="check every file's sha256")
    ver.add_argument("model", help="name or digest")
    ver.add_argument("--store", default=DEFAULT_STORE, help="model store folder (env SPLITMESH_STORE)")
    ver.set_defaults(func=cmd_model_verify)
    enc = model.add_parser("encrypt", help="encrypt a plaintext store's weights at rest (idempotent, blob by blob); "
                           "the keys go to the store's weight_keys.json")
    enc.add_argument("--store", default=DEFAULT_STORE, help="model store folder (env SPLITMESH_STORE)")
    enc.set_defaults(func=cmd_model_encrypt)
