"""What one hop costs with nothing of splitmesh in it: a bare gRPC aio bidi stream between two processes.

The echo server answers each 576-float frame, and the client reports its round trip minus the server's own
time: the same quantity as the mesh's per-hop overhead, without framing, encryption, metrics or the ring's
bookkeeping. Three cases: back to back; with the client idle for a decode step's length between round
trips (so both processes' threads go to sleep, as every waiting node's do in a mesh); and with the server
running a decode step of a real 10-layer segment between request and reply. Beside the mesh figure it
tells how much of the per-hop cost is the runtime and the box (waking sleeping threads across processes)
and how much is splitmesh's own code.

    .venv/bin/python -m bench.transport_floor
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.proto import splitmesh_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Node"].full_name
HIDDEN = 576
SPAN = (10, 20)  # the segment whose decode step the server runs
IDLE_GAP_S = 0.013  # about one 10-layer decode step of the embedded model here


def _serve(port: int, store_root: str, model: str, compute: bool, ready: mp.synchronize.Event) -> None:
    import torch

    from common.model_store import ModelStore
    from common.spans import Span
    from node_agent.segment import SegmentRunner

    runner = SegmentRunner(ModelStore(Path(store_root)).open(model), Span(*SPAN)) if compute else None
    cache = runner.new_cache() if runner else None
    state = {"position": 0}
    step_input = torch.zeros(1, 1, HIDDEN)

    def work() -> None:
        if runner is None or cache is None:
            return
        if state["position"] >= 1800:  # keep the cache (and the step's cost) within what decode sees
            cache.crop(32)
            state["position"] = 32
        runner.run(cache, step_input, state["position"])
        state["position"] += 1

    async def forward(request_iterator: AsyncIterator[pb.ForwardRequest],
                      context: grpc.aio.ServicerContext[pb.ForwardRequest, pb.TokenFrame],
                      ) -> AsyncIterator[pb.TokenFrame]:
        loop = asyncio.get_running_loop()
        async for request in request_iterator:
            started = time.perf_counter()
            await loop.run_in_executor(None, work)
            # The answer is a token frame, as a tail sends one per step; its compute_s is the server's time.
            yield pb.TokenFrame(step=request.frame.step, token_id=1, compute_s=time.perf_counter() - started)

    handler = grpc.stream_stream_rpc_method_handler(forward, request_deserializer=pb.ForwardRequest.FromString,
                                                    response_serializer=pb.TokenFrame.SerializeToString)

    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Forward": handler}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(main())


async def _round_trips(port: int, count: int, gap_s: float) -> list[float]:
    payload = bytes(HIDDEN * 4)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(f"/{SERVICE}/Forward", request_serializer=pb.ForwardRequest.SerializeToString,
                                     response_deserializer=pb.TokenFrame.FromString)()
        overheads = []
        for step in range(count):
            started = time.perf_counter()
            frame = pb.ActivationFrame(step=step, tensor=pb.TensorChunk(dtype="float32", shape=[1, 1, HIDDEN],
                                                                        data=payload))
            await call.write(pb.ForwardRequest(frame=frame))
            reply = await call.read()
            assert isinstance(reply, pb.TokenFrame)
            overheads.append(time.perf_counter() - started - reply.compute_s)
            if gap_s:
                await asyncio.sleep(gap_s)
        call.cancel()
    return overheads


def measure(store_root: Path, model: str, compute: bool, gap_s: float = 0.0, count: int = 300) -> float:
    """Median round trip minus the server's time, in ms (the first 30 steps are warm-up)."""
    from splitmesh.launcher import free_port

    port = free_port()
    context = mp.get_context("spawn")
    ready = context.Event()
    server = context.Process(target=_serve, args=(port, str(store_root), model, compute, ready), daemon=True)
    server.start()
    try:
        if not ready.wait(120):
            raise RuntimeError("echo server did not start")
        overheads = asyncio.run(_round_trips(port, count + 30, gap_s))[30:]
    finally:
        server.terminate()
        server.join(10)
    return statistics.median(overheads) * 1000


def floors(store_root: Path, model: str) -> dict[str, float]:
    """The three cases of the module docstring, in ms."""
    return {"floor_back_to_back_ms": round(measure(store_root, model, compute=False), 3),
            "floor_idle_gap_ms": round(measure(store_root, model, compute=False, gap_s=IDLE_GAP_S), 3),
            "floor_with_compute_ms": round(measure(store_root, model, compute=True), 3)}


def main() -> int:
    from common.model_import import EMBEDDED_MODEL_NAME, ensure_embedded
    from common.model_store import ModelStore

    store = ModelStore(Path("~/.cache/splitmesh/store").expanduser())
    ensure_embedded(store)
    figures = floors(store.root, EMBEDDED_MODEL_NAME)
    print(f"bare gRPC aio round trip minus the server's time: {figures['floor_back_to_back_ms']:.3f} ms back to "
          f"back, {figures['floor_idle_gap_ms']:.3f} ms with the client idle {IDLE_GAP_S * 1e3:.0f} ms between round "
          f"trips, {figures['floor_with_compute_ms']:.3f} ms with a 10-layer decode step on the server")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
