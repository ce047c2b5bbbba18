"""The weight dtypes a model can be stored in, what each computes in, and its bytes.

One home for the dtype concept, free of torch so the planner can use it: the importer converts to a
:data:`WEIGHT_DTYPES` entry, segments compute in :func:`compute_dtype_name`, activations and KV cache
take :func:`activation_bytes` per value, and the cost model sizes weights with :func:`weight_bytes`.
"""

from __future__ import annotations

from typing import Any

WEIGHT_DTYPES = ("float32", "bfloat16", "float16", "int8")
_COMPUTE = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "int8": "bfloat16"}
_FLOAT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
INT8_METHOD = "int8-weight-only"
# int8 stores each matrix row with one scale in the compute dtype: 1 byte per weight plus 2 per row.
INT8_SCHEME: dict[str, Any] = {
    "method": INT8_METHOD,
    "granularity": "per-output-channel, symmetric, absmax / 127",
    "scale_dtype": "bfloat16",
    "compute_dtype": "bfloat16",
    "kernel": "torch._weight_int8pack_mm",
    "quantized": "every decoder-layer linear, the token embedding and lm_head; norms stay bfloat16",
}


class DtypeError(ValueError):
    """A dtype name that no store, segment or wire message knows."""


def check_weight_dtype(name: str) -> str:
    if name not in WEIGHT_DTYPES:
        raise DtypeError(f"unknown weight dtype {name!r} (known: {', '.join(WEIGHT_DTYPES)})")
    return name


def parse_dtypes(text: str) -> tuple[str, ...]:
    """A comma-separated list of names from :data:`WEIGHT_DTYPES` (a node's ``--dtypes``)."""
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [n for n in names if n not in WEIGHT_DTYPES]
    if unknown or not names:
        raise DtypeError(f"dtypes {text!r}: expected some of {', '.join(WEIGHT_DTYPES)}")
    return names


def compute_dtype_name(weight_dtype: str) -> str:
    """The dtype a segment computes in (and activations travel in) for weights stored as ``weight_dtype``."""
    return _COMPUTE[check_weight_dtype(weight_dtype)]


def activation_bytes(weight_dtype: str) -> int:
    """Bytes per hidden value on the wire and in the KV cache."""
    return _FLOAT_BYTES[compute_dtype_name(weight_dtype)]


def weight_bytes(weight_dtype: str, matrix_params: int, matrix_rows: int, vector_params: int = 0) -> int:
    """Stored bytes of ``matrix_params`` weights in ``matrix_rows`` rows plus ``vector_params`` norm/bias values."""
    if check_weight_dtype(weight_dtype) == "int8":
        return matrix_params + 2 * matrix_rows + 2 * vector_params
    size = _FLOAT_BYTES[weight_dtype]
    return (matrix_params + vector_params) * size


def quantization_record(weight_dtype: str) -> dict[str, Any] | None:
    """What the manifest records about how the weights were quantized (None for plain float weights)."""
    return dict(INT8_SCHEME) if check_weight_dtype(weight_dtype) == "int8" else None
