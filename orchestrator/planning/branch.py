"""Branching rules that turn the relaxed DP into an exact solver for the search space of ``plan``.

The relaxed DP may (a) put a node on two segments other than head+tail, or (b) give the head+tail node more
than its memory (it checks memory per segment). For the first such node v, with an earlier visit ending at e
and a later one starting at a, every plan of the search space falls in one of these children, and the
relaxed optimum falls in none (each child removes at least one (node, layer) pair it uses):
  1. v does not host layer e-1            2. v does not host layer a
  3. v hosts all of [e-1, a] in one segment (others may not touch it)
  4. v hosts [0, e) and [a, L) as head and tail        (only for (a); for (b) it holds no feasible plan:
     memory only grows with the layer set)
A child is a boolean (node, layer) mask, so the DP solves it unchanged; ``solver`` explores children
best-first by relaxed Phi, which is a lower bound for every plan in a child.
"""

from __future__ import annotations

from dataclasses import dataclass

from .dp import Relaxed
from .tables import BoolArr, Tables


@dataclass(frozen=True)
class Conflict:
    """Why a relaxed chain is outside the search space."""

    node: int  # node index
    end_first: int  # end (exclusive) of the earlier visit
    start_second: int  # start of the later visit
    head_tail_memory: bool  # True: a legal head+tail pair that overflows memory


def find_conflict(tables: Tables, relaxed: Relaxed) -> Conflict | None:
    segs = relaxed.segments
    last = len(segs) - 1
    visits: dict[int, list[int]] = {}
    for pos, (_, _, v) in enumerate(segs):
        visits.setdefault(v, []).append(pos)
    for v, pos in visits.items():
        if len(pos) < 2:
            continue
        first, second = segs[pos[0]], segs[pos[1]]
        if pos == [0, last]:
            need = int(tables.mem[first[0], first[1]] + tables.mem[second[0], second[1]])
            if need <= int(tables.capacity[v]):
                continue
            return Conflict(v, first[1], second[0], head_tail_memory=True)
        return Conflict(v, first[1], second[0], head_tail_memory=False)
    return None


def _force(mask: BoolArr, node: int, layers: range) -> BoolArr:
    out = mask.copy()
    keep = out[node, layers.start : layers.stop].copy()
    out[:, layers.start : layers.stop] = False
    out[node, layers.start : layers.stop] = keep
    return out


def _forbid(mask: BoolArr, node: int, layer: int) -> BoolArr:
    out = mask.copy()
    out[node, layer] = False
    return out


def children(mask: BoolArr, c: Conflict) -> list[BoolArr]:
    """Masks covering every plan of the search space that ``mask`` allows, minus the conflicting chain."""
    n_layers = mask.shape[1]
    kids = [
        _forbid(mask, c.node, c.end_first - 1),
        _forbid(mask, c.node, c.start_second),
        _force(mask, c.node, range(c.end_first - 1, c.start_second + 1)),
    ]
    if not c.head_tail_memory:
        kids.append(_force(_force(mask, c.node, range(0, c.end_first)), c.node, range(c.start_second, n_layers)))
    return kids
