"""int8 weight-only quantization: per-output-channel symmetric scales, run by torch's own int8 kernel.

Weights are stored as int8 with one scale per output row and multiplied by ``torch._weight_int8pack_mm``
(int8 weights, bf16 activations, the CPU kernel torchao's int8 weight-only path was built on). Only
the ``nn.Linear`` / ``nn.Embedding`` leaves of transformers' modules are swapped for these; the layers
around them stay transformers' own. A module is swapped only where its store file carries a ``scale``,
so the file, not a list of names, decides what is quantized.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from common.model_store import TENSOR_ALIGN

SCALE_KEY = "scale"
_QMAX = 127.0


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in memory aligned for the int8 kernel: tensors read from safetensors sit at any offset."""
    return tensor if tensor.data_ptr() % TENSOR_ALIGN == 0 else tensor.clone()  # the kernel SIGSEGVs off it


def quantize_rows(weight: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """``[rows, cols]`` float -> (int8 ``[rows, cols]``, scale ``[rows]``) with ``weight ~= q * scale``."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / _QMAX).clamp(min=1e-12).to(scale_dtype)
    q = torch.round(w / scale.float().unsqueeze(1)).clamp(-_QMAX, _QMAX).to(torch.int8)
    return q.contiguous(), scale.contiguous()


class Int8Linear(nn.Module):
    """``y = x @ (q * scale).T (+ bias)`` without materialising the float weight."""

    weight: torch.Tensor
    scale: torch.Tensor

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer(SCALE_KEY, torch.empty(out_features, dtype=dtype))
        self.bias: torch.Tensor | None = None
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.scale.dtype).contiguous()
        out = torch._weight_int8pack_mm(flat, self.weight, self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


class Int8Embedding(nn.Module):
    """Rows of an int8 table times their scales; shares its buffers with a tied :class:`Int8Linear` head."""

    weight: torch.Tensor
    scale: torch.Tensor

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer(SCALE_KEY, torch.empty(num_embeddings, dtype=dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].to(self.scale.dtype) * self.scale[ids].unsqueeze(-1)

    def as_linear(self) -> Int8Linear:
        """The tied lm_head over the same buffers (no second copy of the table)."""
        head = Int8Linear(self.weight.shape[1], self.weight.shape[0], self.scale.dtype)
        head.weight, head.scale = self.weight, self.scale
        return head


def swap_quantized_linears(module: nn.Module, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Replace each ``nn.Linear`` under ``module`` whose ``<name>.scale`` is in ``tensors`` by an Int8Linear."""
    for name, child in list(module.named_modules()):
        if isinstance(child, nn.Linear) and f"{name}.{SCALE_KEY}" in tensors:
            parent_name, _, leaf = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, leaf, Int8Linear(child.in_features, child.out_features, dtype,
                                             bias=f"{name}.bias" in tensors))


def is_quantized(tensors: Mapping[str, torch.Tensor]) -> bool:
    return any(key == SCALE_KEY or key.endswith("." + SCALE_KEY) for key in tensors)


def quantize_tensors(tensors: Mapping[str, torch.Tensor], matrix_keys: set[str],
                     dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """One store file's tensors: the named matrices to int8 + scale, every other float tensor to ``dtype``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key in matrix_keys:
            prefix = key.removesuffix("weight")
            out[key], out[prefix + SCALE_KEY] = quantize_rows(value, dtype)
        else:
            out[key] = value.to(dtype) if value.is_floating_point() else value
    return out


def load_module(module: nn.Module, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
    """``load_state_dict(assign=True)`` after swapping the linears the file quantized (a no-op swap for floats)."""
    if is_quantized(tensors):
        swap_quantized_linears(module, tensors, dtype)
        tensors = {k: aligned(v) for k, v in tensors.items()}
    module.load_state_dict(dict(tensors), assign=True, strict=True)


def embedding_from(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> Int8Embedding:
    """An :class:`Int8Embedding` holding an ``embed`` file's int8 ``weight`` and ``scale``."""
    weight = tensors["weight"]
    table = Int8Embedding(int(weight.shape[0]), int(weight.shape[1]), dtype)
    table.load_state_dict({k: aligned(v) for k, v in tensors.items()}, assign=True, strict=True)
    return table


def kernel_problem() -> str | None:
    """Why this torch build cannot run int8 weights (None when its kernel answers a tiny call)."""
    kernel = getattr(torch, "_weight_int8pack_mm", None)
    if kernel is None:
        return f"torch {torch.__version__} has no _weight_int8pack_mm kernel"
    try:
        kernel(torch.ones(1, 32, dtype=torch.bfloat16), torch.ones(8, 32, dtype=torch.int8),
               torch.ones(8, dtype=torch.bfloat16))
    except RuntimeError as exc:
        return f"torch's int8 kernel fails here: {exc}"
    return None
