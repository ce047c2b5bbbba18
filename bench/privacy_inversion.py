"""How much of a prompt an untrusted node recovers from the activations it receives, by depth.

The node hosting layers from k on receives the output of layers [0, k) (what the head's segment sends:
computed here by the head's own code, node_agent.segment.SegmentRunner). Two attackers:

- *with the weights of [0, k)* (a public model, or a store without encryption): nearest neighbour per
  position against a dictionary of every token's context-free state after [0, k), then an exhaustive
  per-position search that runs every candidate token through [0, k) after the prefix recovered so far
  (candidates in nearest-neighbour order, stopping at an exact match or after ``--max-candidates``);
- *without those weights* (what an encrypted store enforces): no table maps a state to a token, so the
  question is what the states alone give away. Measured: nearest neighbour against the embedding of a
  model of the same architecture with other (random) weights, and *linkage*: how often a position's
  nearest other observed state (over every prompt) holds the same token, i.e. how well an attacker can
  group equal tokens for frequency analysis.

    .venv/bin/python bench/privacy_inversion.py --depths 1,2,4,8,16 --attack-tokens 8 --max-candidates 4096
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedTokenizerBase

from common.model_config import config_from_manifest
from common.model_import import EMBEDDED_MODEL_NAME, ensure_embedded
from common.model_store import ModelStore, StoredModel
from common.spans import Span
from node_agent.segment import SegmentRunner

SECRET = "My PIN is 4471 and my password is tulip-garden-88."
CORPUS = [
    SECRET,
    "The water cycle moves water between the oceans, the air and the land.",
    "Please send the invoice to my office address before Friday.",
    "The patient reported chest pain and shortness of breath since Monday.",
    "Transfer 2500 dollars from my savings account to the account of my landlord.",
    "The meeting with the board is moved to Tuesday at nine in the morning.",
    "My daughter's school is on the corner of Elm Street and the river road.",
    "The contract ends in March and the rent goes up by ten percent.",
]
EXACT = 1e-3  # relative L2 distance under which a candidate counts as the observed state


def states(runner: SegmentRunner, ids: list[int]) -> torch.Tensor:
    """What the head's segment [0, k) sends for a prompt: hidden states [n, H]."""
    return runner.run(runner.new_cache(), torch.tensor([ids]), 0)[0].float()


@torch.inference_mode()
def dictionary(runner: SegmentRunner, vocab: int, batch: int) -> torch.Tensor:
    """Every token's state after [0, k) on its own at position 0: the table nearest neighbour looks up."""
    rows = [runner.run(runner.new_cache(), torch.arange(lo, min(lo + batch, vocab)).unsqueeze(1), 0)[:, 0].float()
            for lo in range(0, vocab, batch)]
    return torch.cat(rows)


