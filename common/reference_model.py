"""The whole model in one process, from the store: the oracle the mesh is checked against."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from common.model_config import config_from_manifest, torch_dtype_name
from common.model_store import EMBED_ROLE, HEAD_ROLE, StoredModel, layer_role


def load_reference_model(model: StoredModel) -> PreTrainedModel:
    """Assemble a plain transformers model from every store file (tests and benchmarks only)."""
    config = config_from_manifest(model.manifest.config)
    dtype = getattr(torch, torch_dtype_name(model.manifest.config))
    with torch.device("meta"):
        full: PreTrainedModel = AutoModelForCausalLM.from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
    state: dict[str, torch.Tensor] = {"model.embed_tokens.weight": model.load_tensors(EMBED_ROLE)["weight"]}
    for i in range(model.num_layers):
        for key, value in model.load_tensors(layer_role(i)).items():
            state[f"model.layers.{i}.{key}"] = value
    head = model.load_tensors(HEAD_ROLE)
    state["model.norm.weight"] = head["norm.weight"]
    tied = model.manifest.tied_embeddings
    state["lm_head.weight"] = state["model.embed_tokens.weight"] if tied else head["lm_head.weight"]
    full.load_state_dict(state, assign=True, strict=True)
    if model.manifest.tied_embeddings:
        full.tie_weights()
    rotary = full.model.rotary_emb
    full.model.rotary_emb = type(rotary)(config=config)  # inv_freq buffers are computed, not stored
    full.train(False)
    return full
