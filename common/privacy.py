"""Which layers and segments are privacy-critical: the one rule the solver, the coordinator and a node's plan
check all apply.

The first layer sees raw tokens and the last produces them, so both are always critical; a policy may name
more layers. A segment is critical when it holds a critical layer, and only a trusted node may host it. The
signed plan marks each critical segment, so a node (which does not know the policy) refuses what the
orchestrator marked, and refuses the first and last segment on its own.
"""

from __future__ import annotations

from collections.abc import Iterable

from common.spans import Span


def critical_layers(num_layers: int, extra: Iterable[int] = ()) -> frozenset[int]:
    """The first and last layer, plus the ``extra`` layers that exist in a model of ``num_layers``."""
    return frozenset({0, num_layers - 1} | {i for i in extra if 0 <= i < num_layers})


def segment_is_critical(span: Span, num_layers: int, extra: Iterable[int] = ()) -> bool:
    return any(i in span for i in critical_layers(num_layers, extra))
