"""Data-plane and input attacks against a live mutual-TLS mesh, each while a normal generation runs.

Per attack: what the attacker's calls ended with, whether the normal generation still produced the
single-process tokens and how long it took against the same generation without an attack, the head's
worst event-loop stall (its Info round trip), the nodes' RSS at the peak and after the attack, and
node-1's CPU seconds. The attacker holds real certificates of the cluster: node-0's (the predecessor of
node-1's segment) or a second client's. The mesh is two nodes; node-0 heads it and also hosts the tail.

    .venv/bin/python bench/attacks.py
    .venv/bin/python bench/attacks.py --attacks silent-opens,generate-flood --tokens 16

It only uses the wire protocol, so the same script measures any version of the nodes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import certs
from common.certs import Identity
from common.chat import text_token_ids
from common.frame_crypto import Direction, HopSealer, public_key_from_bytes
from common.hop_codec import POSITION, SealedHopSender
from common.model_import import EMBEDDED_MODEL_NAME, ensure_embedded
from common.model_store import ModelStore
from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from common.reference_model import load_reference_model
from common.tls import TlsConfig
from common.transport import aio_channel, sync_channel
from splitmesh import SplitmeshError
from splitmesh.launcher import LocalMesh, MeshSpec

HIDDEN = 576
PROMPT = "The lighthouse keeper looked at the sea and"
NODE1 = Identity("node", "node-1")
HEAD = Identity("node", "node-0")
SETTLE_S = 3.0  # after the last session is gone, before the "after" RSS is read


@dataclass
class Ctx:
    mesh: LocalMesh
    epoch: int
    key: X25519PublicKey  # node-1's frame key from the plan
    prompt: list[int]
    hold_s: float  # the longest an attacker keeps a stream open
    session_ids: list[str] = field(default_factory=list)  # the normal generation's, once known

    def tls(self, name: str) -> TlsConfig:
        return TlsConfig.from_dir(self.mesh.tls_dir, name)

    def node1(self) -> grpc.aio.Channel:
        return aio_channel(self.mesh.node_addresses["node-1"], self.tls("node-0"), NODE1)

    def head(self, name: str = "client") -> grpc.aio.Channel:
        return aio_channel(self.mesh.node_addresses["node-0"], self.tls(name), HEAD)


Codes = collections.Counter[str]


async def _stream(channel: grpc.aio.Channel, messages: list[pb.ForwardRequest], hold_s: float) -> str:
    """Send ``messages`` on a Forward stream and keep it open until the node ends it (or ``hold_s``)."""
    async def requests() -> AsyncIterator[pb.ForwardRequest]:
        for message in messages:
            yield message
        await asyncio.sleep(hold_s)

    try:
        async for _ in pb_grpc.NodeStub(channel).Forward(requests(), timeout=hold_s):
            pass
    except grpc.aio.AioRpcError as exc:
        return str(exc.code().name)
    return "OK"


def _open(ctx: Ctx, name: str, envelope: bytes) -> pb.ForwardRequest:
    return pb.ForwardRequest(open=pb.ForwardOpen(session_id=name, epoch=ctx.epoch, segment_index=1,
                                                 key_envelope=envelope))


def _sealed(sealer: HopSealer, shape: tuple[int, ...], count: int, index: int, data: bytes,
            position: int = 0) -> pb.ForwardRequest:
    header, ciphertext = sealer.seal(step=0, dtype="float32", shape=shape, plaintext=POSITION.pack(position) + data,
                                     chunk_index=index, chunk_count=count)
    return pb.ForwardRequest(frame=pb.ActivationFrame(header=header, ciphertext=ciphertext))


async def _streams(ctx: Ctx, build: Callable[[int, HopSealer], list[pb.ForwardRequest]], count: int) -> Codes:
    async with ctx.node1() as channel:
        sealers = [HopSealer(ctx.key, f"attack-{i}", ctx.epoch, Direction.FORWARD, hop=1) for i in range(count)]
        plans = [[_open(ctx, f"attack-{i}", s.key_envelope()), *build(i, s)] for i, s in enumerate(sealers)]
        return collections.Counter(await asyncio.gather(*(_stream(channel, m, ctx.hold_s) for m in plans)))


async def silent_opens(ctx: Ctx) -> Codes:
    """64 ForwardOpens that never send a frame (once: every client locked out for 300 s)."""
    return await _streams(ctx, lambda i, s: [], 64)


async def stalled_tensors(ctx: Ctx) -> Codes:
    """64 streams that send the first half of a one-row tensor, then nothing."""
    return await _streams(ctx, lambda i, s: [_sealed(s, (1, 1, HIDDEN), 2, 0, b"\0" * (2 * HIDDEN))], 64)


async def open_race(ctx: Ctx) -> Codes:
    """200 streams at once, each a valid one-row prefill and then silence, while the normal generation
    keeps node-1's compute thread busy (once: 278 sessions against a limit of 64)."""
    async with ctx.node1() as channel:
        senders = [SealedHopSender(ctx.key, f"race-{i}", ctx.epoch, 1) for i in range(200)]
        plans = [[_open(ctx, f"race-{i}", s.key_envelope()), *s.requests(0, 0, torch.zeros(1, 1, HIDDEN), 1 << 20)]
                 for i, s in enumerate(senders)]
        return collections.Counter(await asyncio.gather(*(_stream(channel, m, ctx.hold_s) for m in plans)))


