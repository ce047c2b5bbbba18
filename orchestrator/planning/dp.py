"""The chain DP: exact minimum of Phi over chains in which the head node appears only at the ends.

A row r of the state is a head h = head[r] in one of two modes:
  mode 0  the tail is another node (or the whole model sits on h); the ring return ring[t, h] is paid
  mode 1  the tail is h itself, on the fixed tail span (the last breakpoint interval); h must hold both
          ends, so its first segment is checked against memory minus the tail's share
State f[r, k, v]: cheapest chain of row r covering [0, pts[k]) whose last segment, ending at pts[k], is on v.
  f[r, k, v] = min( first[r, k] if v == h,  min_{0 < i < k} g[r, i, v] + seg[pts[i], pts[k], v] if v != h )
  g[r, k, v] = min_u f[r, k, u] + link[u, v]            (link[u, u] = inf: consecutive nodes differ)
  mode 0 answer: min_t f[r, K, t] + ring[t, h];  mode 1 answer: min_w f[r, K-1, w] + link[w, h] + seg(tail on h)
The head is in the state because the ring and the tail-on-head memory depend on it; that also makes
"no middle segment on the head" exact. Other nodes may still reappear, and memory is checked per segment for
them: the branch and bound in ``solver`` restores that rule exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .tables import FloatArr, IntArr, Tables


@dataclass(frozen=True)
class Relaxed:
    """Optimum of the DP: Phi and segments as (start, end, node index)."""

    phi: float  # exact Phi of the returned chain
    segments: tuple[tuple[int, int, int], ...]  # (start, end, node index) in layer order


def _rows(tables: Tables, seg: FloatArr, pts: IntArr) -> tuple[IntArr, IntArr, FloatArr]:
    """Rows (head node, mode) and the first-segment cost of each row at every breakpoint."""
    ends = pts[1:]
    first0 = seg[0, ends, :].T  # (N, K)
    heads0 = np.flatnonzero(np.isfinite(first0).any(axis=1))
    t0, t1 = int(pts[-2]), int(pts[-1])
    tail_ok = np.isfinite(seg[t0, t1, :]) if len(pts) >= 4 else np.zeros(seg.shape[2], dtype=bool)
    room = tables.capacity - tables.mem[t0, t1]
    first1 = np.where(tables.mem[0, ends][None, :] <= room[:, None], first0, np.inf)
    first1[:, -2:] = np.inf  # the first segment must leave room for a middle segment and the tail
    heads1 = np.flatnonzero(tail_ok & np.isfinite(first1).any(axis=1))
    head = np.concatenate([heads0, heads1]).astype(np.int64)
    mode = np.concatenate([np.zeros(heads0.size), np.ones(heads1.size)]).astype(np.int64)
    first = np.concatenate([first0[heads0], first1[heads1]], axis=0)
    return head, mode, np.concatenate([np.full((head.size, 1), np.inf), first], axis=1)


def solve_chain(tables: Tables, seg: FloatArr, pts: IntArr, free: bool) -> Relaxed | None:
    """Best chain with boundaries in ``pts``; ``free`` lets a segment span several breakpoints (re-split)."""
    link, ring = tables.link, tables.ring
    n_nodes, k_max = link.shape[0], len(pts) - 1
    head, mode, first = _rows(tables, seg, pts)
    if not free:
        first[:, 2:] = np.inf  # migration: the first segment is the first span
    if head.size == 0:
        return None
    rows = np.arange(head.size)
    f = np.full((head.size, k_max + 1, n_nodes), np.inf)
    g = np.full_like(f, np.inf)
    arg_i = np.zeros(f.shape, dtype=np.int64)
    arg_u = np.zeros(f.shape, dtype=np.int64)
    for k in range(1, k_max + 1):
        lo = 1 if free else k - 1
        if lo >= 1 and lo < k:
            cand = g[:, lo:k, :] + seg[pts[lo:k], pts[k], :][None, :, :]
            best = cand.argmin(axis=1)
            f[:, k, :] = np.take_along_axis(cand, best[:, None, :], axis=1)[:, 0, :]
            arg_i[:, k, :] = best + lo
        f[rows, k, head] = first[:, k]  # the head hosts only the first segment here
        arg_i[rows, k, head] = 0
        if k < k_max:
            hop = f[:, k, :, None] + link[None, :, :]
            src = hop.argmin(axis=1)
            g[:, k, :] = np.take_along_axis(hop, src[:, None, :], axis=1)[:, 0, :]
            arg_u[:, k, :] = src
    end0 = f[:, k_max, :] + ring[:, head].T
    tail_cost = seg[pts[-2], pts[-1], head]
    end1 = f[:, k_max - 1, :] + link[:, head].T + tail_cost[:, None]
    total = np.where((mode == 0)[:, None], end0, end1)
    flat = int(np.argmin(total))
    r, last = divmod(flat, n_nodes)
    phi = float(total[r, last])
    if not np.isfinite(phi):
        return None
    out: list[tuple[int, int, int]] = []
    k = k_max
    if mode[r] == 1:
        out.append((int(pts[-2]), int(pts[-1]), int(head[r])))
        k = k_max - 1
    v = last
    while k > 0:
        i = int(arg_i[r, k, v])
        out.append((int(pts[i]), int(pts[k]), v))
        if i > 0:
            v = int(arg_u[r, i, v])
        k = i
    out.reverse()
    return Relaxed(phi=phi, segments=tuple(out))
