"""Many users at once: aggregate tokens/s, inter-token latency and time to first token by concurrency.

Configurations, all measured in one run on the same model and dtype (SmolLM2-135M fp32 by default):
(a) single process: transformers' own batched ``generate`` over all sessions' prompts (left-padded);
(b) the mesh with 1 segment; (c) the mesh with 3 segments (one node each, loopback, encrypted hops);
(d) with ``--strict-baseline``, the 3-segment mesh in strict mode (every step alone: no batching);
(e) with ``--gather-baseline``, the 3-segment mesh with no gather window (``batch_gather_ms`` 0).
Each mesh session is its own SDK client on its own thread, all released together; a token's time is
when the client receives it. Inter-token figures pool every session's gaps after its first token.
Prints a table, the ratios the targets are stated in, then one JSON line with every figure.

    .venv/bin/python bench/concurrency.py --sessions 1,4,16 --tokens 32
    .venv/bin/python bench/concurrency.py --quick        # 1,4 sessions, 16 tokens
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    # The same OpenMP spin as every node agent, before torch loads: on a busy box libgomp's default spin makes
    # the single-process baseline many times slower than it is, and the comparison would flatter the mesh.
    from node_agent.openmp import bound_spinning

    bound_spinning(1000)
    from bench.concurrency_runs import main as run

    return run(__doc__ or "")


if __name__ == "__main__":
    sys.exit(main())
