"""Which layers and segments are privacy-critical: the one rule the solver, the placement, the coordinator's
plan marks and a node's plan check all apply.

The first layers see (nearly) raw tokens and the last produce them, so the leading and trailing *trusted
depth* (at least one layer each) is always critical; a policy may name more layers. A segment is critical
when it holds a critical layer, and only a trusted node may host it. The signed plan records the depth and
marks each critical segment, so a node (which does not know the policy) refuses what the orchestrator marked
and, on its own, any segment within the recorded depth.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from common.spans import Span


@dataclass(frozen=True)
class TrustRule:
    """Layers that only trusted nodes may run: [0, leading), the last ``trailing``, and ``extra``."""

    leading: int = 1  # leading layers on trusted nodes (values below 1 count as 1)
    trailing: int = 1  # trailing layers on trusted nodes (values below 1 count as 1)
    extra: frozenset[int] = field(default_factory=frozenset)  # further layer indices that stay trusted

    def critical_layers(self, num_layers: int) -> frozenset[int]:
        lead, trail = max(1, self.leading), max(1, self.trailing)
        depth = set(range(min(lead, num_layers))) | set(range(max(0, num_layers - trail), num_layers))
        return frozenset(depth | {i for i in self.extra if 0 <= i < num_layers})

    def segment_is_critical(self, span: Span, num_layers: int) -> bool:
        critical = self.critical_layers(num_layers)
        return any(i in critical for i in range(span.start, span.end))


def critical_layers(num_layers: int, extra: Iterable[int] = (), leading: int = 1,
                    trailing: int = 1) -> frozenset[int]:
    """The trusted depth at both ends, plus the ``extra`` layers that exist in a model of ``num_layers``."""
    return TrustRule(leading, trailing, frozenset(extra)).critical_layers(num_layers)


def segment_is_critical(span: Span, num_layers: int, extra: Iterable[int] = (), leading: int = 1,
                        trailing: int = 1) -> bool:
    return TrustRule(leading, trailing, frozenset(extra)).segment_is_critical(span, num_layers)


ENDS_ONLY = TrustRule()  # only the first and the last layer: the floor every plan check applies
