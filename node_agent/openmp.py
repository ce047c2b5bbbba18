"""Bound how long torch's OpenMP worker threads spin after each parallel region.

libgomp's workers busy-wait for the next parallel region up to GOMP_SPINCOUNT iterations (300,000
by default: several milliseconds) and do so between the many small kernels of a decode step too.
Alone on a box that costs nothing; in a mesh, nodes take turns (one computes while the others wait
for it), so a waiting node's spinning workers take the cores that the computing node needs. A short
spin keeps the workers warm inside a step and hands the cores back as soon as the step ends.
libgomp reads the setting once, when it loads, so it must be in the environment before torch is
imported.
"""

from __future__ import annotations

import os
import sys

OPENMP_WAIT_VARIABLES = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def bound_spinning(spin_count: int) -> str:
    """Set GOMP_SPINCOUNT unless the environment already decides (``spin_count`` < 0: leave libgomp's default).

    Returns what was decided, for the start-up log.
    """
    if "torch" in sys.modules:
        raise RuntimeError("OpenMP settings must be made before torch is imported")
    preset = {name: os.environ[name] for name in OPENMP_WAIT_VARIABLES if name in os.environ}
    if preset:
        return "from the environment: " + ", ".join(f"{k}={v}" for k, v in preset.items())
    if spin_count < 0:
        return "libgomp's default spin"
    os.environ["GOMP_SPINCOUNT"] = str(spin_count)
    return f"GOMP_SPINCOUNT={spin_count}"
