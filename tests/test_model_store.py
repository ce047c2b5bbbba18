"""The store: per-layer files, idempotent imports, and loud failures on missing or corrupted files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from common.model_import import TOKENIZER_CONFIG, import_checkpoint, import_random, tokenizer_files
from common.model_store import EMBED_ROLE, HEAD_ROLE, ModelStore, StoredModel, StoreError, layer_role
from common.reference_model import load_reference_model


def test_random_import_is_per_layer_and_idempotent(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    first = import_random(store, "tiny-llama", "tiny", seed=3)
    again = import_random(store, "tiny-llama", "tiny", seed=3)
    other = import_random(store, "tiny-llama", "tiny-other", seed=4)
    assert first == again and first != other
    model = store.open("tiny")
    assert model.digest == first
    assert set(model.manifest.files) == {EMBED_ROLE, HEAD_ROLE, *(layer_role(i) for i in range(6))}
    assert set(model.load_tensors(layer_role(2))) == {
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
        "post_attention_layernorm.weight"}
    assert model.manifest.tied_embeddings and "lm_head.weight" not in model.load_tensors(HEAD_ROLE)
    assert store.resolve(first[:10]) == first


def test_corrupted_and_missing_files_are_detected(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    import_random(store, "tiny-llama", "tiny", seed=1)
    model = store.open("tiny")
    blob = store.blob_path(model.entry(layer_role(1)).sha256)
    data = bytearray(blob.read_bytes())
    data[100] ^= 0x01
    blob.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"layer\.0001 is corrupted"):
        model.load_tensors(layer_role(1))
    store.blob_path(model.entry(layer_role(4)).sha256).unlink()
    with pytest.raises(StoreError, match=r"layer\.0004 is missing"):
        model.load_tensors(layer_role(4))
    assert model.missing_or_corrupt() == [layer_role(1), layer_role(4)]
    assert model.load_tensors(layer_role(0))  # other layers are unaffected


def test_tampered_manifest_and_unknown_model(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    digest = import_random(store, "tiny-llama", "tiny", seed=1)
    path = tmp_path / "models" / f"{digest}.json"
    path.write_bytes(path.read_bytes().replace(b'"num_layers":6', b'"num_layers":5'))
    with pytest.raises(StoreError, match="corrupted"):
        store.open("tiny")
    with pytest.raises(StoreError, match="not in store"):
        store.open("no-such-model")


def test_checkpoint_folder_import_matches_the_original(tmp_path: Path) -> None:
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False)
    torch.manual_seed(0)
    original = LlamaForCausalLM(config)
    original.train(False)
    original.save_pretrained(tmp_path / "ckpt")
    store = ModelStore(tmp_path / "store")
    import_checkpoint(store, tmp_path / "ckpt", "ckpt")
    stored: StoredModel = store.open("ckpt")
    assert not stored.manifest.tied_embeddings and "lm_head.weight" in stored.load_tensors(HEAD_ROLE)
    rebuilt = load_reference_model(stored)
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    with torch.inference_mode():
        assert torch.equal(original(ids).logits, rebuilt(ids).logits)


def test_stored_tokenizer_does_not_depend_on_how_it_was_loaded(embedded: StoredModel, tmp_path: Path) -> None:
    """HF_HUB_OFFLINE=1 (as in the image) loads with local_files_only=True, which transformers writes into
    tokenizer_config.json: the store must keep only the model's own files, or the digest follows the loader."""
    folder = embedded.export_tokenizer(tmp_path / "tok")
    online = AutoTokenizer.from_pretrained(str(folder), local_files_only=False)
    offline = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    for tok, name in ((online, "a"), (offline, "b")):
        tok.save_pretrained(tmp_path / name)
    raw = [json.loads((tmp_path / n / TOKENIZER_CONFIG).read_text()) for n in "ab"]
    assert raw[0] != raw[1], "transformers no longer records how a tokenizer was loaded: revisit this test"
    assert tokenizer_files(online) == tokenizer_files(offline)
    config = json.loads(tokenizer_files(offline)[TOKENIZER_CONFIG])
    assert not {"is_local", "local_files_only", "name_or_path"} & set(config)
    # A tokenizer read back from such a store re-saves to the very same bytes (re-imports keep the digest).
    clean = tmp_path / "clean"
    clean.mkdir()
    for name, data in tokenizer_files(offline).items():
        (clean / name).write_bytes(data)
    assert tokenizer_files(AutoTokenizer.from_pretrained(str(clean))) == tokenizer_files(offline)
