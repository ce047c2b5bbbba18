"""The node agent bounds OpenMP's idle spinning before torch loads, and leaves an operator's own setting alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import os, sys
from node_agent.openmp import bound_spinning
print(bound_spinning(int(sys.argv[1])))
print(os.environ.get("GOMP_SPINCOUNT", "unset"))
"""


def run_probe(spin: int, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", PROBE, str(spin)], capture_output=True, text=True, check=True,
                         env={**clean, **env}, timeout=60)
    return out.stdout.strip().splitlines()


def test_sets_a_short_spin_by_default() -> None:
    assert run_probe(1000) == ["GOMP_SPINCOUNT=1000", "1000"]


def test_operator_environment_wins() -> None:
    decided, value = run_probe(1000, OMP_WAIT_POLICY="PASSIVE")
    assert decided == "from the environment: OMP_WAIT_POLICY=PASSIVE"
    assert value == "unset"


def test_negative_keeps_the_library_default() -> None:
    assert run_probe(-1) == ["libgomp's default spin", "unset"]


def test_refuses_once_torch_is_loaded() -> None:
    import torch  # noqa: F401 - loaded, as in any test process by now

    from node_agent.openmp import bound_spinning

    with pytest.raises(RuntimeError, match="before torch"):
        bound_spinning(1000)
