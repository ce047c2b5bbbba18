"""Many sessions with mixed prompt lengths through a 3-node mesh, across a live re-split and a kill -9.

Every session is checked against single-process ``generate`` on its prompt alone with the per-session rule
of ``bench/session_oracle.py`` (a session that moved plans is compared, from its move on, with ``generate``
continued from its prompt plus the tokens before the move). While the sessions run, the operator re-splits
the mesh once 20% of all tokens have arrived, and the middle node is killed with SIGKILL at 45%. Every
session must complete. Prints a table by outcome, then one JSON line.

    .venv/bin/python bench/mixed_sessions.py --sessions 64 --tokens 24 --max-prompt 1500
    .venv/bin/python bench/mixed_sessions.py --sessions 8 --tokens 12 --max-prompt 300   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node_agent.openmp import bound_spinning

bound_spinning(1000)

from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402
from transformers import PreTrainedModel  # noqa: E402

from bench.embedded import embedded_model, shipped_text  # noqa: E402
from bench.session_oracle import TIE_TOLERANCE, judge, reference_with_gaps  # noqa: E402
from splitmesh.client import SplitmeshError  # noqa: E402
from splitmesh.launcher import LocalMesh, MeshSpec  # noqa: E402


def prompt_lengths(sessions: int, longest: int) -> list[int]:
    """From 1 to ``longest`` tokens, spaced geometrically and interleaved so long and short ones mix."""
    if sessions == 1:
        return [longest]
    lengths = [max(1, round(longest ** (i / (sessions - 1)))) for i in range(sessions)]
    return lengths[0::2] + lengths[1::2][::-1]


@dataclass
class Session:
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    error: str = ""

    def moved_at(self) -> int | None:
        return next((i for i, e in enumerate(self.epochs) if e != self.epochs[0]), None)


def verdict(session: Session, reference: PreTrainedModel, expected: tuple[list[int], list[float]],
            new: int) -> tuple[bool, str]:
    """(passes, outcome) under the per-session rule, the replay after a move included."""
    if session.error or len(session.tokens) != new:
        return False, f"incomplete: {session.error or len(session.tokens)}"
    whole = judge(session.tokens, *expected)
    if whole.ok:
        return True, "equal" if not whole.needed_tolerance else "near-tie"
    moved = session.moved_at()
    if moved is None:
        return False, whole.describe()
    before = judge(session.tokens[:moved], expected[0][:moved], expected[1][:moved])
    after = judge(session.tokens[moved:], *reference_with_gaps(reference, session.prompt + session.tokens[:moved],
                                                               new - moved))
    if before.ok and after.ok:
        return True, "continues after move"
    return False, f"before move: {before.describe()}; after: {after.describe()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=24, help="tokens generated per session")
    parser.add_argument("--max-prompt", type=int, default=1500, help="the longest prompt, in tokens")
    parser.add_argument("--store", default="~/.cache/splitmesh/store")
    args = parser.parse_args()
    console = Console()
    embedded = embedded_model(args.store)
    store, reference, tokenizer = embedded.store, embedded.reference, embedded.tokenizer
    text = shipped_text()
    ids = [int(i) for i in tokenizer(text)["input_ids"]]
    if len(ids) < args.max_prompt + 7 * args.sessions:
        raise SystemExit(f"the text has {len(ids)} tokens, too few for these prompts")
    sessions = [Session(ids[7 * k:7 * k + n]) for k, n in enumerate(prompt_lengths(args.sessions, args.max_prompt))]
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("reference generate per prompt", total=len(sessions))
        expected = []
        for s in sessions:
            expected.append(reference_with_gaps(reference, s.prompt, args.tokens))
            progress.advance(task)

    total = args.tokens * len(sessions)
    limit = str(len(sessions))
    env = {"SPLITMESH_MAX_BATCH_ROWS": limit, "SPLITMESH_MAX_QUEUED_SESSIONS": limit,
           "SPLITMESH_MAX_BATCH_TOKENS": str(max(8192, sum(len(s.prompt) for s in sessions)))}
    spec = MeshSpec(nodes=3, store=store.root, workdir=Path(tempfile.mkdtemp(prefix="splitmesh-mixed-")),
                    orchestrator_port=0, trusted=("node-0", "node-2"), boundaries=(0, 10, 20, 30),
                    placement=("node-0", "node-1", "node-2"), extra_env=env)
    received = threading.Semaphore(0)
    events: dict[str, float] = {}

    def run(session: Session, mesh: LocalMesh, go: threading.Barrier) -> None:
        with mesh.client() as client:
            go.wait()
            try:
                for event in client.generate(session.prompt, max_new_tokens=args.tokens, ignore_eos=True):
                    session.tokens.append(event.token_id)
                    session.epochs.append(event.epoch)
                    received.release()
            except SplitmeshError as exc:
                session.error = f"{exc.code}: {exc}"

    with LocalMesh(spec) as mesh, Progress(console=console, transient=True) as progress:
        go = threading.Barrier(len(sessions) + 1)
        threads = [threading.Thread(target=run, args=(s, mesh, go)) for s in sessions]
        for thread in threads:
            thread.start()
        task = progress.add_task(f"{len(sessions)} sessions x {args.tokens} tokens", total=total)
        start = time.monotonic()
        go.wait()
        seen = 0
        while any(t.is_alive() for t in threads):
            if received.acquire(timeout=1.0):
                seen += 1
                progress.advance(task)
            if "resplit" not in events and seen >= 0.20 * total:
                events["resplit"] = time.monotonic() - start
                with mesh.client(operator=True) as operator:
                    operator.resplit((0, 14, 22, 30), ("node-0", "node-1", "node-2"))
            if "kill" not in events and seen >= 0.45 * total:
                events["kill"] = time.monotonic() - start
                mesh.signal("node-1", signal.SIGKILL)
        elapsed = time.monotonic() - start

    outcomes = [verdict(s, reference, e, args.tokens) for s, e in zip(sessions, expected, strict=True)]
    table = Table(title=f"{len(sessions)} sessions, prompts 1-{args.max_prompt} tokens, {args.tokens} new tokens "
                        f"each, top-2 tolerance {TIE_TOLERANCE}")
    for column in ("outcome", "sessions", "moved plans"):
        table.add_column(column, justify="right")
    counts: dict[str, list[int]] = {}
    for (ok, outcome), s in zip(outcomes, sessions, strict=True):
        key = outcome if ok else f"FAIL {outcome}"
        counts.setdefault(key, [0, 0])
        counts[key][0] += 1
        counts[key][1] += s.moved_at() is not None
    for key, (n, moved) in sorted(counts.items()):
        table.add_row(key, str(n), str(moved))
    console.print(table)
    passed = sum(ok for ok, _ in outcomes)
    console.print(f"{passed} of {len(sessions)} sessions pass; re-split at {events.get('resplit', -1):.1f} s, "
                  f"kill -9 of node-1 at {events.get('kill', -1):.1f} s, all done at {elapsed:.1f} s")
    print(json.dumps({"sessions": len(sessions), "tokens": args.tokens, "max_prompt": args.max_prompt,
                      "passed": passed, "outcomes": {k: v[0] for k, v in counts.items()},
                      "moved": sum(s.moved_at() is not None for s in sessions), "events_s": events,
                      "elapsed_s": round(elapsed, 1), "tokens_per_s": round(total / elapsed, 2)}))
    return 0 if passed == len(sessions) else 1


if __name__ == "__main__":
    sys.exit(main())
