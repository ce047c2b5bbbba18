"""Readable terminal tables for the operator CLI."""

from __future__ import annotations

from rich.table import Table

from common.proto import splitmesh_pb2 as pb


def plan_table(plan: pb.Plan, title: str | None = None) -> Table:
    trusted = {n.node_id: n.trusted for n in plan.nodes}
    addresses = {n.node_id: n.address for n in plan.nodes}
    table = Table(title=title or f"plan epoch {plan.epoch} ({plan.num_layers} layers, model {plan.model_digest[:12]})")
    for column in ("segment", "layers", "count", "node", "address", "trusted", "privacy-critical"):
        table.add_column(column)
    for i, s in enumerate(plan.segments):
        table.add_row(str(i), f"[{s.start},{s.end})", str(s.end - s.start), s.node_id, addresses.get(s.node_id, "?"),
                      "yes" if trusted.get(s.node_id) else "no", "yes" if s.privacy_critical else "")
    return table


def nodes_table(status: pb.StatusReply) -> Table:
    table = Table(title="nodes")
    for column in ("node", "address", "trusted", "alive", "last seen", "cpu", "memory free", "gpus", "ms/layer-token",
                   "sessions", "epoch"):
        table.add_column(column)
    for n in status.nodes:
        cap = n.capacity
        table.add_row(n.node_id, n.address, "yes" if n.trusted else "no", "yes" if n.alive else "[red]no[/red]",
                      f"{n.last_seen_s:.1f}s", f"{cap.cpu_utilisation * 100:.0f}%",
                      f"{cap.memory_available_bytes / 2**30:.1f} GiB", str(len(cap.gpus)) or "0",
                      f"{cap.layer_decode_ms:.2f}" if cap.layer_decode_ms else "-", str(n.active_sessions),
                      str(n.plan_epoch))
    return table
