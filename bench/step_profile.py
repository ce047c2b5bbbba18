"""Where one decode step of a segment goes: the model's arithmetic vs everything around it.

Runs a segment (transformers' own layers, as a node runs them) for a few decode steps per dtype under
``torch.profiler`` and splits each step's wall time into the matmul/attention kernels (the arithmetic),
the other aten ops (norms, rotary, cache concatenation, casts, views) and what the profiler does not see
(Python and module dispatch). Prints per-step and per-layer figures, then one JSON line.

    .venv/bin/python bench/step_profile.py --dtypes float32,bfloat16,int8 --span 0,30
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.embedded import model_in
from common.model_store import ModelStore
from common.spans import Span
from node_agent.segment import SegmentRunner

ARITHMETIC = {"aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int8pack_mm",
              "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math"}


def step_breakdown(runner: SegmentRunner, steps: int, context: int) -> dict[str, float]:
    cache = runner.new_cache()
    first = torch.arange(1, context + 1).unsqueeze(0) if runner.is_first else torch.zeros(
        1, context, runner.hidden_size, dtype=runner.dtype)
    runner.run(cache, first, 0)

    def token(i: int) -> torch.Tensor:
        return torch.tensor([[i % 1000 + 1]]) if runner.is_first else torch.zeros(1, 1, runner.hidden_size,
                                                                                 dtype=runner.dtype)
    for i in range(3):  # warm-up
        runner.run(cache, token(i), context + i)
    position = context + 3
    walls = []
    for i in range(steps):
        started = time.perf_counter()
        runner.run(cache, token(i), position + i)
        walls.append(time.perf_counter() - started)
    position += steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        for i in range(steps):
            runner.run(cache, token(i), position + i)
        profiled_ms = (time.perf_counter() - started) * 1000 / steps
    arithmetic = other = 0.0
    for event in prof.key_averages():
        if event.key in ARITHMETIC:
            arithmetic += event.self_cpu_time_total
        elif event.key.startswith("aten::"):
            other += event.self_cpu_time_total
    wall_ms = statistics.median(walls) * 1000
    arithmetic_ms, other_ms = arithmetic / 1000 / steps, other / 1000 / steps
    layers = len(runner.layers)
    # shares come from the profiled steps themselves (the profiler adds its own cost to "other")
    return {"step_ms": round(wall_ms, 3), "layer_ms": round(wall_ms / layers, 4),
            "profiled_step_ms": round(profiled_ms, 3), "arithmetic_ms": round(arithmetic_ms, 3),
            "other_aten_ms": round(other_ms, 3),
            "unprofiled_ms": round(max(profiled_ms - arithmetic_ms - other_ms, 0.0), 3),
            "arithmetic_share": round(arithmetic_ms / profiled_ms, 3) if profiled_ms else 0.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="~/.cache/splitmesh/store")
    parser.add_argument("--dtypes", default="float32,bfloat16,int8")
    parser.add_argument("--span", default="10,20", help="start,end of the segment (a middle one: layers only)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--context", type=int, default=64, help="tokens already in the cache")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    store = ModelStore(Path(args.store).expanduser())
    start, end = (int(x) for x in args.span.split(","))
    figures = {}
    for dtype in (d.strip() for d in args.dtypes.split(",")):
        runner = SegmentRunner(model_in(store, dtype), Span(start, end))
        figures[dtype] = step_breakdown(runner, args.steps, args.context)
    table = Table(title=f"one decode step of segment [{start},{end}), {args.threads} thread(s), "
                        f"{args.context}-token cache, median of {args.steps}")
    for column in ("dtype", "ms/step", "ms/layer", "profiled ms/step", "matmul+attention ms", "other aten ms",
                   "Python/dispatch ms", "arithmetic share"):
        table.add_column(column, justify="right")
    for dtype, f in figures.items():
        keys = ("step_ms", "layer_ms", "profiled_step_ms", "arithmetic_ms", "other_aten_ms", "unprofiled_ms",
                "arithmetic_share")
        table.add_row(dtype, *(str(f[k]) for k in keys))
    Console().print(table)
    print(json.dumps({"span": [start, end], "threads": args.threads, "context": args.context, "dtypes": figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
