"""Under load the slowest node bounds every session's ms/token, a max the additive DP cannot carry.

So the solver runs the DP again under caps on a node's time per forward: a cap forbids the segments that
would be slower (and, for a head that also hosts the tail, first segments whose time plus the tail's would
be), so the DP's best plan under it is the cheapest with no stage above the cap. Under a cap the decode
tokens cost at least ``forwards x cap`` whatever the round trip, so each cap also runs without the
segments' decode term (prompt, imbalance and hops only). Every plan found is re-costed with
``evaluate_plan`` (each token pays the round trip or the busiest node or link times the forwards per token,
whichever is longer) and the cheapest wins. Not exact, unlike one session: tests compare it with brute force.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .tables import FloatArr, Tables

CAPS = 24  # bottleneck caps tried (quantiles of the feasible segment times), four DP passes each


def candidate_segments(tables: Tables, tail: tuple[int, int], forwards: float) -> Iterator[FloatArr]:
    """``tables.seg`` as is, then, when more than one forward runs per token, its variants under each cap.

    ``tail`` is the last breakpoint interval: the span a head hosting the tail too would take back.
    """
    yield tables.seg
    if forwards <= 1:
        return  # every session in one forward: the round trip is the bound, and Phi is additive
    times = np.unique(tables.stage[np.isfinite(tables.seg)])
    if times.size <= 1:
        return
    loose = tables.seg - tables.decode  # inf stays inf
    tail_s = tables.stage[tail[0], tail[1], :]  # (N,)
    picks = np.unique(np.linspace(0, times.size - 1, min(CAPS, times.size)).round().astype(np.int64))
    for cap in times[picks]:
        fits = tables.stage <= cap
        first_fits = tables.stage[0] + tail_s[None, :] <= cap  # (L+1, N): room left for the tail on the head
        for base in (tables.seg, loose):
            masked = np.where(fits, base, np.inf)
            yield masked
            headroom = masked.copy()
            headroom[0] = np.where(first_fits, masked[0], np.inf)
            yield headroom
