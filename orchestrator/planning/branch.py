"""Branching rules that make the DP exact on the rule it cannot see: a non-head node hosts one segment.

The DP (``dp``) already keeps the head to the first segment and, optionally, the tail. Another node v may
still appear twice. For its first two visits, the earlier ending at e and the later starting at a, every plan
of the search space falls in exactly one of these children, and the DP's chain falls in none (each child
removes a (node, layer) pair that chain uses):
  1. v does not host layer e-1
  2. v hosts layer e-1 but not layer a
  3. v hosts all of [e-1, a] in one segment (other nodes may not touch it)
  4. v is head and tail: it hosts [0, e) and the tail span, which must start at a (only when it does)
Two segments of one node that contain e-1 and a can only be head and tail, so 1-4 cover every plan.
A child is a boolean (node, layer) mask, so the DP solves it unchanged; ``solver`` explores the children
best-first by their DP optimum, a lower bound for every plan a child allows.
"""

from __future__ import annotations

from dataclasses import dataclass

from .dp import Relaxed
from .tables import BoolArr


@dataclass(frozen=True)
class Conflict:
    """A node that the DP's chain uses twice outside the head+tail rule."""

    node: int  # node index
    end_first: int  # end (exclusive) of the earlier visit
    start_second: int  # start of the later visit


def find_conflict(relaxed: Relaxed) -> Conflict | None:
    segs = relaxed.segments
    visits: dict[int, list[int]] = {}
    for pos, (_, _, v) in enumerate(segs):
        visits.setdefault(v, []).append(pos)
    for v, pos in visits.items():
        if len(pos) < 2 or pos == [0, len(segs) - 1]:
            continue
        return Conflict(v, segs[pos[0]][1], segs[pos[1]][0])
    return None


def _force(mask: BoolArr, node: int, start: int, stop: int) -> BoolArr:
    out = mask.copy()
    keep = out[node, start:stop].copy()
    out[:, start:stop] = False
    out[node, start:stop] = keep
    return out


def _forbid(mask: BoolArr, node: int, layer: int) -> BoolArr:
    out = mask.copy()
    out[node, layer] = False
    return out


def children(mask: BoolArr, c: Conflict, tail_start: int) -> list[BoolArr]:
    """Disjoint masks covering every plan of the search space that ``mask`` allows, minus the DP's chain."""
    v, e, a = c.node, c.end_first, c.start_second
    kids = [
        _forbid(mask, v, e - 1),
        _forbid(_force(mask, v, e - 1, e), v, a),
        _force(mask, v, e - 1, a + 1),
    ]
    if a == tail_start:
        kids.append(_force(_force(mask, v, 0, e), v, a, mask.shape[1]))
    return kids
