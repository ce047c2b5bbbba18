"""The relaxed chain DP: exact minimum of Phi over chains whose consecutive segments differ in node.

State f[h, b, v]: cheapest chain that starts on head h, covers [0, b), and whose last segment, ending at b,
is on v. g[h, b, v]: the same chain plus the boundary hop into v at b (g[h, 0, h] = 0 starts the chain).
  f[h, b, v] = min_{i < b} g[h, i, v] + seg[i, b, v]
  g[h, b, v] = min_{u} f[h, b, u] + link[u, v]            (link[u, u] = inf)
  answer     = min_{h, t} f[h, L, t] + ring[t, h]
The head is kept in the state only because the ring return depends on the (tail, head) pair.
This DP does not forbid a node from reappearing later in the chain, and it checks memory per segment; the
branch and bound in ``solver`` restores those two rules exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .tables import FloatArr, IntArr


@dataclass(frozen=True)
class Relaxed:
    """Optimum of the relaxed DP: Phi and segments as (start, end, node index)."""

    phi: float  # exact Phi of the returned chain
    segments: tuple[tuple[int, int, int], ...]  # (start, end, node index) in layer order


def solve_chain(seg: FloatArr, link: FloatArr, ring: FloatArr, breakpoints: IntArr, free: bool) -> Relaxed | None:
    """Best chain whose boundaries lie in ``breakpoints`` (all of them when ``free`` is False).

    ``free=True``: a segment may span several breakpoints (re-split). ``free=False``: every breakpoint is a
    boundary (migration keeps the current spans).
    """
    n_nodes = link.shape[0]
    pts = breakpoints
    k_max = len(pts) - 1
    heads = np.flatnonzero(np.isfinite(seg[0, pts[1:], :]).any(axis=0))
    if k_max < 1 or heads.size == 0:
        return None
    n_heads = heads.size
    inf = np.inf
    f = np.full((n_heads, k_max + 1, n_nodes), inf)
    g = np.full((n_heads, k_max + 1, n_nodes), inf)
    g[np.arange(n_heads), 0, heads] = 0.0
    arg_i = np.zeros((n_heads, k_max + 1, n_nodes), dtype=np.int64)
    arg_u = np.zeros((n_heads, k_max + 1, n_nodes), dtype=np.int64)
    for k in range(1, k_max + 1):
        lo = 0 if free else k - 1
        cand = g[:, lo:k, :] + seg[pts[lo:k], pts[k], :][None, :, :]
        best = cand.argmin(axis=1)
        f[:, k, :] = np.take_along_axis(cand, best[:, None, :], axis=1)[:, 0, :]
        arg_i[:, k, :] = best + lo
        if k < k_max:
            hop = f[:, k, :, None] + link[None, :, :]
            src = hop.argmin(axis=1)
            g[:, k, :] = np.take_along_axis(hop, src[:, None, :], axis=1)[:, 0, :]
            arg_u[:, k, :] = src
    total = f[:, k_max, :] + ring[:, heads].T
    flat = int(np.argmin(total))
    hi, tail = divmod(flat, n_nodes)
    phi = float(total[hi, tail])
    if not np.isfinite(phi):
        return None
    out: list[tuple[int, int, int]] = []
    k, v = k_max, tail
    while k > 0:
        i = int(arg_i[hi, k, v])
        out.append((int(pts[i]), int(pts[k]), v))
        if i > 0:
            v = int(arg_u[hi, i, v])
        k = i
    out.reverse()
    return Relaxed(phi=phi, segments=tuple(out))
