"""Entry point of a node agent process: ``python -m node_agent`` or ``splitmesh-node``.

It parses the configuration before anything imports torch, because torch's OpenMP runtime reads
its threading settings once, when it loads (see node_agent/openmp.py).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from common.config import parse
from node_agent.config import NodeConfig
from node_agent.openmp import bound_spinning


def main(argv: Sequence[str] | None = None) -> int:
    config = parse(NodeConfig, argv, "splitmesh node agent: hosts model segments", section="node")
    openmp = bound_spinning(config.omp_spin_count)
    from node_agent.server import run  # imports torch: after the OpenMP settings are in place

    run(config, openmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
