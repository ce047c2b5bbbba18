"""int8 weight-only matmul paths on this CPU, for the model's own shapes, by rows per call.

Baseline and candidates in one run: bf16 ``functional.linear`` (the float reference), torch's
``_weight_int8pack_mm`` (what common/int8.py runs), dequantize-then-bf16-linear, torchao's int8
weight-only tensor when torchao imports (it is not a pinned dependency: put it on PYTHONPATH),
and torch's dynamic quantized linear (weights *and* activations in int8, so not the weight-only
scheme the store holds: printed for scale only). Prints a table of microseconds per call and ends
with one JSON line.

    .venv/bin/python bench/int8_kernels.py --rows 1,4,16,64 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.nn import functional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.int8 import quantize_rows

# SmolLM2-135M: hidden 576, intermediate 1536, 9 heads x 64 (q/o 576), 3 kv heads x 64 (k/v 192)
SHAPES = {"q/o": (576, 576), "k/v": (192, 576), "gate/up": (1536, 576), "down": (576, 1536),
          "lm_head": (49152, 576)}


def timed_us(fn: Callable[[], torch.Tensor], budget_s: float) -> float:
    """Median microseconds per call over repeats filling about ``budget_s``."""
    for _ in range(3):
        fn()
    started = time.perf_counter()
    fn()
    once = max(time.perf_counter() - started, 1e-6)
    repeats = max(5, min(400, int(budget_s / once)))
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1e6


def paths(weight: torch.Tensor, x: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    q, scale = quantize_rows(weight)
    w_bf16 = weight.to(torch.bfloat16)
    out: dict[str, Callable[[], torch.Tensor]] = {
        "bf16_linear": lambda: functional.linear(x, w_bf16),
        "int8pack_mm": lambda: torch._weight_int8pack_mm(x, q, scale),
        "dequant_linear": lambda: functional.linear(x, q.to(torch.bfloat16) * scale.unsqueeze(1)),
    }
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        module = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=torch.bfloat16)
        module.weight.data.copy_(w_bf16)
        quantize_(module, Int8WeightOnlyConfig())
        out["torchao_int8wo"] = lambda: module(x)
    dynamic = torch.ao.nn.quantized.dynamic.Linear(  # type: ignore[no-untyped-call]
        weight.shape[1], weight.shape[0], bias_=False)
    dynamic.set_weight_bias(torch.quantize_per_channel(weight.float(), scale.float(), torch.zeros(
        weight.shape[0], dtype=torch.long), 0, torch.qint8), None)
    xf = x.float()
    out["dynamic_w8a8_fp32"] = lambda: dynamic(xf)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,4,16,64")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=0.3, help="seconds of repeats per figure")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [int(r) for r in args.rows.split(",")]
    figures: dict[str, dict[str, dict[str, float]]] = {}
    with torch.inference_mode():
        for name, (out_f, in_f) in SHAPES.items():
            weight = torch.randn(out_f, in_f) * 0.02
            for m in rows:
                x = torch.randn(m, in_f).to(torch.bfloat16)
                figures.setdefault(name, {})[str(m)] = {
                    path: round(timed_us(fn, args.budget), 1) for path, fn in paths(weight, x).items()}
    columns = list(next(iter(next(iter(figures.values())).values())))
    table = Table(title=f"us per call, {args.threads} thread(s), median (torch {torch.__version__})")
    for column in ("shape", "rows", *columns, "int8pack/bf16", "dequant/int8pack"):
        table.add_column(column, justify="right")
    for name, by_rows in figures.items():
        for rows_key, f in by_rows.items():
            table.add_row(name, rows_key, *(str(f[c]) for c in columns),
                          f"{f['int8pack_mm'] / f['bf16_linear']:.2f}", f"{f['dequant_linear'] / f['int8pack_mm']:.2f}")
    Console().print(table)
    print(json.dumps({"threads": args.threads, "torch": torch.__version__, "us_per_call": figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