def nearest(table: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Token ids of the table rows closest (cosine) to each row of ``hidden``, best first: [n, V]."""
    t = torch.nn.functional.normalize(table.float(), dim=-1)
    h = torch.nn.functional.normalize(hidden.float(), dim=-1)
    return (h @ t.T).argsort(dim=-1, descending=True)


@torch.inference_mode()
def exhaustive(runner: SegmentRunner, observed: torch.Tensor, order: torch.Tensor, max_candidates: int,
               batch: int) -> tuple[list[int], list[float], list[int]]:
    """Per position: the candidate whose state after [0, k) (given the recovered prefix) is closest to the
    observed one; returns the tokens, seconds per position and candidates tried."""
    recovered: list[int] = []
    seconds: list[float] = []
    tried: list[int] = []
    for pos in range(observed.shape[0]):
        started = time.perf_counter()
        prefix = runner.new_cache()
        if recovered:
            runner.run(prefix, torch.tensor([recovered]), 0)
        target = observed[pos]
        best, best_d, count = -1, float("inf"), 0
        for lo in range(0, min(max_candidates, order.shape[1]), batch):
            cand = order[pos, lo:lo + batch]
            cache = DynamicCache()
            if recovered:
                for layer in range(len(runner.layers)):
                    k, v = prefix.layers[layer].keys, prefix.layers[layer].values  # type: ignore[union-attr]
                    assert k is not None and v is not None
                    cache.update(k.expand(len(cand), -1, -1, -1).contiguous(),
                                 v.expand(len(cand), -1, -1, -1).contiguous(), layer)
            out = runner.run(cache, cand.unsqueeze(1), pos)[:, 0].float()
            d = (out - target).norm(dim=-1) / target.norm()
            i = int(d.argmin())
            count += len(cand)
            if float(d[i]) < best_d:
                best, best_d = int(cand[i]), float(d[i])
            if best_d < EXACT:
                break
        recovered.append(best)
        seconds.append(time.perf_counter() - started)
        tried.append(count)
    return recovered, seconds, tried


def linkage(observed: list[torch.Tensor], ids: list[list[int]]) -> float:
    """Share of positions (whose token occurs more than once) whose nearest other state has the same token."""
    h = torch.nn.functional.normalize(torch.cat(observed).float(), dim=-1)
    tokens = [t for row in ids for t in row]
    counts = Counter(tokens)
    sim = h @ h.T
    sim.fill_diagonal_(-2.0)
    partner = sim.argmax(dim=-1).tolist()
    rows = [i for i, t in enumerate(tokens) if counts[t] > 1]
    return float(sum(tokens[partner[i]] == tokens[i] for i in rows) / max(1, len(rows)))


def random_table(model: StoredModel) -> torch.Tensor:
    """The embedding table of a freshly initialised model of the same architecture (weights unknown)."""
    torch.manual_seed(0)
    other = AutoModelForCausalLM.from_config(config_from_manifest(model.manifest.config))  # type: ignore[no-untyped-call]
    table: torch.Tensor = other.model.embed_tokens.weight.detach()
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", default="1,2,4,8,16", help="k: the attacker receives the output of layers [0, k)")
    ap.add_argument("--attack-tokens", type=int, default=8, help="tokens of the secret prompt to recover per depth")
    ap.add_argument("--max-candidates", type=int, default=4096, help="exhaustive search: candidates per position")
    ap.add_argument("--batch", type=int, default=512, help="candidates run through [0, k) at once")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--store", default="~/.cache/splitmesh/store")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    store = ModelStore(Path(args.store).expanduser())
    ensure_embedded(store)
    model = store.open(EMBEDDED_MODEL_NAME)
    tok: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(model.export_tokenizer(
        Path(tempfile.mkdtemp(prefix="splitmesh-tok-")))))
    ids = [list(tok(text)["input_ids"]) for text in CORPUS]
    secret = ids[0][:args.attack_tokens]
    table = model.load_tensors("embed")["weight"]
    blind = random_table(model)  # no weights: the nearest-neighbour table comes from other weights
    rows = []
    for k in [int(x) for x in args.depths.split(",")]:
        runner = SegmentRunner(model, Span(0, k))
        observed = [states(runner, row) for row in ids]
        target = observed[0][:len(secret)]
        started = time.perf_counter()
        order = nearest(dictionary(runner, table.shape[0], args.batch * 4), target)
        nn_s = (time.perf_counter() - started) / len(secret)  # includes building the dictionary
        nn_hits = sum(int(order[i, 0]) == t for i, t in enumerate(secret))
        ranks = [int((order[i] == t).nonzero()[0, 0]) for i, t in enumerate(secret)]
        got, seconds, tried = exhaustive(runner, target, order, args.max_candidates, args.batch)
        ex_hits = sum(g == t for g, t in zip(got, secret, strict=True))
        blind_hits = sum(int(r[0]) == t for r, t in zip(nearest(blind, target), secret, strict=True))
        rows.append({"k": k, "tokens": len(secret), "nn_rate": nn_hits / len(secret), "nn_s_per_token": nn_s,
                     "nn_median_rank": sorted(ranks)[len(ranks) // 2],
                     "exhaustive_rate": ex_hits / len(secret), "exhaustive_s_per_token": sum(seconds) / len(seconds),
                     "exhaustive_mean_candidates": sum(tried) / len(tried),
                     "recovered": tok.decode(got),
                     "blind_nn_rate": blind_hits / len(secret), "blind_linkage": linkage(observed, ids)})
        del runner
    console = Console()
    table_out = Table(title=f"prompt recovery from the output of layers [0, k) ({len(secret)} tokens of "
                            f"{SECRET[:24]!r}..., {args.threads} threads)")
    for name in ("k", "NN rate", "NN s/tok", "NN median rank", "exhaustive rate", "exhaustive s/tok",
                 "candidates/tok", "recovered", "no weights: NN rate", "no weights: linkage"):
        table_out.add_column(name)
    for r in rows:
        table_out.add_row(str(r["k"]), f"{r['nn_rate']:.0%}", f"{r['nn_s_per_token']:.4f}", str(r["nn_median_rank"]),
                          f"{r['exhaustive_rate']:.0%}", f"{r['exhaustive_s_per_token']:.2f}",
                          f"{r['exhaustive_mean_candidates']:.0f}", repr(r["recovered"]),
                          f"{r['blind_nn_rate']:.0%}", f"{r['blind_linkage']:.0%}")
    console.print(table_out)
    print(json.dumps({"bench": "privacy_inversion", "max_candidates": args.max_candidates, "threads": args.threads,
                      "depths": rows}))


if __name__ == "__main__":
    main()
