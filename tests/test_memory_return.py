"""Weights of a released segment leave the node's resident memory instead of staying in glibc's free lists."""

from __future__ import annotations

import json
import subprocess
import sys

from common.model_import import EMBEDDED_MODEL_NAME
from common.model_store import ModelStore, StoredModel
from common.spans import Span
from node_agent.segment_pool import SegmentPool

# Big blocks interleaved with small live ones, as a segment's tensors sit among other allocations: freeing
# the big ones leaves holes that glibc keeps, so only a trim can hand them back.
PROGRAM = """
import json, psutil, torch
from node_agent.memory import return_freed_memory
rss = lambda: psutil.Process().memory_info().rss / 1e6
torch.ones(1_000_000)  # one free of a large block raises glibc's mmap threshold, as loading weights does
base = rss()
big, small = [], []
for _ in range(60):
    big.append(torch.ones(1_000_000))
    small.append(torch.ones(16))
del big
held = rss()
trimmed = return_freed_memory()
print(json.dumps({"base": base, "held": held, "after": rss(), "trimmed": trimmed}))
"""


def _run(program: str, *args: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", program, *args], capture_output=True, text=True, check=True,
                         timeout=120)
    figures: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return figures


def test_freed_tensors_are_returned_to_the_os() -> None:
    figures = _run(PROGRAM)
    assert figures["trimmed"]
    assert figures["held"] - figures["base"] > 150  # without the trim the 240 MB stay resident
    assert figures["after"] < figures["base"] + 60


# A session or runner caught in a reference cycle: refcounts never reach zero, only the collector frees it.
CYCLE_PROGRAM = """
import gc, json, psutil, torch
from node_agent.memory import return_freed_memory
rss = lambda: psutil.Process().memory_info().rss / 1e6
gc.disable()  # as in a node with hundreds of thousands of objects: the full collection is far off
base = rss()
class Holder:
    pass
holder = Holder()
holder.me = holder
holder.weights = torch.ones(60_000_000)  # 240 MB
del holder
held = rss()
return_freed_memory()
print(json.dumps({"base": base, "held": held, "after": rss()}))
"""

FREEZE_PROGRAM = """
import gc, json
import node_agent.server  # everything a node imports before it serves
from node_agent.memory import freeze_startup_objects
tracked = len(gc.get_objects())
frozen = freeze_startup_objects()
print(json.dumps({"tracked": tracked, "frozen": frozen, "left": len(gc.get_objects())}))
"""


# Decrypted layers of an encrypted store, loaded among small live blocks after glibc's mmap threshold rose.
LAYERS_PROGRAM = """
import json, sys, psutil, torch
from common.model_store import ModelStore, layer_role
rss = lambda: psutil.Process().memory_info().rss / 1e6
torch.ones(5_000_000)  # freeing 20 MB raises glibc's mmap threshold past a layer's 14 MB
model = ModelStore(sys.argv[1]).open(sys.argv[2])
assert model.manifest.encrypted
live = [torch.ones(16)]
base = rss()
layers = []
for index in range(8):
    layers.append(model.load_tensors(layer_role(index)))
    live.append(torch.ones(16))  # the node's other allocations, made between loads
loaded = rss()
del layers
print(json.dumps({"base": base, "loaded": loaded, "after": rss()}))
"""


def test_tensors_held_only_by_a_reference_cycle_are_returned() -> None:
    figures = _run(CYCLE_PROGRAM)
    assert figures["held"] - figures["base"] > 200
    assert figures["after"] < figures["base"] + 40


def test_start_up_objects_leave_the_collectors_walk() -> None:
    """A full collection walks what is not frozen; before the freeze that was every imported object."""
    figures = _run(FREEZE_PROGRAM)
    assert figures["tracked"] > 100_000  # torch, transformers, grpc and the node's own modules
    assert figures["frozen"] >= 0.9 * figures["tracked"]
    assert figures["left"] < 0.01 * figures["tracked"]


def test_released_decrypted_layers_leave_resident_memory_without_a_trim(store: ModelStore) -> None:
    """Decrypted weights get mappings of their own, as a plaintext store's mapped files are: released, they are
    gone, whatever the heap around them holds."""
    figures = _run(LAYERS_PROGRAM, str(store.root), EMBEDDED_MODEL_NAME)
    assert figures["loaded"] - figures["base"] > 100  # 8 layers of 14 MB
    assert figures["after"] < figures["base"] + 15


def test_pool_says_when_a_segment_was_unloaded(store: ModelStore, embedded: StoredModel) -> None:
    pool = SegmentPool(store)
    span = Span(3, 4)
    pool.acquire(embedded.digest, span)
    pool.acquire(embedded.digest, span)
    pool.release(embedded.digest, span)
    assert not pool.take_unloaded()  # still held once
    pool.release(embedded.digest, span)
    assert pool.take_unloaded()
    assert not pool.take_unloaded()
    assert pool.spans() == []
