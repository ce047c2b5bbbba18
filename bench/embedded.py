"""The set-up most benchmarks share: the embedded model from the store, its single-process reference and tokenizer."""

from __future__ import annotations

import importlib.metadata
import tempfile
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from common.model_import import EMBEDDED_MODEL_NAME, default_name, ensure_embedded, import_stored
from common.model_store import ModelStore, StoredModel
from common.reference_model import load_reference_model

TEXT_SOURCE = ("grpcio", "licenses/LICENSE")  # the Apache-2.0 text (and the licences after it) grpcio ships


@dataclass(frozen=True)
class EmbeddedModel:
    store: ModelStore
    model: StoredModel
    reference: PreTrainedModel  # transformers' generate on the same weights and dtype: the oracle
    tokenizer: PreTrainedTokenizerBase


def model_in(store: ModelStore, dtype: str) -> StoredModel:
    """The embedded model in ``dtype``, converted from the fp32 import the first time."""
    fp32 = store.open(ensure_embedded(store))
    if dtype == "float32":
        return fp32
    name = default_name(EMBEDDED_MODEL_NAME, dtype)
    if name not in store.names() or store.open(name).missing_or_corrupt():
        import_stored(store, fp32, name, dtype)
    return store.open(name)


def embedded_model(store_path: str, dtype: str = "float32") -> EmbeddedModel:
    """The embedded model in ``dtype`` (imported or converted into ``store_path`` if needed), its reference
    and tokenizer."""
    store = ModelStore(Path(store_path).expanduser())
    model = model_in(store, dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(model.export_tokenizer(Path(tempfile.mkdtemp()))))
    return EmbeddedModel(store, model, load_reference_model(model), tokenizer)


def shipped_text() -> str:
    """A fixed text of several thousand tokens that ships with an installed package: nothing is downloaded."""
    return importlib.metadata.distribution(TEXT_SOURCE[0]).read_text(TEXT_SOURCE[1]) or ""
