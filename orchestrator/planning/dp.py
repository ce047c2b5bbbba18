"""The chain DP: the exact minimum of Phi over the search space documented in ``plan``.

A row r of the state is a head h = head[r]; it serves one or both of two modes:
  mode 0  the tail is another node (or the whole model sits on h); the ring return ring[t, h] is paid
  mode 1  the tail is h itself, on the fixed tail span (the last breakpoint interval); h must hold both
          ends, so its first segment is checked against its memory minus the tail's share
State f[r, k, v]: cheapest chain of row r covering [0, pts[k]) whose last segment, ending at pts[k], is on v.
  f[r, k, h] = first[r, k]                                   (h hosts only the first segment mid-chain)
  f[r, k, v] = min_{0 < i < k} g[r, i, v] + seg[pts[i], pts[k], v]                          (v != h)
  g[r, k, v] = min( f[r, k, h] + link[h, v],  min_{u < v} f[r, k, u] + link[u, v] )     (pipeline order)
  mode 0 answer: min_t f[r, K, t] + ring[t, h];   mode 1: min_w f[r, K-1, w] + link[w, h] + seg(tail on h)
Because non-head nodes follow the pipeline order, each hosts at most one segment, so per-segment memory is
per-node memory: every term is exact and one pass suffices (no search, no pruning).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .tables import FloatArr, IntArr, Tables


@dataclass(frozen=True)
class Relaxed:
    """Optimum of the DP: Phi and segments as (start, end, node index)."""

    phi: float  # Phi of the returned chain, as the DP summed it
    segments: tuple[tuple[int, int, int], ...]  # (start, end, node index) in layer order


@dataclass(frozen=True)
class _Rows:
    head: IntArr  # node index of each DP row's head
    first: FloatArr  # (rows, K+1) Phi of the first segment [0, pts[k]) on the head
    ring_heads: IntArr  # heads that may close the ring on themselves (mode 1) ...
    ring_rows: IntArr  # ... and the DP row that carries each of them


def _rows(tables: Tables, seg: FloatArr, pts: IntArr, free: bool) -> _Rows:
    """Mode 0 rows for every possible head; a separate mode 1 row only where holding the tail too shrinks the
    head's room for its first segment (otherwise mode 1 reads the mode 0 row: same chains, different end)."""
    ends = pts[1:]
    first0 = seg[0, ends, :].T.copy()  # (N, K)
    if not free:
        first0[:, 1:] = np.inf  # migration: the first segment is the first span
    heads0 = np.flatnonzero(np.isfinite(first0).any(axis=1))
    t0, t1 = int(pts[-2]), int(pts[-1])
    tail_ok = np.isfinite(seg[t0, t1, :]) if len(pts) >= 4 else np.zeros(seg.shape[2], dtype=bool)
    room = tables.capacity - tables.mem[t0, t1]
    first1 = np.where(tables.mem[0, ends][None, :] <= room[:, None], first0, np.inf)
    first1[:, -2:] = np.inf  # leave at least one middle segment before the tail
    heads1 = np.flatnonzero(tail_ok & np.isfinite(first1).any(axis=1))
    same = (first1[:, :-2] == first0[:, :-2]).all(axis=1)
    extra = heads1[~same[heads1]]
    head = np.concatenate([heads0, extra]).astype(np.int64)
    first = np.concatenate([first0[heads0], first1[extra]], axis=0)
    row_of = {int(h): i for i, h in enumerate(heads0)}
    row_of.update({int(h): heads0.size + i for i, h in enumerate(extra)})
    ring_rows = np.array([row_of[int(h)] for h in heads1], dtype=np.int64)
    first = np.concatenate([np.full((head.size, 1), np.inf), first], axis=1)
    return _Rows(head, first, heads1.astype(np.int64), ring_rows)


def solve_chain(tables: Tables, pts: IntArr, free: bool) -> Relaxed | None:
    """Best chain with boundaries in ``pts``; ``free`` lets a segment span several breakpoints (re-split)."""
    seg, link, ring = tables.seg, tables.link, tables.ring
    n_nodes, k_max = link.shape[0], len(pts) - 1
    rw = _rows(tables, seg, pts, free)
    if rw.head.size == 0:
        return None
    rows = np.arange(rw.head.size)
    ordered = np.where(np.triu(np.ones((n_nodes, n_nodes), dtype=bool), 1), link, np.inf)
    from_head = link[rw.head, :]  # (rows, N)
    f = np.full((rows.size, k_max + 1, n_nodes), np.inf)
    g = np.full_like(f, np.inf)
    hop = np.empty((rows.size, n_nodes, n_nodes))
    span_buf = np.empty((rows.size, k_max, n_nodes))
    for k in range(1, k_max + 1):
        lo = 1 if free else k - 1
        if 1 <= lo < k:
            buf = span_buf[:, : k - lo, :]
            np.add(g[:, lo:k, :], seg[pts[lo:k], pts[k], :][None, :, :], out=buf)
            np.min(buf, axis=1, out=f[:, k, :])
        f[rows, k, rw.head] = rw.first[:, k]
        if k < k_max:
            np.add(f[:, k, :, None], ordered[None, :, :], out=hop)
            np.min(hop, axis=1, out=g[:, k, :])
            np.minimum(g[:, k, :], rw.first[:, k, None] + from_head, out=g[:, k, :])
    n0 = rows.size
    end0 = f[:, k_max, :] + ring[:, rw.head].T  # mode 0 on every row (valid, never better on extra rows)
    end1 = f[rw.ring_rows, k_max - 1, :] + link[:, rw.ring_heads].T + seg[pts[-2], pts[-1], rw.ring_heads][:, None]
    total = np.concatenate([end0, end1], axis=0)
    flat = int(np.argmin(total))
    r, last = divmod(flat, n_nodes)
    phi = float(total[r, last])
    if not np.isfinite(phi):
        return None
    mode1 = r >= n0
    row = int(rw.ring_rows[r - n0]) if mode1 else r
    return Relaxed(phi, _backtrack(tables, pts, free, rw, f, g, row, last, mode1))


def _backtrack(tables: Tables, pts: IntArr, free: bool, rw: _Rows, f: FloatArr, g: FloatArr, r: int,
               last: int, mode1: bool) -> tuple[tuple[int, int, int], ...]:
    """Walk the stored values back; recomputing the same sums picks a predecessor achieving each minimum."""
    seg, link = tables.seg, tables.link
    h, k_max = int(rw.head[r]), len(pts) - 1
    out: list[tuple[int, int, int]] = []
    k, v = k_max, last
    if mode1:
        out.append((int(pts[-2]), int(pts[-1]), h))
        k = k_max - 1
    while True:
        if v == h:
            out.append((0, int(pts[k]), h))
            break
        lo = 1 if free else k - 1
        i = lo + int(np.argmin(g[r, lo:k, v] + seg[pts[lo:k], pts[k], v]))
        out.append((int(pts[i]), int(pts[k]), v))
        via = f[r, i, :v] + link[:v, v]
        u = int(np.argmin(via)) if v > 0 else h
        if v == 0 or rw.first[r, i] + link[h, v] <= via[u]:
            u = h
        k, v = i, u
    out.reverse()
    return tuple(out)