async def oversized_rows(ctx: Ctx) -> Codes:
    """2 streams declaring 200,000 rows (460 MB) and sending 128 MiB each (once: buffered before the rows check)."""
    shape = (1, 200_000, HIDDEN)
    return await _streams(ctx, lambda i, s: [_sealed(s, shape, 440, c, b"\0" * (1 << 20)) for c in range(128)], 2)


async def buffer_flood(ctx: Ctx) -> Codes:
    """64 streams, each all but the last chunk of a 6,000-row prefill (13 of 14 MiB), then nothing."""
    shape, size = (1, 6000, HIDDEN), 6000 * HIDDEN * 4
    chunks = [b"\0" * (1 << 20)] * (size >> 20)
    return await _streams(ctx, lambda i, s: [_sealed(s, shape, len(chunks) + 1, c, d) for c, d in enumerate(chunks)],
                          64)


async def empty_chunks(ctx: Ctx) -> Codes:
    """One tensor of one row in 45,000 empty chunks (once: 46 CPU-seconds of re-summing)."""
    return await _streams(ctx, lambda i, s: [_sealed(s, (1, 1, HIDDEN), 45_000, c, b"") for c in range(45_000)], 1)


async def positions(ctx: Ctx) -> Codes:
    """16 streams whose first prefill sits at positions 8,160..8,224 of a model with 8,192 (once: computed,
    and KV caches grew past the model's positions)."""
    return await _streams(ctx, lambda i, s: [_sealed(s, (1, 64, HIDDEN), 1, 0, b"\0" * (64 * HIDDEN * 4), 8160)], 16)


async def _generates(ctx: Ctx, requests: list[bytes], name: str = "client") -> Codes:
    async with ctx.head(name) as channel:
        call = channel.unary_stream("/splitmesh.v1.Node/Generate")

        async def one(raw: bytes) -> str:
            try:
                async for _ in call(raw, timeout=ctx.hold_s):
                    pass
            except grpc.aio.AioRpcError as exc:
                return str(exc.code().name)
            return "OK"

        return collections.Counter(await asyncio.gather(*(one(r) for r in requests)))


def _request(**fields: object) -> bytes:
    return pb.GenerateRequest(**fields).SerializeToString()  # type: ignore[arg-type]


