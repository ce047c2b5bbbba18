"""Who gets a session on this node: slots taken atomically, and the owner of every generation it heads.

A slot belongs to a session id, not to a pipeline: the head's generation, the tail segment it also
hosts and a replay's stream on a newer epoch share one. Taking a slot never awaits, so concurrent
opens cannot all pass the check before any of them is counted.

A generation belongs to the identity that opened it (its client certificate; no identity in dev mode
without TLS, where the unguessable session id is the only capability). Only that identity or the
orchestrator may cancel it; anyone else hears NOT_FOUND, exactly as for an id that does not exist, so
a stranger cannot even learn which sessions run.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from common.certs import Identity


class SessionLimitError(Exception):
    """This node already serves its maximum number of sessions."""


class SessionSlots:
    """At most ``limit`` distinct session ids hold a slot; each holder counts its takes."""

    def __init__(self, node_id: str, limit: int) -> None:
        self._node_id = node_id
        self.limit = limit
        self._held: dict[str, int] = {}

    def take(self, session_id: str) -> None:
        """Count one more holder of ``session_id``'s slot; a new session needs a free one."""
        count = self._held.get(session_id, 0)
        if count == 0 and len(self._held) >= self.limit:
            raise SessionLimitError(f"node {self._node_id} already serves {self.limit} sessions")
        self._held[session_id] = count + 1

    def give(self, session_id: str) -> None:
        count = self._held.get(session_id, 0) - 1
        if count > 0:
            self._held[session_id] = count
        else:
            self._held.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._held)


@dataclass
class Generation:
    """One generation this head runs: who opened it, and the task that streams it."""

    owner: Identity | None
    task: asyncio.Task[object] | None
    cancelled: bool = field(default=False)


class Generations:
    """The generations this node heads, by session id."""

    def __init__(self) -> None:
        self._running: dict[str, Generation] = {}

    def add(self, session_id: str, owner: Identity | None) -> Generation:
        generation = Generation(owner, asyncio.current_task())
        self._running[session_id] = generation
        return generation

    def remove(self, session_id: str) -> None:
        self._running.pop(session_id, None)

    def cancel(self, session_id: str, caller: Identity | None) -> bool:
        """Cancel the generation if ``caller`` may; False means "no such session" to this caller."""
        generation = self._running.get(session_id)
        if generation is None:
            return False
        if not (caller == generation.owner or (caller is not None and caller.kind == "orchestrator")):
            return False
        generation.cancelled = True
        if generation.task is not None:
            generation.task.cancel()
        return True


class BatchAdmission:
    """What a head takes on beyond its slots: generations (``max_rows`` in a batch plus ``max_queued`` waiting
    their turn) and prompt tokens admitted but not yet prefilled. Both are checked and taken without awaiting,
    before any node works on the request, so a burst cannot slip past them."""

    def __init__(self, node_id: str, max_rows: int, max_queued: int, max_pending_tokens: int) -> None:
        self._node_id = node_id
        self.max_generations = max_rows + max_queued
        self.max_pending_tokens = max_pending_tokens
        self._running: set[str] = set()
        self._owed: dict[str, int] = {}  # session id -> prompt tokens still to prefill

    def admit(self, session_id: str) -> None:
        if session_id not in self._running and len(self._running) >= self.max_generations:
            raise SessionLimitError(f"head {self._node_id} already runs {self.max_generations} generations "
                                    f"(max_batch_rows + max_queued_sessions)")
        self._running.add(session_id)

    def owe(self, session_id: str, tokens: int) -> None:
        """Count ``tokens`` of prompt still to prefill; refused when the pending total would pass the limit."""
        pending = self.pending_tokens()
        if pending + tokens > self.max_pending_tokens:
            raise SessionLimitError(f"head {self._node_id} holds {pending} prompt tokens waiting for prefill; "
                                    f"{tokens} more would pass max_batch_tokens ({self.max_pending_tokens})")
        self._owed[session_id] = tokens

    def prefilled(self, session_id: str) -> None:
        self._owed.pop(session_id, None)

    def leave(self, session_id: str) -> None:
        self._owed.pop(session_id, None)
        self._running.discard(session_id)

    def pending_tokens(self) -> int:
        return sum(self._owed.values())

    def __len__(self) -> int:
        return len(self._running)
