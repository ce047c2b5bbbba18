"""Build a transformers config object from a stored manifest."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig


def config_from_manifest(config: dict[str, Any]) -> PretrainedConfig:
    """The stored config with sdpa attention, as ``from_pretrained`` would pick on CPU."""
    fields = dict(config)
    model_type = fields.pop("model_type", "llama")
    built = AutoConfig.for_model(model_type, **fields)
    built._attn_implementation = "sdpa"
    return built


def torch_dtype_name(config: dict[str, Any], default: str = "float32") -> str:
    value = config.get("dtype") or config.get("torch_dtype") or default
    return str(value).removeprefix("torch.")
