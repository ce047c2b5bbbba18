"""The one span type: a half-open range of absolute layer indices."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Span:
    """Layers ``[start, end)`` of a model; half-open so adjacent spans share a boundary."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.end <= self.start:
            raise ValueError(f"invalid span [{self.start}, {self.end}): need 0 <= start < end")

    def __len__(self) -> int:
        return self.end - self.start

    def __contains__(self, layer: object) -> bool:
        return isinstance(layer, int) and self.start <= layer < self.end

    def layers(self) -> range:
        return range(self.start, self.end)

    def __str__(self) -> str:
        return f"[{self.start},{self.end})"


def spans_from_boundaries(boundaries: Sequence[int]) -> list[Span]:
    """``[0, 10, 20, 30]`` -> ``[0,10) [10,20) [20,30)``."""
    if len(boundaries) < 2:
        raise ValueError("need at least two boundaries (0 and the layer count)")
    return [Span(a, b) for a, b in itertools.pairwise(boundaries)]


def check_cover(spans: Iterable[Span], num_layers: int) -> None:
    """Raise ValueError unless the spans cover ``[0, num_layers)`` in order, once each."""
    expected = 0
    for span in spans:
        if span.start != expected:
            kind = "gap" if span.start > expected else "overlap"
            raise ValueError(f"{kind} at layer {min(span.start, expected)}: span {span} follows layer {expected}")
        expected = span.end
    if expected != num_layers:
        raise ValueError(f"spans end at layer {expected}, model has {num_layers} layers")


def even_boundaries(num_layers: int, parts: int) -> list[int]:
    """Boundaries cutting ``num_layers`` into ``parts`` spans whose sizes differ by at most one."""
    if not 1 <= parts <= num_layers:
        raise ValueError(f"cannot cut {num_layers} layers into {parts} spans")
    base, extra = divmod(num_layers, parts)
    out = [0]
    for i in range(parts):
        out.append(out[-1] + base + (1 if i < extra else 0))
    return out