async def big_prompt(ctx: Ctx) -> Codes:
    """4 prompts of 7.5 MB each (once: 6.7 s of tokenizing on the head's event loop, per prompt)."""
    return await _generates(ctx, [_request(prompt="word " * 1_500_000, max_new_tokens=4)] * 4)


async def many_messages(ctx: Ctx) -> Codes:
    """4 chats of 100,000 messages each (once: 2.3 s of chat template on the event loop, per request)."""
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")] * 100_000)
    return await _generates(ctx, [_request(messages=chat, max_new_tokens=4)] * 4)


async def generate_flood(ctx: Ctx) -> Codes:
    """200 concurrent Generate calls of 16 tokens (once: refused only after a full-ring prefill, some hung)."""
    started = time.perf_counter()
    request = _request(token_ids=pb.TokenIds(ids=ctx.prompt), max_new_tokens=16, ignore_eos=True)
    async with ctx.head() as channel:
        call = channel.unary_stream("/splitmesh.v1.Node/Generate")

        async def one() -> str:
            try:
                async for _ in call(request, timeout=ctx.hold_s):
                    pass
            except grpc.aio.AioRpcError as exc:
                late = time.perf_counter() - started > 1.0
                downstream = "node-1" in (exc.details() or "")
                return str(exc.code().name) + (" after 1 s" if late else "") + (" from node-1" if downstream else "")
            return "OK"

        return collections.Counter(await asyncio.gather(*(one() for _ in range(200))))


async def foreign_cancel(ctx: Ctx) -> Codes:
    """Another client's certificate, and node-1's, cancel the normal generation every 50 ms while it runs."""
    codes: Codes = collections.Counter()
    deadline = time.monotonic() + 30
    while not ctx.session_ids and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    for name in ("mallory", "node-1"):
        async with ctx.head(name) as channel:
            stub = pb_grpc.NodeStub(channel)
            for _ in range(20):
                try:
                    await stub.Cancel(pb.CancelRequest(session_id=ctx.session_ids[0]), timeout=10)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code().name] += 1
                await asyncio.sleep(0.05)
    return codes


async def garbage(ctx: Ctx) -> Codes:
    """200 undecodable Forward streams and 200 prompts of invalid UTF-8."""
    async with ctx.node1() as channel:
        forward = channel.stream_stream("/splitmesh.v1.Node/Forward")

        async def one() -> str:
            try:
                async for _ in forward(iter([b"\xff\xff\xff\x00garbage"]), timeout=30):
                    pass
            except grpc.aio.AioRpcError as exc:
                return str(exc.code().name)
            return "OK"

        codes = collections.Counter(await asyncio.gather(*(one() for _ in range(200))))
    return codes + await _generates(ctx, [b"\x0a\x04hi\xff\xfe\x20\x04"] * 200)


async def bad_sampling(ctx: Ctx) -> Codes:
    """100 requests each with top_p NaN and top_p -0.5 (once: silently sampled with top_p 1)."""
    requests = [_request(token_ids=pb.TokenIds(ids=ctx.prompt), max_new_tokens=4,
                         sampling=pb.SamplingParams(temperature=0.7, top_p=top_p))
                for top_p in (float("nan"), -0.5) for _ in range(100)]
    return await _generates(ctx, requests)


ATTACKS: dict[str, Callable[[Ctx], Awaitable[Codes]]] = {
    "silent-opens": silent_opens, "stalled-tensors": stalled_tensors, "open-race": open_race,
    "oversized-rows": oversized_rows, "buffer-flood": buffer_flood, "empty-chunks": empty_chunks,
    "positions": positions, "big-prompt": big_prompt, "many-messages": many_messages,
    "generate-flood": generate_flood, "foreign-cancel": foreign_cancel, "garbage": garbage,
    "bad-sampling": bad_sampling,
}
NORMAL_FIRST = {"open-race", "foreign-cancel"}  # the attack needs the normal generation under way


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _normal(ctx: Ctx, tokens: int, out: dict[str, object]) -> None:
    started = time.perf_counter()
    try:
        with ctx.mesh.client(300) as client:
            ids = []
            for event in client.generate(ctx.prompt, max_new_tokens=tokens, ignore_eos=True):
                ctx.session_ids.append(event.session_id)
                ids.append(event.token_id)
        out["tokens"] = ids
    except SplitmeshError as exc:
        out["error"] = f"{exc.code}: {exc.message[:80]}"
    out["seconds"] = time.perf_counter() - started


