"""The whole model in one process, from the store: the oracle the mesh is checked against."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from common.int8 import embedding_from, is_quantized, load_module
from common.model_config import config_from_manifest
from common.model_store import EMBED_ROLE, HEAD_ROLE, StoredModel, layer_role


def load_reference_model(model: StoredModel) -> PreTrainedModel:
    """Assemble a plain transformers model from every store file (tests and benchmarks only).

    It computes in the store's compute dtype; int8 files get the same int8 leaves a segment uses, so
    ``generate`` on it is the oracle for the same weights in the same dtype.
    """
    config = config_from_manifest(model.manifest.config)
    dtype = getattr(torch, model.manifest.compute_dtype)
    with torch.device("meta"):
        full: PreTrainedModel = AutoModelForCausalLM.from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
    embed = model.load_tensors(EMBED_ROLE)
    head = model.load_tensors(HEAD_ROLE)
    for i in range(model.num_layers):
        load_module(full.model.layers[i], model.load_tensors(layer_role(i)), dtype)
    full.model.norm.load_state_dict({"weight": head["norm.weight"]}, assign=True, strict=True)
    tied = model.manifest.tied_embeddings
    if is_quantized(embed):
        table = embedding_from(embed, dtype)
        full.model.embed_tokens = table
        if tied:
            full.lm_head = table.as_linear()
        else:
            load_module(full.lm_head, {k.removeprefix("lm_head."): v for k, v in head.items()
                                       if k.startswith("lm_head.")}, dtype)
    else:
        full.model.embed_tokens.load_state_dict(embed, assign=True, strict=True)
        if tied:
            full.lm_head.weight = full.model.embed_tokens.weight
        else:
            full.lm_head.load_state_dict({"weight": head["lm_head.weight"]}, assign=True, strict=True)
    rotary = full.model.rotary_emb
    full.model.rotary_emb = type(rotary)(config=config)  # inv_freq buffers are computed, not stored
    full.train(False)
    return full
