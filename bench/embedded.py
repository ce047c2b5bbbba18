"""The set-up most benchmarks share: the embedded model from the store, its single-process reference and tokenizer."""

from __future__ import annotations

import importlib.metadata
import tempfile
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from common.model_import import EMBEDDED_MODEL_NAME, ensure_embedded
from common.model_store import ModelStore, StoredModel
from common.reference_model import load_reference_model

TEXT_SOURCE = ("grpcio", "licenses/LICENSE")  # the Apache-2.0 text (and the licences after it) grpcio ships


@dataclass(frozen=True)
class EmbeddedModel:
    store: ModelStore
    model: StoredModel
    reference: PreTrainedModel  # transformers' generate on the same weights and dtype: the oracle
    tokenizer: PreTrainedTokenizerBase


def embedded_model(store_path: str) -> EmbeddedModel:
    """Import the embedded model into ``store_path`` if needed and load its reference and tokenizer."""
    store = ModelStore(Path(store_path).expanduser())
    ensure_embedded(store)
    model = store.open(EMBEDDED_MODEL_NAME)
    tokenizer = AutoTokenizer.from_pretrained(str(model.export_tokenizer(Path(tempfile.mkdtemp()))))
    return EmbeddedModel(store, model, load_reference_model(model), tokenizer)


def shipped_text() -> str:
    """A fixed text of several thousand tokens that ships with an installed package: nothing is downloaded."""
    return importlib.metadata.distribution(TEXT_SOURCE[0]).read_text(TEXT_SOURCE[1]) or ""