def _sessions(ctx: Ctx, node_id: str) -> int:
    with sync_channel(ctx.mesh.node_addresses[node_id], ctx.tls("client"), Identity("node", node_id)) as channel:
        return int(pb_grpc.NodeStub(channel).Info(pb.NodeInfoRequest(), timeout=10).active_sessions)


async def _monitor(ctx: Ctx, pids: dict[str, int], stop: asyncio.Event, figures: dict[str, float]) -> None:
    """Peak RSS of every node and the head's slowest Info round trip, every 100 ms."""
    async with ctx.head() as channel:
        stub = pb_grpc.NodeStub(channel)
        while not stop.is_set():
            started = time.perf_counter()
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.Info(pb.NodeInfoRequest(), timeout=30)
            figures["head_stall_ms"] = max(figures.get("head_stall_ms", 0.0), (time.perf_counter() - started) * 1e3)
            for node, pid in pids.items():
                figures[f"{node}_peak_mb"] = max(figures.get(f"{node}_peak_mb", 0.0), _rss_mb(pid))
            await asyncio.sleep(0.1)


async def run_attack(ctx: Ctx, name: str, tokens: int, pids: dict[str, int]) -> dict[str, object]:
    ctx.session_ids.clear()
    before = {node: _rss_mb(pid) for node, pid in pids.items()}
    cpu_before = _cpu_s(pids["node-1"])
    figures: dict[str, float] = {}
    stop = asyncio.Event()
    monitor = asyncio.ensure_future(_monitor(ctx, pids, stop, figures))
    normal: dict[str, object] = {}
    worker = threading.Thread(target=_normal, args=(ctx, tokens, normal))
    if name in NORMAL_FIRST:
        worker.start()
        await asyncio.sleep(0.3)
        attack = asyncio.ensure_future(ATTACKS[name](ctx))
    else:
        attack = asyncio.ensure_future(ATTACKS[name](ctx))
        await asyncio.sleep(0.3)
        worker.start()
    codes = await attack
    await asyncio.to_thread(worker.join)
    stop.set()
    await monitor
    deadline = time.monotonic() + 60
    while any(_sessions(ctx, n) for n in pids) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    await asyncio.sleep(SETTLE_S)
    after = {node: _rss_mb(pid) for node, pid in pids.items()}
    return {"codes": dict(codes), "normal": normal, "node1_cpu_s": _cpu_s(pids["node-1"]) - cpu_before,
            **{f"{n}_before_mb": v for n, v in before.items()}, **{f"{n}_after_mb": v for n, v in after.items()},
            **figures}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated, from: " + ", ".join(ATTACKS))
    parser.add_argument("--tokens", type=int, default=16, help="tokens of the normal generation")
    parser.add_argument("--hold-s", type=float, default=20.0, help="longest an attacker holds a stream")
    parser.add_argument("--store", type=Path, default=Path("~/.cache/splitmesh/store").expanduser())
    args = parser.parse_args()
    names = [n for n in args.attacks.split(",") if n]
    console = Console(stderr=True)
    store = ModelStore(args.store)
    ensure_embedded(store)
    stored = store.open(EMBEDDED_MODEL_NAME)
    reference = load_reference_model(stored)
    tokenizer_dir = stored.export_tokenizer(Path(tempfile.mkdtemp(prefix="attacks-tok-")))
    from transformers import AutoTokenizer
    prompt = text_token_ids(AutoTokenizer.from_pretrained(str(tokenizer_dir)), PROMPT)
    with torch.inference_mode():
        mask = torch.ones(1, len(prompt), dtype=torch.long)
        out = reference.generate(  # type: ignore[operator]
            torch.tensor([prompt]), attention_mask=mask, max_new_tokens=args.tokens, do_sample=False,
            pad_token_id=reference.config.eos_token_id)
    expected = [int(t) for t in out[0, len(prompt):]]
    del reference
    spec = MeshSpec(nodes=2, store=store.root, workdir=Path(tempfile.mkdtemp(prefix="attacks-mesh-")),
                    orchestrator_port=0, trusted=("node-0",), boundaries=(0, 10, 20, 30),
                    placement=("node-0", "node-1", "node-0"), tls=True)
    results: dict[str, dict[str, object]] = {}
    with LocalMesh(spec) as mesh:
        certs.issue(mesh.tls_dir, "mallory", "client")
        with mesh.client() as client:
            plan = client.plan()
        key = public_key_from_bytes(next(n.x25519_public_key for n in plan.nodes if n.node_id == "node-1"))
        ctx = Ctx(mesh, plan.epoch, key, prompt, args.hold_s)
        pids = {n: mesh.processes[n].pid for n in ("node-0", "node-1")}
        baseline = []
        for _ in range(3):
            normal: dict[str, object] = {}
            _normal(ctx, args.tokens, normal)
            if normal.get("tokens") != expected:
                raise SystemExit(f"the mesh does not reproduce the reference tokens without an attack: {normal}")
            baseline.append(float(normal["seconds"]))  # type: ignore[arg-type]
        base_s = statistics.median(baseline)
        for name in names:
            console.print(f"attack {name} ...")
            results[name] = asyncio.run(run_attack(ctx, name, args.tokens, pids))
    table = Table(title=f"attacks during a {args.tokens}-token generation (normal alone: {base_s:.2f} s)")
    for column in ("attack", "attacker got", "normal exact", "normal s", "x normal", "head stall ms",
                   "node-1 peak +MB", "node-0 after +MB", "node-1 after +MB", "node-1 CPU s"):
        table.add_column(column, justify="right")
    figures: dict[str, object] = {"baseline_s": base_s, "tokens": args.tokens}
    for name, r in results.items():
        normal = r["normal"]  # type: ignore[assignment]
        exact = normal.get("tokens") == expected
        seconds = float(normal["seconds"])  # type: ignore[arg-type]
        codes = ", ".join(f"{v}x {k}" for k, v in sorted(r["codes"].items()))  # type: ignore[attr-defined]
        row = {"codes": r["codes"], "normal_exact": exact, "normal_error": normal.get("error", ""),
               "normal_s": seconds, "ratio": seconds / base_s, "head_stall_ms": r["head_stall_ms"],
               "node1_peak_delta_mb": float(r["node-1_peak_mb"]) - float(r["node-1_before_mb"]),  # type: ignore[arg-type]
               "node0_after_delta_mb": float(r["node-0_after_mb"]) - float(r["node-0_before_mb"]),  # type: ignore[arg-type]
               "node1_after_delta_mb": float(r["node-1_after_mb"]) - float(r["node-1_before_mb"]),  # type: ignore[arg-type]
               "node1_cpu_s": r["node1_cpu_s"]}
        figures[name] = row
        table.add_row(name, codes, "yes" if exact else f"NO {row['normal_error']}", f"{seconds:.2f}",
                      f"{row['ratio']:.2f}", f"{row['head_stall_ms']:.0f}", f"{row['node1_peak_delta_mb']:.0f}",
                      f"{row['node0_after_delta_mb']:.0f}", f"{row['node1_after_delta_mb']:.0f}",
                      f"{row['node1_cpu_s']:.1f}")
    Console(width=220).print(table)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
