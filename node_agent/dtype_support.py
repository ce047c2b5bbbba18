"""Whether this node can run a model's weight dtype, and why not: the reason a Prepare is NACKed with."""

from __future__ import annotations

import functools
from collections.abc import Collection

from common.dtypes import INT8_METHOD, WEIGHT_DTYPES
from common.int8 import kernel_problem
from common.model_store import Manifest


@functools.cache
def _int8_problem() -> str | None:
    return kernel_problem()


def dtype_problem(manifest: Manifest, allowed: Collection[str]) -> str | None:
    """Why this node cannot host layers of ``manifest`` (its dtype or quantization), or None."""
    what = f"model {manifest.name} is stored in {manifest.dtype}"
    if manifest.dtype not in WEIGHT_DTYPES:
        return f"{what}, which no segment can run"
    if manifest.dtype not in allowed:
        return f"{what}; this node runs only {', '.join(allowed)} (--dtypes)"
    method = (manifest.quantization or {}).get("method")
    if manifest.dtype == "int8" and method != INT8_METHOD:
        return f"{what} with quantization {method!r}; this node runs only {INT8_METHOD}"
    if manifest.dtype != "int8" and manifest.quantization is not None:
        return f"{what} but records a quantization: refusing a manifest this node cannot interpret"
    if manifest.dtype == "int8":
        problem = _int8_problem()
        if problem is not None:
            return f"{what}, but {problem}"
    return None
