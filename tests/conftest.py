"""Shared fixtures: the embedded model in a store, the single-process oracle, and live local meshes."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from common.model_import import EMBEDDED_MODEL_NAME, ensure_embedded
from common.model_store import ModelStore, StoredModel
from common.reference_model import load_reference_model
from common.store_encryption import encrypted_copy
from splitmesh.launcher import LocalMesh, MeshSpec, free_port

STORE = Path(os.environ.get("SPLITMESH_STORE", "~/.cache/splitmesh/store")).expanduser()


@pytest.fixture(scope="session")
def store() -> ModelStore:
    """The shared store with the embedded model imported (once per machine: it takes ~30 s)."""
    model_store = ModelStore(STORE)
    ensure_embedded(model_store)
    return model_store


@pytest.fixture(scope="session")
def encrypted_store(store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """The embedded model in a private store, weights encrypted at rest (`splitmesh model encrypt`); the
    shared store is never changed."""
    return encrypted_copy(store, EMBEDDED_MODEL_NAME, tmp_path_factory.mktemp("encrypted-store"))


@pytest.fixture(scope="session")
def embedded(store: ModelStore) -> StoredModel:
    return store.open(EMBEDDED_MODEL_NAME)


@pytest.fixture(scope="session")
def tokenizer(embedded: StoredModel) -> PreTrainedTokenizerBase:
    folder = embedded.export_tokenizer(Path(tempfile.mkdtemp(prefix="splitmesh-tok-")))
    return AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="session")
def reference(embedded: StoredModel) -> PreTrainedModel:
    return load_reference_model(embedded)


def reference_greedy(model: PreTrainedModel, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Single-process transformers ``generate`` (greedy, fp32): the oracle for every split."""
    with torch.inference_mode():
        mask = torch.ones(1, len(prompt_ids), dtype=torch.long)
        out = model.generate(  # type: ignore[operator]
            torch.tensor([prompt_ids]), attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=model.config.eos_token_id)
    return [int(t) for t in out[0, len(prompt_ids):]]


@pytest.fixture(scope="session")
def mesh(store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """Orchestrator + 5 node agents as real processes on loopback; node-0 and node-4 are trusted."""
    spec = MeshSpec(nodes=5, store=store.root, workdir=tmp_path_factory.mktemp("mesh"), orchestrator_port=0,
                    trusted=("node-0", "node-4"), metrics_port=free_port())
    with LocalMesh(spec) as local:
        yield local


@pytest.fixture(scope="session")
def dtype_store(embedded: StoredModel, tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """A store holding the embedded model converted to bfloat16 and int8 (names ``<embedded>-<dtype>``)."""
    from common.model_import import default_name, import_stored

    converted = ModelStore(tmp_path_factory.mktemp("dtype-store"))
    for dtype in ("bfloat16", "int8"):
        import_stored(converted, embedded, default_name(EMBEDDED_MODEL_NAME, dtype), dtype)
    return converted
