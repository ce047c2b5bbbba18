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
    flagged = any(n.refused_reports for n in status.nodes)  # a column only when some node sent implausible figures
    for column in ("node", "address", "trusted", "alive", "last seen", "cpu", "memory free", "gpus", "ms/layer-token",
                   "sessions", "epoch", *(("refused reports",) if flagged else ())):
        table.add_column(column, overflow="fold")
    for n in status.nodes:
        cap = n.capacity
        mark = f"[red]{n.refused_reports}: {n.refused_reason}[/red]" if n.refused_reports else "-"
        refused = (mark,) if flagged else ()
        table.add_row(n.node_id, n.address, "yes" if n.trusted else "no", "yes" if n.alive else "[red]no[/red]",
                      f"{n.last_seen_s:.1f}s", f"{cap.cpu_utilisation * 100:.0f}%",
                      f"{cap.memory_available_bytes / 2**30:.1f} GiB", str(len(cap.gpus)) or "0",
                      f"{cap.layer_decode_ms:.2f}" if cap.layer_decode_ms else "-", str(n.active_sessions),
                      str(n.plan_epoch), *refused)
    return table


def history_table(decisions: list[pb.DecisionRecord]) -> Table:
    import datetime

    table = Table(title="decisions (oldest first)")
    for column in ("time", "kind", "epoch", "triggers", "predicted ms/token old -> new", "reason"):
        table.add_column(column, overflow="fold")
    for d in decisions:
        when = datetime.datetime.fromtimestamp(d.at_ms / 1000).strftime("%H:%M:%S")
        epoch = f"{d.epoch_before} -> {d.epoch_after}" if d.epoch_after else str(d.epoch_before)
        cost = (f"{d.predicted_latency_old_ms:.2f} -> {d.predicted_latency_new_ms:.2f}"
                if d.predicted_latency_old_ms or d.predicted_latency_new_ms else "")
        table.add_row(when, d.kind, epoch, d.triggers or "-", cost, d.reason)
    return table


def policy_table(values: dict[str, str]) -> Table:
    table = Table(title="adaptive policy")
    table.add_column("key")
    table.add_column("value")
    for key in sorted(values):
        table.add_row(key, values[key])
    return table
