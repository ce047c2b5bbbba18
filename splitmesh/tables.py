"""Readable terminal tables for the operator CLI, whole in 80 columns and when piped.

Names, addresses and numbers never wrap or get cut (``edg…`` for both edge-a and edge-b told nothing);
only free text (reasons, triggers) wraps. Borders are light so that a node table fits 80 columns, and
output that goes to a pipe or a file is laid out as wide as it needs (``COLUMNS`` still wins).
"""

from __future__ import annotations

import datetime
import os
import sys
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.table import Table

from common.proto import splitmesh_pb2 as pb

if TYPE_CHECKING:
    from common.model_store import ModelStore

PIPED_WIDTH = 240  # a pipe has no width: lay tables out whole, a program or a file reads them


def console_for_tables() -> Console:
    """stdout at the terminal's width, or, when piped without COLUMNS, wide enough for any table."""
    if not sys.stdout.isatty() and not os.environ.get("COLUMNS"):
        return Console(width=PIPED_WIDTH)
    return Console()


def _table(title: str) -> Table:
    return Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1),
                 collapse_padding=True)


def _fixed(table: Table, *names: str) -> None:
    """Columns whose cells are never wrapped nor cut (names, addresses, numbers)."""
    for name in names:
        table.add_column(name, no_wrap=True, overflow="fold")


def _text(table: Table, *names: str) -> None:
    """Columns of free text, which wrap between words."""
    for name in names:
        table.add_column(name, overflow="fold")


def plan_table(plan: pb.Plan, title: str | None = None) -> Table:
    trusted = {n.node_id: n.trusted for n in plan.nodes}
    addresses = {n.node_id: n.address for n in plan.nodes}
    table = _table(title or f"plan epoch {plan.epoch} ({plan.num_layers} layers, model {plan.model_digest[:12]})")
    _fixed(table, "segment", "layers", "count", "node", "address", "trusted", "critical")
    for i, s in enumerate(plan.segments):
        table.add_row(str(i), f"[{s.start},{s.end})", str(s.end - s.start), s.node_id, addresses.get(s.node_id, "?"),
                      "yes" if trusted.get(s.node_id) else "no", "yes" if s.privacy_critical else "")
    return table


def forecast_table(reply: pb.ResplitReply) -> Table:
    """Predicted ms/token (per session) and tokens/s (all sessions) of the plan before and after a resplit,
    at the load the nodes report now, with what bounds each."""
    table = _table(f"at {reply.load_sessions or 1} sessions, {reply.load_batch_rows or 1:.1f} rows/forward")
    _fixed(table, "plan", "ms/token", "tok/s", "bound by")
    old, new = ("before", "after") if reply.committed else ("current", "proposed")
    rows = ((old, reply.predicted_ms_old, reply.predicted_tokens_per_s_old, reply.bottleneck_old),
            (new, reply.predicted_ms_new, reply.predicted_tokens_per_s_new, reply.bottleneck_new))
    for name, ms, rate, bound in rows:
        table.add_row(name, f"{ms:.2f}" if ms else "-", f"{rate:.1f}" if rate else "-", bound or "-")
    table.caption = "ms/token: per session; tok/s: all"
    return table


def _state(n: pb.NodeState) -> str:
    words = ["alive" if n.alive else "[red]dead[/red]"]
    if n.trusted:
        words.append("trusted")
    if n.drained:
        words.append("[yellow]drained[/yellow]")
    if n.refused_reports:
        words.append("[red]refused[/red]")
    return " ".join(words)


def nodes_table(status: pb.StatusReply) -> Table:
    table = _table("nodes")
    gpus = any(n.capacity.gpus for n in status.nodes)  # a column of zeros on CPU boxes would cost 6 columns
    _fixed(table, "node", "address")
    table.add_column("state", overflow="fold", min_width=7)
    _fixed(table, "seen", "cpu", "mem", *(["gpus"] if gpus else []), "ms/layer", "sess", "epoch")
    for n in status.nodes:
        cap = n.capacity
        table.add_row(n.node_id, n.address, _state(n), f"{n.last_seen_s:.1f}s", f"{cap.cpu_utilisation * 100:.0f}%",
                      f"{cap.memory_available_bytes / 2**30:.1f}G", *([str(len(cap.gpus))] if gpus else []),
                      f"{cap.layer_decode_ms:.2f}" if cap.layer_decode_ms else "-", str(n.active_sessions),
                      str(n.plan_epoch))
    if status.nodes:
        refused = [f"{n.node_id} refused {n.refused_reports}: {n.refused_reason}" for n in status.nodes
                   if n.refused_reports]  # implausible reports: their figures never reach the cost model
        table.caption = "\n".join(["mem: free GiB, ms/layer: decode ms per layer-token, sess: open sessions",
                                    *refused])
    return table


def history_table(decisions: list[pb.DecisionRecord]) -> Table:
    table = _table("decisions (oldest first)")
    _fixed(table, "time", "kind", "epoch", "ms/token")
    _text(table, "triggers", "reason")
    for d in decisions:
        when = datetime.datetime.fromtimestamp(d.at_ms / 1000).strftime("%H:%M:%S")
        epoch = f"{d.epoch_before}->{d.epoch_after}" if d.epoch_after else str(d.epoch_before)
        cost = (f"{d.predicted_latency_old_ms:.2f}->{d.predicted_latency_new_ms:.2f}"
                if d.predicted_latency_old_ms or d.predicted_latency_new_ms else "")
        table.add_row(when, d.kind, epoch, cost, d.triggers or "-", d.reason)
    if decisions:
        table.caption = "ms/token: predicted decode step of the plan before -> after"
    return table


def policy_table(values: dict[str, str]) -> Table:
    table = _table("adaptive policy")
    _fixed(table, "key", "value")
    for key in sorted(values):
        table.add_row(key, values[key])
    return table


def model_table(store: ModelStore) -> Table:
    table = _table(f"models in {store.root}")
    _fixed(table, "name", "digest", "layers", "dtype", "size", "tokenizer")
    for name in store.names():
        m = store.open(name).manifest
        size = sum(e.size for e in m.files.values())
        table.add_row(name, m.digest[:16], str(m.num_layers), m.dtype, f"{size / 2**20:.0f} MiB",
                      "yes" if m.has_tokenizer else "no")
    return table
