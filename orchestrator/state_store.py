"""The orchestrator's durable state in SQLite: the epoch high-water mark and committed plans.

A restart reloads the last committed plan and never issues an epoch at or below one it issued.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from common.proto import splitmesh_pb2 as pb

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS plans (
    epoch INTEGER PRIMARY KEY,
    plan_bytes BLOB NOT NULL,
    signature BLOB NOT NULL,
    key_id TEXT NOT NULL,
    committed_at REAL
);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    record BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    last_registered REAL NOT NULL
);
"""


class StateStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def next_epoch(self) -> int:
        """Reserve and durably record the next epoch (so an aborted epoch is never reused)."""
        with self._db:
            row = self._db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
            epoch = (int(row[0]) if row else 0) + 1
            self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('epoch', ?)", (str(epoch),))
        return epoch

    def record_plan(self, signed: pb.SignedPlan, epoch: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO plans(epoch, plan_bytes, signature, key_id) VALUES (?,?,?,?)",
                         (epoch, signed.plan_bytes, signed.signature, signed.key_id))

    def mark_committed(self, epoch: int) -> None:
        self._db.execute("UPDATE plans SET committed_at=? WHERE epoch=?", (time.time(), epoch))

    def committed_plan(self) -> pb.SignedPlan | None:
        row = self._db.execute("SELECT plan_bytes, signature, key_id FROM plans WHERE committed_at IS NOT NULL "
                               "ORDER BY epoch DESC LIMIT 1").fetchone()
        return None if row is None else pb.SignedPlan(plan_bytes=row[0], signature=row[1], key_id=row[2])

    def record_decision(self, record: pb.DecisionRecord, keep_last: int = 10_000) -> None:
        self._db.execute("INSERT INTO decisions(record) VALUES (?)", (record.SerializeToString(),))
        self._db.execute("DELETE FROM decisions WHERE id <= (SELECT MAX(id) FROM decisions) - ?", (keep_last,))

    def decisions(self, limit: int, kinds: set[str] | frozenset[str] = frozenset()) -> list[pb.DecisionRecord]:
        """The newest ``limit`` decisions (of ``kinds``, when given), oldest first."""
        out: list[pb.DecisionRecord] = []
        for (raw,) in self._db.execute("SELECT record FROM decisions ORDER BY id DESC"):
            record = pb.DecisionRecord()
            record.ParseFromString(raw)
            if not kinds or record.kind in kinds:
                out.append(record)
                if len(out) >= limit:
                    break
        return out[::-1]

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def remember_node(self, node_id: str, address: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO nodes(node_id, address, last_registered) VALUES (?,?,?)",
                         (node_id, address, time.time()))
